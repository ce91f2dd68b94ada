/*
** main.c: the lpar command. Creates the state and runs lua/lpar/cli.lua,
** giving it the C parts of the hot path: item reader, output, signals.
*/
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "lualib.h"
#include "opts.h"
#include "worker.h"

/* the files of lua/lpar, built in (embedded.c in the build tree) */
const char *lpar_embedded(const char *name, size_t *len);

/* bytes asked of read() at a time; a longer item grows the buffer */
#if !defined(LPAR_READSIZE)
#define LPAR_READSIZE (256 * 1024)
#endif

/* the most bytes one read() into a grown buffer asks for, so that a
   signal is looked at between reads of a long record */
#if !defined(LPAR_READMAX)
#define LPAR_READMAX (4 * 1024 * 1024)
#endif

/* output is written at most this long after it is produced (ns) */
#if !defined(LPAR_OUTDELAYNS)
#define LPAR_OUTDELAYNS 10000000LL
#endif

/* buffered output beyond this many bytes is written at once */
#if !defined(LPAR_OUTHIGH)
#define LPAR_OUTHIGH (64 * 1024)
#endif

#define READERMT "lpar.cli.Reader"

static long long now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Write all of p to fd; 0 or an errno. */
static int writeall(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t k;
    do
      k = write(fd, p, n);
    while (k == -1 && errno == EINTR);
    if (k < 0)
      return errno;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Raise a formatted message, without a position: a user's error, not
   one of lpar.cli's lines. */
static int raisef(lua_State *L, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  return lua_error(L);
}

static int stopsignal(void);
static void checkstop(lua_State *L);

/*
** Write all of p to fd (stdout or stderr, which may be a pipe that
** nobody reads): 0, an errno, or -1 if a stop signal (SIGINT, SIGTERM,
** SIGHUP) came while fd could take no more. It waits for room with poll,
** a tenth of a second at a time, and writes at most PIPE_BUF bytes at
** once, which a pipe with room takes without blocking: a signal is seen
** even while the reader is stalled (a paused pager).
*/
static int writeout(int fd, const char *p, size_t n) {
  while (n > 0) {
    struct pollfd pf;
    int rc;
    ssize_t k;
    pf.fd = fd;
    pf.events = POLLOUT;
    pf.revents = 0;
    rc = poll(&pf, 1, stopsignal() ? 0 : 100);
    if (rc == 0 && stopsignal())
      return -1;
    if (rc == 0 || (rc < 0 && errno == EINTR))
      continue;
    if (rc < 0)
      return errno;
    do
      k = write(fd, p, n < PIPE_BUF ? n : PIPE_BUF);
    while (k == -1 && errno == EINTR);
    if (k < 0)
      return errno;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* ---- signals ---- */

/* SIGINT, SIGTERM or SIGHUP caught outside a run (inside one, the run
   takes them, or they stay pending while it has them blocked) */
static volatile sig_atomic_t caught;

/* SIGXFSZ as lpar found it: workers get it back */
static struct sigaction oldxfsz;
static int xfszsaved;

static void oncatch(int sig) {
  caught = sig;
}

/*
** signals() -> watching SIGTERM: ignore SIGPIPE (a closed output shows as
** EPIPE) and SIGXFSZ (a file over the size limit shows as EFBIG), and
** note SIGINT, SIGTERM and SIGHUP, unless they were ignored. A run that
** watches SIGTERM takes SIGHUP too.
*/
static int l_signals(lua_State *L) {
  struct sigaction sa, old;
  int term = 0;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &sa, NULL);
  if (!xfszsaved && sigaction(SIGXFSZ, &sa, &oldxfsz) == 0)
    xfszsaved = 1;
  sa.sa_handler = oncatch; /* no SA_RESTART: a wait sees EINTR */
  if (sigaction(SIGINT, NULL, &old) == 0 && old.sa_handler != SIG_IGN)
    sigaction(SIGINT, &sa, NULL);
  if (sigaction(SIGHUP, NULL, &old) == 0 && old.sa_handler != SIG_IGN)
    sigaction(SIGHUP, &sa, NULL);
  if (sigaction(SIGTERM, NULL, &old) == 0 && old.sa_handler != SIG_IGN) {
    sigaction(SIGTERM, &sa, NULL);
    term = 1;
  }
  lua_pushboolean(L, term);
  return 1;
}

/* The signal caught or pending (blocked by a run), 0 if none. */
static int stopsignal(void) {
  sigset_t pend;
  if (caught)
    return caught;
  if (sigpending(&pend) == 0) {
    if (sigismember(&pend, SIGINT))
      return SIGINT;
    if (sigismember(&pend, SIGTERM))
      return SIGTERM;
    if (sigismember(&pend, SIGHUP))
      return SIGHUP;
  }
  return 0;
}

/* caught() -> signal number, or 0 */
static int l_caught(lua_State *L) {
  lua_pushinteger(L, stopsignal());
  return 1;
}

/* ---- output ---- */

/*
** Results go to fd 1 through one buffer. A flusher thread writes what is
** buffered at most LPAR_OUTDELAYNS after it was added, so a result shows
** even while the main thread waits in the engine for the next one; the
** main thread writes the buffer itself once it exceeds LPAR_OUTHIGH.
** Every write to fd 1 or 2 happens under 'mu', in order. The flusher has
** every signal blocked, so signals reach the main thread only. With
** --progress on a terminal the bar is lifted before output and redrawn.
*/
typedef struct Out {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  int started; /* the flusher runs */
  int running; /* ... and is past its thread's start (mu held to see) */
  int quit;    /* the flusher must leave */
  char *p;     /* pending bytes */
  size_t n, cap;
  long long since;    /* when the oldest pending byte was added */
  atomic_int err;     /* errno of the first failed write of fd 1; sticky */
  atomic_int stopped; /* a stop signal came while fd 1 was full: the
                         output was dropped from there on */
  char *outname;      /* the file of -o, for messages; NULL: stdout */
  char bar[512];      /* the progress line, with its escapes */
  size_t barlen;
  int barshown; /* the bar is on the terminal */
  int bardirty; /* the bar is to be drawn (again), after the output */
  int bartty;   /* stderr is a terminal */
  int shared;   /* stdout is a terminal too: lift the bar to write */
  /* the joblog: its lines are written up to the last mark, after the
     output they describe, then (with markers) "# out <bytes> <line>" */
  int logfd;         /* -1 without a joblog */
  char *logname;     /* its path, for messages */
  atomic_int logerr; /* errno of the first failed write of it; sticky */
  int markers;       /* write the marker lines (output to a file) */
  char *log;         /* pending joblog text */
  size_t logn, logcap;
  size_t logmark;       /* bytes of 'log' up to the last mark */
  long long outbytes;   /* output bytes so far, from the file's start */
  long long markbytes;  /* output bytes at the last mark */
  int hashing;          /* hash the output (a file, with a joblog) */
  uint64_t outhash;     /* FNV-1a state of the output from its start */
  uint64_t markstate;   /* outhash at the last mark */
  lua_Integer markline; /* records done at the last mark */
  int marked;           /* a mark is waiting to be written */
} Out;

static Out out = {.mu = PTHREAD_MUTEX_INITIALIZER, .logfd = -1};

/* FNV-1a, 64 bits, continued from h */
static uint64_t fnv(uint64_t h, const char *p, size_t n) {
  while (n-- > 0) {
    h ^= (unsigned char)*p++;
    h *= 0x100000001b3ULL;
  }
  return h;
}

#define FNVSTART 0xcbf29ce484222325ULL

/*
** The hash a mark carries: FNV-1a of the output's first bytes (state h),
** continued with the mark's line count in decimal, so that a mark agrees
** with its output file only with both its numbers as written.
*/
static uint64_t markhash(uint64_t h, long long line) {
  char num[24];
  int k = snprintf(num, sizeof num, "%lld", line);
  return fnv(h, num, (size_t)k);
}

/* Whether something waits to be written (mu held). */
static int pending(void) {
  return out.n > 0 || out.marked || out.bardirty;
}

/* Something is about to be pending (mu held): start the delay. */
static void wake(void) {
  if (!pending() && out.started) {
    out.since = now();
    pthread_cond_signal(&out.cv);
  }
}

static void liftbar(void) {
  if (out.barshown && out.bartty)
    writeout(2, "\r\033[K", 4);
}

static void dropbar(void) {
  if (out.barshown && out.bartty)
    writeout(2, out.bar, out.barlen);
}

/* Write the pending bytes (mu held). */
static void drain(void) {
  if (out.n > 0) {
    if (out.shared)
      liftbar();
    if (atomic_load(&out.err) == 0 && !atomic_load(&out.stopped)) {
      int e = writeout(1, out.p, out.n);
      if (e == -1) /* the rest is dropped: lpar is stopping */
        atomic_store(&out.stopped, 1);
      else if (e != 0)
        atomic_store(&out.err, e);
    }
    out.n = 0;
    if (out.cap > LPAR_KEEPBUF) { /* a long result, written: not kept */
      out.p = lpar_buf_realloc(out.p, out.cap, 0);
      out.cap = 0;
    }
    if (out.shared)
      out.bardirty = 1;
  }
  /* a mark is written only after the output it counts, and only while
     every write so far succeeded: the last mark is never ahead */
  if (out.marked && out.logfd >= 0 && atomic_load(&out.err) == 0 &&
      !atomic_load(&out.stopped) && atomic_load(&out.logerr) == 0) {
    int e = writeall(out.logfd, out.log, out.logmark);
    if (e == 0 && out.markers) {
      char m[96];
      int k = snprintf(
          m, sizeof m, "# out %lld %lld %016llx\n", out.markbytes,
          (long long)out.markline,
          (unsigned long long)markhash(out.markstate, (long long)out.markline));
      e = writeall(out.logfd, m, (size_t)k);
    }
    if (e != 0)
      atomic_store(&out.logerr, e);
    memmove(out.log, out.log + out.logmark, out.logn - out.logmark);
    out.logn -= out.logmark;
    out.logmark = 0;
  }
  out.marked = 0;
  /* the bar is drawn after the output it counts, never before */
  if (out.bardirty) {
    out.bardirty = 0;
    dropbar();
  }
}

static void *flusher(void *ud) {
  (void)ud;
  pthread_mutex_lock(&out.mu);
  out.running = 1; /* its start is over: see l_startoutput */
  pthread_cond_broadcast(&out.cv);
  while (!out.quit) {
    long long due = out.since + LPAR_OUTDELAYNS;
    if (!pending())
      pthread_cond_wait(&out.cv, &out.mu);
    else if (now() < due) {
      struct timespec ts;
      ts.tv_sec = (time_t)(due / 1000000000LL);
      ts.tv_nsec = (long)(due % 1000000000LL);
      pthread_cond_timedwait(&out.cv, &out.mu, &ts);
    }
    else
      drain();
  }
  pthread_mutex_unlock(&out.mu);
  return NULL;
}

/* startoutput(): flush what the script printed and start the flusher. */
static int l_startoutput(lua_State *L) {
  pthread_condattr_t ca;
  sigset_t all, old;
  int rc;
  if (out.started)
    return 0;
  fflush(stdout);
  out.bartty = isatty(2);
  out.shared = out.bartty && isatty(1);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&out.cv, &ca);
  pthread_condattr_destroy(&ca);
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  rc = pthread_create(&out.thread, NULL, flusher, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0)
    return raisef(L, "cannot start the output thread: %s", strerror(rc));
  /* wait until the thread has started: a worker forked while the new
     thread is still being set up (by a sanitizer's allocator, say) could
     inherit a lock that thread holds */
  pthread_mutex_lock(&out.mu);
  while (!out.running)
    pthread_cond_wait(&out.cv, &out.mu);
  pthread_mutex_unlock(&out.mu);
  out.started = 1;
  return 0;
}

/* Whether a write of the output or the joblog failed. */
static int failed(void) {
  return atomic_load(&out.err) != 0 || atomic_load(&out.logerr) != 0;
}

/* Push the message of the first failed write, output first: "output
   closed" for EPIPE (of kind "output" for lpar.errkind), else naming the
   file. Returns 0 (pushing nothing) if none failed. */
static int pushfailure(lua_State *L) {
  int e = atomic_load(&out.err);
  if (e == EPIPE) {
    lua_pushliteral(L, "output closed");
    lpar_kind_mark(L, LPAR_KOUTPUT);
  }
  else if (e != 0)
    lua_pushfstring(L, "cannot write %s: %s",
                    out.outname ? out.outname : "the output", strerror(e));
  else if ((e = atomic_load(&out.logerr)) != 0)
    lua_pushfstring(L, "cannot write %s: %s", out.logname, strerror(e));
  else
    return 0;
  return 1;
}

/* Raise the message of the failed write. */
static int outerror(lua_State *L) {
  pushfailure(L);
  return lua_error(L);
}

/* Make room in *p (holding n of cap bytes) for 'need' more; 0 or -1. */
static int reserve(char **p, size_t n, size_t *cap, size_t need) {
  if (*cap - n < need) {
    size_t c = *cap ? *cap : LPAR_OUTHIGH + 4096;
    char *q;
    while (c - n < need)
      c *= 2;
    q = lpar_buf_realloc(*p, *cap, c);
    if (q == NULL)
      return -1;
    lpar_buf_dontfork(q, c); /* a long result is no worker's business */
    *p = q;
    *cap = c;
  }
  return 0;
}

/* what ends each result line: '\n', or '\0' with --null-output */
static char eolchar = '\n';

/* Buffer s (and the end of a line if 'nl'). Raises if the output
   failed. */
static int put(lua_State *L, int nl) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Integer from = luaL_optinteger(L, 2, 1), to = luaL_optinteger(L, 3, -1);
  int e, nomem = 0;
  /* bytes from..to of s, as string.sub counts them */
  if (to < 0)
    to += (lua_Integer)len + 1;
  if (to > (lua_Integer)len)
    to = (lua_Integer)len;
  if (from < 1)
    from = 1;
  if (from > to)
    len = 0;
  else {
    s += from - 1;
    len = (size_t)(to - from + 1);
  }
  pthread_mutex_lock(&out.mu);
  e = failed();
  if (e == 0 && reserve(&out.p, out.n, &out.cap, len + 1) != 0)
    nomem = 1;
  else if (e == 0) {
    wake();
    memcpy(out.p + out.n, s, len);
    out.n += len;
    if (nl)
      out.p[out.n++] = eolchar;
    out.outbytes += (long long)(len + (nl != 0));
    if (out.hashing) /* 'nl' is the byte after s */
      out.outhash =
          fnv(out.outhash, out.p + out.n - len - (nl != 0), len + (nl != 0));
    if (out.n >= LPAR_OUTHIGH || !out.started)
      drain();
    e = failed();
  }
  pthread_mutex_unlock(&out.mu);
  if (nomem)
    return raisef(L, "not enough memory");
  if (atomic_load(&out.stopped))
    checkstop(L);
  if (e != 0)
    return outerror(L);
  return 0;
}

/* write(s [, i [, j]]): output the bytes of s (from i to j) */
static int l_write(lua_State *L) {
  return put(L, 0);
}

/* writeln(s): output s and a newline */
static int l_writeln(lua_State *L) {
  return put(L, 1);
}

/* endlines(nul): with nul, writeln ends results with a NUL byte */
static int l_endlines(lua_State *L) {
  eolchar = lua_toboolean(L, 1) ? '\0' : '\n';
  return 0;
}

/* log(text): add text to the joblog; it is written at the next mark. */
static int l_log(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int nomem;
  pthread_mutex_lock(&out.mu);
  nomem = reserve(&out.log, out.logn, &out.logcap, len) != 0;
  if (!nomem) {
    memcpy(out.log + out.logn, s, len);
    out.logn += len;
  }
  pthread_mutex_unlock(&out.mu);
  if (nomem)
    return raisef(L, "not enough memory");
  return 0;
}

/* mark(line): records up to 'line' are settled: their output and joblog
   lines are all given. Raises if a write of the output or the joblog
   failed. */
static int l_mark(lua_State *L) {
  lua_Integer line = luaL_checkinteger(L, 1);
  if (atomic_load(&out.stopped))
    checkstop(L);
  if (failed())
    return outerror(L);
  pthread_mutex_lock(&out.mu);
  wake();
  out.markline = line;
  out.markbytes = out.outbytes;
  out.markstate = out.outhash;
  out.logmark = out.logn;
  out.marked = 1;
  if (!out.started)
    drain();
  pthread_mutex_unlock(&out.mu);
  return 0;
}

/* Why openkept failed, besides an errno. */
#define KEPTSHORT (-2)  /* the file is shorter than 'keep' */
#define KEPTLOCKED (-3) /* another lpar run holds its lock */
#define UNSAFELINK (-4) /* a symlink protected_symlinks would not follow */

/*
** Whether 'path' is a symlink that the kernel's protected_symlinks rule
** forbids following: in a sticky world-writable directory (/tmp) and
** owned neither by this user nor by the directory's owner (someone else
** planted it there). Its owner in *uid, its directory's name in dir.
*/
static int unsafelink(const char *path, uid_t *uid, char *dir, size_t size) {
  struct stat link, d;
  const char *slash = strrchr(path, '/');
  size_t n = slash == NULL ? 1 : slash == path ? 1 : (size_t)(slash - path);
  if (n >= size)
    return 0; /* a name too long for open() anyway */
  memcpy(dir, slash == NULL ? "." : path, n);
  dir[n] = '\0';
  if (lstat(path, &link) != 0 || !S_ISLNK(link.st_mode) || stat(dir, &d) != 0)
    return 0;
  *uid = link.st_uid;
  return (d.st_mode & S_ISVTX) && (d.st_mode & S_IWOTH) &&
         link.st_uid != geteuid() && link.st_uid != d.st_uid;
}

/*
** open(path, flags | O_WRONLY (unless O_RDWR) | O_CREAT | O_CLOEXEC, 0666),
** but refuse to
** follow a symlink that protected_symlinks forbids, whether or not the
** kernel enforces it: the fd, -1 with errno, or UNSAFELINK. The link is
** looked at only when open with O_NOFOLLOW finds one; it then cannot be
** swapped before the second open, since in a sticky directory only its
** owner or the directory's can remove it, and those are the owners
** allowed.
*/
static int openwrite(const char *path, int flags) {
  char dir[4096];
  struct stat st;
  uid_t uid;
  int fd, e;
  flags |= (flags & O_RDWR ? 0 : O_WRONLY) | O_CREAT | O_CLOEXEC;
  do
    fd = open(path, flags | O_NOFOLLOW, 0666);
  while (fd == -1 && errno == EINTR);
  if (fd != -1)
    return fd;
  e = errno; /* ELOOP for a symlink, though some kernels say EACCES */
  if (lstat(path, &st) != 0 || !S_ISLNK(st.st_mode)) {
    errno = e;
    return -1;
  }
  if (unsafelink(path, &uid, dir, sizeof dir))
    return UNSAFELINK;
  do
    fd = open(path, flags, 0666);
  while (fd == -1 && errno == EINTR);
  return fd;
}

/* Push the message for 'path', a symlink openwrite refused. */
static const char *pushunsafe(lua_State *L, const char *path) {
  char dir[4096];
  uid_t uid = 0;
  unsafelink(path, &uid, dir, sizeof dir);
  return lua_pushfstring(
      L,
      "refusing to write %s: a symlink in the sticky world-writable "
      "directory %s, owned by uid %d, neither yours nor the directory "
      "owner's (as the kernel's protected_symlinks rule has it)",
      path, dir, (int)uid);
}

/* Lock the regular file open at fd, without waiting: 0, or -1 with errno
   (EWOULDBLOCK: another run holds it). A file system without locks lets
   it go unlocked. */
static int lockfile(int fd) {
  int rc;
  do
    rc = flock(fd, LOCK_EX | LOCK_NB);
  while (rc == -1 && errno == EINTR);
  if (rc == -1 && (errno == ENOLCK || errno == EOPNOTSUPP || errno == ENOSYS))
    rc = 0;
  return rc;
}

/* Open path for writing, locked (a regular file) and then cut to 'keep'
   bytes; the fd, or -1 with errno set, or KEPTSHORT or KEPTLOCKED. */
static int openkept(const char *path, long long keep, int flags) {
  struct stat st;
  int fd, why = -1;
  fd = openwrite(path, flags);
  if (fd < 0)
    return fd;
  if (fstat(fd, &st) != 0)
    goto fail;
  if (S_ISREG(st.st_mode) && lockfile(fd) != 0) {
    if (errno == EWOULDBLOCK)
      why = KEPTLOCKED;
    goto fail;
  }
  if (S_ISREG(st.st_mode) && st.st_size < keep) {
    why = KEPTSHORT;
    goto fail;
  }
  if (S_ISREG(st.st_mode) &&
      (ftruncate(fd, keep) != 0 || lseek(fd, 0, SEEK_END) < 0))
    goto fail;
  return fd;
fail:;
  int e = errno;
  close(fd);
  errno = e;
  return why;
}

/*
** FNV-1a of the first 'len' bytes of the file open at 'fd' (for reading),
** continued from *h, read from where fd stands: 0, or -1 with errno
** (EIO when the file ends before).
*/
static int hashfile(int fd, long long len, uint64_t *h) {
  char buf[65536];
  while (len > 0) {
    ssize_t n;
    do
      n = read(fd, buf, len < (long long)sizeof buf ? (size_t)len : sizeof buf);
    while (n == -1 && errno == EINTR);
    if (n <= 0) {
      if (n == 0)
        errno = EIO;
      return -1;
    }
    *h = fnv(*h, buf, (size_t)n);
    len -= n;
  }
  return 0;
}

/* The FNV-1a state of the first 'keep' bytes of path, the file open for
   writing at 'wfd' (checked to be the same file): 0, or -1 with errno. */
static int hashkept(const char *path, int wfd, long long keep, uint64_t *h) {
  struct stat a, b;
  int rc = -1, e, fd;
  *h = FNVSTART;
  if (keep == 0)
    return 0;
  do
    fd = open(path, O_RDONLY | O_CLOEXEC);
  while (fd == -1 && errno == EINTR);
  if (fd == -1)
    return -1;
  if (fstat(fd, &a) == 0 && fstat(wfd, &b) == 0) {
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
      errno = ESTALE; /* replaced since it was opened */
    else
      rc = hashfile(fd, keep, h);
  }
  e = errno;
  close(fd);
  errno = e;
  return rc;
}

/* redirect(path, keep [, hash]) -> true | nil, message: results go to
   path (cut to 'keep' bytes) instead of stdout; with 'hash', they are
   hashed from the file's start, for the joblog's marks. */
static int l_redirect(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  long long keep = (long long)luaL_optinteger(L, 2, 0);
  int hashing = lua_toboolean(L, 3);
  int fd = openkept(path, keep, 0);
  uint64_t h = FNVSTART;
  fflush(stdout); /* what the script wrote goes to stdout, not to path */
  if (fd >= 0 && hashing && hashkept(path, fd, keep, &h) != 0) {
    int e = errno;
    close(fd);
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot read %s: %s", path, strerror(e));
    return 2;
  }
  if (fd < 0 || dup2(fd, 1) == -1) {
    luaL_pushfail(L);
    if (fd == KEPTLOCKED)
      lua_pushfstring(L, "%s is in use by another lpar run", path);
    else if (fd == UNSAFELINK)
      pushunsafe(L, path);
    else if (fd == KEPTSHORT)
      lua_pushfstring(L, "cannot write %s: shorter than its joblog says", path);
    else
      lua_pushfstring(L, "cannot write %s: %s", path, strerror(errno));
    if (fd >= 0)
      close(fd);
    return 2;
  }
  close(fd);
  out.outbytes = keep;
  out.hashing = hashing;
  out.outhash = h;
  free(out.outname);
  out.outname = strdup(path);
  if (out.outname == NULL)
    return raisef(L, "not enough memory");
  lua_pushboolean(L, 1);
  return 1;
}

/* Cut the regular file open at fd after its last newline, if it does not
   end with one (a write of a run killed midway): 0, or -1 with errno. A
   file that is not regular is left. */
static int cuttail(int fd) {
  char buf[4096];
  struct stat st;
  off_t end;
  if (fstat(fd, &st) != 0)
    return -1;
  if (!S_ISREG(st.st_mode))
    return 0;
  end = st.st_size;
  while (end > 0) { /* back a block at a time to the last newline */
    size_t n = end < (off_t)sizeof buf ? (size_t)end : sizeof buf;
    off_t start = end - (off_t)n;
    ssize_t got = pread(fd, buf, n, start);
    if (got != (ssize_t)n) {
      if (got >= 0)
        errno = EIO;
      return -1;
    }
    while (n > 0 && buf[n - 1] != '\n')
      n--;
    end = start + (off_t)n;
    if (n > 0)
      break;
  }
  if (end != st.st_size && ftruncate(fd, end) != 0)
    return -1;
  return 0;
}

/* A file lpar writes lines to (--events), opened by openwrite. */
#define WRITERMT "lpar.writer"

static FILE **checkwriter(lua_State *L) {
  FILE **f = (FILE **)luaL_checkudata(L, 1, WRITERMT);
  if (*f == NULL)
    luaL_error(L, "attempt to use a closed file");
  return f;
}

/* writer:write(s, ...) -> writer | nil, message */
static int writer_write(lua_State *L) {
  FILE *f = *checkwriter(L);
  int i, n = lua_gettop(L);
  for (i = 2; i <= n; i++) {
    size_t len;
    const char *s = luaL_checklstring(L, i, &len);
    if (fwrite(s, 1, len, f) != len) {
      luaL_pushfail(L);
      lua_pushstring(L, strerror(errno));
      return 2;
    }
  }
  lua_settop(L, 1);
  return 1;
}

/* writer:close() -> true | nil, message (its buffer written out) */
static int writer_close(lua_State *L) {
  FILE **f = (FILE **)luaL_checkudata(L, 1, WRITERMT);
  int rc = *f != NULL ? fclose(*f) : 0;
  *f = NULL;
  if (rc != 0) {
    luaL_pushfail(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/*
** openwriter(path, append) -> writer | nil, message, unsafe: open path to
** write lines to, fully buffered (made if missing; cut unless 'append',
** else cut after its last newline: a line torn by a run killed midway),
** refusing a symlink that protected_symlinks forbids (then 'unsafe' is
** true and the message names it). The writer has write and close.
*/
static int l_openwriter(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int append = lua_toboolean(L, 2), fd;
  FILE **f = (FILE **)lua_newuserdata(L, sizeof(FILE *));
  *f = NULL;
  if (luaL_newmetatable(L, WRITERMT)) {
    static const luaL_Reg methods[] = {
        {"write", writer_write}, {"close", writer_close}, {NULL, NULL}};
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, writer_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  fd = openwrite(path, append ? O_APPEND | O_RDWR : O_TRUNC);
  if (fd >= 0 && append && cuttail(fd) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    fd = -1;
  }
  if (fd == UNSAFELINK) {
    luaL_pushfail(L);
    pushunsafe(L, path);
    lua_pushboolean(L, 1);
    return 3;
  }
  if (fd >= 0 && (*f = fdopen(fd, append ? "a" : "w")) == NULL)
    close(fd);
  if (*f == NULL) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  setvbuf(*f, NULL, _IOFBF, BUFSIZ);
  return 1;
}

/*
** openjoblog(path) -> true | nil, message: open the joblog (made if
** missing, nothing cut yet) and lock it if it is a regular file, so that
** a second run with the same joblog fails at once instead of interleaving
** its lines.
*/
static int l_openjoblog(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  int fd, rc = 0;
  fd = openwrite(path, O_APPEND);
  if (fd < 0) {
    luaL_pushfail(L);
    if (fd == UNSAFELINK)
      pushunsafe(L, path);
    else
      lua_pushfstring(L, "cannot write %s: %s", path, strerror(errno));
    return 2;
  }
  if (fstat(fd, &st) != 0)
    rc = -1;
  else if (S_ISREG(st.st_mode))
    rc = lockfile(fd);
  if (rc == -1) {
    int e = errno;
    close(fd);
    luaL_pushfail(L);
    if (e == EWOULDBLOCK)
      lua_pushfstring(L, "%s is in use by another lpar run", path);
    else
      lua_pushfstring(L, "cannot lock %s: %s", path, strerror(e));
    return 2;
  }
  free(out.logname);
  out.logname = strdup(path);
  if (out.logname == NULL) {
    close(fd);
    return raisef(L, "not enough memory");
  }
  out.logfd = fd;
  lua_pushboolean(L, 1);
  return 1;
}

/* joblog(keep, markers) -> true | nil, message: cut the open joblog to
   'keep' bytes; with 'markers', output positions are recorded in it. */
static int l_joblog(lua_State *L) {
  long long keep = (long long)luaL_checkinteger(L, 1);
  struct stat st;
  luaL_argcheck(L, out.logfd >= 0, 1, "no joblog open");
  if (fstat(out.logfd, &st) != 0 ||
      (S_ISREG(st.st_mode) && ftruncate(out.logfd, keep) != 0)) {
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot write %s: %s", out.logname, strerror(errno));
    return 2;
  }
  out.markers = lua_toboolean(L, 2);
  lua_pushboolean(L, 1);
  return 1;
}

/*
** checkmarks(path, marks) -> nil | k, why: whether the output file 'path'
** agrees with each of 'marks' ({bytes, line, hash} in order, bytes not
** going back): its first 'bytes' bytes hash, with 'line', to 'hash'. The
** first that does not is marks[k]; 'why' says how ("short": the file
** ends before, or is missing; "differs"). 0, message if the file cannot
** be read.
*/
static int l_checkmarks(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_Integer k, n;
  long long at = 0;
  uint64_t h = FNVSTART;
  int fd;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = luaL_len(L, 2);
  do
    fd = open(path, O_RDONLY | O_CLOEXEC);
  while (fd == -1 && errno == EINTR);
  if (fd == -1 && errno != ENOENT) { /* a missing file holds 0 bytes */
    lua_pushinteger(L, 0);
    lua_pushfstring(L, "cannot read %s: %s", path, strerror(errno));
    return 2;
  }
  for (k = 1; k <= n; k++) {
    long long bytes, line;
    char hex[17];
    lua_geti(L, 2, k);
    lua_geti(L, -1, 1);
    lua_geti(L, -2, 2);
    lua_geti(L, -3, 3);
    bytes = (long long)lua_tointeger(L, -3);
    line = (long long)lua_tointeger(L, -2);
    if (bytes < at || (bytes > at && fd == -1) ||
        hashfile(fd, bytes - at, &h) != 0) {
      int e = bytes < at || fd == -1 ? EIO : errno;
      if (fd >= 0)
        close(fd);
      lua_pushinteger(L, e == EIO ? k : 0);
      if (e == EIO)
        lua_pushliteral(L, "short");
      else
        lua_pushfstring(L, "cannot read %s: %s", path, strerror(e));
      return 2;
    }
    at = bytes;
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)markhash(h, line));
    if (!lua_isstring(L, -1) || strcmp(hex, lua_tostring(L, -1)) != 0) {
      if (fd >= 0)
        close(fd);
      lua_pushinteger(L, k);
      lua_pushstring(L, "differs");
      return 2;
    }
    lua_pop(L, 4);
  }
  if (fd >= 0)
    close(fd);
  return 0;
}

/* markers(on): whether marks write "# out <bytes> <line> <hash>" to the
   joblog */
static int l_markers(lua_State *L) {
  pthread_mutex_lock(&out.mu);
  out.markers = lua_toboolean(L, 1);
  pthread_mutex_unlock(&out.mu);
  return 0;
}

/* The identity of a regular file or a pipe as "device:inode", or NULL
   (a terminal, /dev/null or a socket may well serve two streams). */
static const char *pushfileid(lua_State *L, const struct stat *st) {
  if (!S_ISREG(st->st_mode) && !S_ISFIFO(st->st_mode))
    return NULL;
  return lua_pushfstring(L, "%I:%I", (LUAI_UACINT)st->st_dev,
                         (LUAI_UACINT)st->st_ino);
}

/* fileid(path) -> "device:inode" of a regular file or a pipe, or nil
   (missing, or neither) */
static int l_fileid(lua_State *L) {
  struct stat st;
  if (stat(luaL_checkstring(L, 1), &st) != 0 || !pushfileid(L, &st))
    luaL_pushfail(L);
  return 1;
}

/* filetype(path) -> "file", "directory", "fifo", "character device",
   "block device", "socket" or "other"; nil if it cannot be stat'ed */
static int l_filetype(lua_State *L) {
  struct stat st;
  if (stat(luaL_checkstring(L, 1), &st) != 0)
    return 0;
  lua_pushstring(L, S_ISREG(st.st_mode)    ? "file"
                    : S_ISDIR(st.st_mode)  ? "directory"
                    : S_ISFIFO(st.st_mode) ? "fifo"
                    : S_ISCHR(st.st_mode)  ? "character device"
                    : S_ISBLK(st.st_mode)  ? "block device"
                    : S_ISSOCK(st.st_mode) ? "socket"
                                           : "other");
  return 1;
}

static void pushhash(lua_State *L, uint64_t h) {
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
  lua_pushstring(L, hex);
}

/* hash(s) -> 16 hex digits: a checksum of s (not cryptographic) */
static int l_hash(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  pushhash(L, fnv(FNVSTART, s, len));
  return 1;
}

/* report(msg): write msg and a newline on stderr, after the output
   produced before it. */
static int l_report(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  pthread_mutex_lock(&out.mu);
  drain();
  liftbar();
  writeout(2, s, len);
  writeout(2, "\n", 1);
  dropbar();
  pthread_mutex_unlock(&out.mu);
  return 0;
}

/* bar(text): show the progress line (on a terminal, in place, drawn by
   the flusher after the output written before it); bar(): write what is
   pending and end the line with a newline. */
static int l_bar(lua_State *L) {
  size_t len;
  const char *s = luaL_optlstring(L, 1, NULL, &len);
  pthread_mutex_lock(&out.mu);
  if (s == NULL) {
    drain();
    if (out.barshown && out.bartty)
      writeout(2, "\n", 1);
    out.barshown = 0;
  }
  else if (out.bartty) {
    if (len > sizeof out.bar - 8)
      len = sizeof out.bar - 8;
    out.bar[0] = '\r';
    memcpy(out.bar + 1, s, len);
    memcpy(out.bar + 1 + len, "\033[K", 3);
    out.barlen = len + 4;
    out.barshown = 1;
    if (out.started) {
      wake();
      out.bardirty = 1;
    }
    else
      writeout(2, out.bar, out.barlen);
  }
  else {
    drain();
    writeout(2, s, len);
    writeout(2, "\n", 1);
  }
  pthread_mutex_unlock(&out.mu);
  return 0;
}

/* finish() -> nil, or the message of a failed write of the output or the
   joblog: stop the flusher, write what is left and close the joblog. */
static int l_finish(lua_State *L) {
  if (out.started) {
    pthread_mutex_lock(&out.mu);
    out.quit = 1;
    pthread_cond_signal(&out.cv);
    pthread_mutex_unlock(&out.mu);
    pthread_join(out.thread, NULL);
    out.started = 0;
  }
  pthread_mutex_lock(&out.mu);
  drain();
  if (out.logfd >= 0) {
    /* lines past the last mark, if the run stopped before marking them */
    if (!failed() && out.logn > 0) {
      int e = writeall(out.logfd, out.log, out.logn);
      if (e != 0)
        atomic_store(&out.logerr, e);
    }
    out.logn = 0;
    if (close(out.logfd) != 0 && !failed())
      atomic_store(&out.logerr, errno);
    out.logfd = -1;
  }
  pthread_mutex_unlock(&out.mu);
  return pushfailure(L);
}

/* ---- items ---- */

/*
** The items go to the engine in batches: one engine item is a block of
** consecutive records, raw bytes with their separators, which a worker
** splits (split()). The parent's work per record is then a memchr and a
** memcpy; the engine's cost is paid per batch. How many records a batch
** holds is the engine's to say (its policy, from the time per record the
** workers report): the reader cuts what it is asked for, fewer only
** where the bytes run out.
*/

/* most bytes in a batch (a longer record goes alone) */
#if !defined(LPAR_BATCHBYTES)
#define LPAR_BATCHBYTES (64 * 1024)
#endif

/* records handed out and not yet taken back, at most: past this the
   iterator says "not yet" until a result is taken (which bounds the
   memory a very slow item can make the others pile up) */
#if !defined(LPAR_AHEAD)
#define LPAR_AHEAD 65536
#endif

typedef struct Reader {
  int fd;           /* the source read now; -1 once closed */
  int own;          /* fd was opened here (not stdin) */
  int *fds;         /* the sources after fd, in turn (-a FILE ...) */
  char *owns;       /* which of them were opened here */
  int nfds, nextfd; /* how many; the next one to read */
  int tail;         /* the last byte read from fd (-1: none yet) */
  int sep;          /* '\n' or '\0' */
  int regular;      /* a regular file: a read never waits */
  int eof;          /* read returned 0 */
  char *buf;        /* unread bytes are buf[pos, len) */
  size_t cap, pos, len;
  /* a record that cannot be read (too long) is raised only after the
     records before it: 'defer' is set as it is raised (1: they end at
     the last separator buffered, 2: at pos), 'failmsg' keeps the
     message until they are all done */
  int defer;
  char *failmsg;
  lua_Integer count;          /* records read so far */
  lua_Integer batches;        /* batches handed out in this run */
  lua_Integer ahead;          /* records handed out, not yet taken back */
  lua_Integer *first;         /* ring of LPAR_AHEAD: first record of a batch */
  int *size;                  /* ring of LPAR_AHEAD: records in a batch */
  off_t start;                /* a regular file: where the items begin in it */
  lua_Integer shardk, shardn; /* keep the records numbered k mod n */
  lua_Integer raw;            /* records of the input seen (all shards) */
  int skipping;  /* inside a record of another shard: drop up to its end */
  size_t scan;   /* buf[pos, scan) is kept records; [scan, len) unsorted */
  size_t clear;  /* buf[pos, pos + clear) holds no separator */
  size_t sifted; /* buf[scan, scan + sifted) holds no separator (sift) */
  /* A regular file that the workers read themselves: a batch is a byte
     range of it, and the reader keeps no more than a buffer of it: the
     start of a record longer than that is dropped, counted in 'held'. */
  int ranges;
  int rangefd;      /* what the workers read (a dup of fd, kept open) */
  off_t base;       /* ranges: the file offset of buf[0] */
  size_t held;      /* ranges: bytes of the record at buf[pos] before it */
  size_t inflight;  /* bytes of the batch strings in 'blocks' (see
                       LPAR_INFLIGHT) */
  size_t limit;     /* most bytes of one record (--max-memory), 0: none */
  size_t nextcheck; /* ranges: the size of a record that is checked next */
} Reader;

/* The fd that batches given as byte ranges are read from (a worker
   inherits it at fork), or -1. */
static int rangefd = -1;

/* Raise if a signal asks to stop or the output is gone. */
static void checkstop(lua_State *L) {
  int sig = stopsignal();
  if (sig) {
    lua_pushstring(L, sig == SIGTERM  ? "terminated"
                      : sig == SIGHUP ? "hangup"
                                      : "interrupted");
    lpar_kind_raise(L, LPAR_KINDCODE(LPAR_KINTERRUPTED, sig));
  }
  if (failed())
    outerror(L);
}

/*
** Wait until the input can be read: 1, or 0 if 'idlems' >= 0 passed
** first. Wakes every 100 ms to look for signals, which a run keeps
** blocked (pending) while it is not polling.
*/
static int waitinput(lua_State *L, Reader *r, int idlems) {
  long long end = now() + (long long)idlems * 1000000LL;
  for (;;) {
    struct pollfd p;
    int ms = 100, rc;
    checkstop(L);
    if (idlems >= 0) {
      long long left = (end - now()) / 1000000LL;
      if (left <= 0)
        return 0;
      if (left < ms)
        ms = (int)left;
    }
    p.fd = r->fd;
    p.events = POLLIN;
    p.revents = 0;
    rc = poll(&p, 1, ms);
    if (rc > 0)
      return 1; /* data, end of file or an error: read() tells */
    if (rc < 0 && errno != EINTR)
      raisef(L, "cannot poll the input: %s", strerror(errno));
  }
}

/*
** With --shard K/N: drop from buf[scan, len) the complete records that
** are not this shard's (input records K, K+N, K+2N...), moving the kept
** ones down, so that the rest of the reader sees this shard's records
** only. At the end of the input a last record without separator counts.
** The start of another shard's record is dropped at once, and the rest
** of it as it comes ('skipping'): a long one is never held whole.
*/
static void sift(Reader *r) {
  char *p = r->buf + r->scan, *end = r->buf + r->len, *w = p;
  size_t known = r->sifted; /* the start of a kept record, looked at */
  r->sifted = 0;
  for (;;) {
    char *e = memchr(p + known, r->sep, (size_t)(end - p) - known);
    size_t n;
    known = 0;
    if (r->skipping) { /* the rest of a record counted already */
      p = e != NULL ? e + 1 : end;
      r->skipping = e == NULL && !r->eof;
      if (e == NULL)
        break;
      continue;
    }
    if (e == NULL) {
      if (p == end)
        break;
      if (!r->eof) {
        if ((r->raw + 1) % r->shardn != r->shardk % r->shardn) {
          r->raw++; /* not this shard's: drop what came of it */
          r->skipping = 1;
          p = end;
        }
        else /* kept: not looked at again (a long one, in linear time) */
          r->sifted = (size_t)(end - p);
        break;
      }
      e = end - 1;
    }
    n = (size_t)(e + 1 - p);
    r->raw++;
    if (r->raw % r->shardn == r->shardk % r->shardn) {
      if (w != p)
        memmove(w, p, n);
      w += n;
    }
    p += n;
  }
  if (w != p)
    memmove(w, p, (size_t)(end - p));
  r->scan = (size_t)(w - r->buf);
  r->len = r->scan + (size_t)(end - p);
}

/* Lua strings of long records are in mappings of their own (cmdalloc). */
static int bigstrings;

#if !LPAR_LUAJIT
/* The allocator of the command's Lua state: Lua's own (realloc and
   free) for small blocks, a mapping for large ones (lpar_buf_realloc). LuaJIT
   keeps its own allocator. */
static void *cmdalloc(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud;
  return lpar_buf_realloc(p, p != NULL ? osize : 0, nsize);
}
#endif

/* Say how many bytes of batch strings r holds, for the workers forked
   from now on (the registry's LPAR_INFLIGHT). */
static void setinflight(lua_State *L, Reader *r, size_t n) {
  r->inflight = n;
  lua_pushinteger(L, (lua_Integer)n);
  lua_setfield(L, LUA_REGISTRYINDEX, LPAR_INFLIGHT);
}

/* MemAvailable of /proc/meminfo in bytes, or 0 if unknown. */
static size_t memavailable(void) {
  char line[256];
  unsigned long long kb = 0;
  FILE *f = fopen("/proc/meminfo", "re");
  if (f == NULL)
    return 0;
  while (fgets(line, sizeof line, f) != NULL)
    if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
      break;
  fclose(f);
  return kb > SIZE_MAX / 1024 ? SIZE_MAX : (size_t)kb * 1024;
}

/* VmSize and VmData of /proc/self/status in bytes (0 if unknown), in
   one reading. */
static void selfsizes(size_t *size, size_t *data) {
  char line[256];
  unsigned long long kb;
  FILE *f = fopen("/proc/self/status", "re");
  *size = *data = 0;
  if (f == NULL)
    return;
  while (fgets(line, sizeof line, f) != NULL) {
    size_t *to = strncmp(line, "VmSize:", 7) == 0   ? size
                 : strncmp(line, "VmData:", 7) == 0 ? data
                                                    : NULL;
    if (to != NULL) {
      kb = strtoull(line + 7, NULL, 10);
      *to = kb > SIZE_MAX / 1024 ? SIZE_MAX : (size_t)kb * 1024;
    }
  }
  fclose(f);
}

/* room that the workers and this process keep under an rlimit besides
   the records: their code, Lua heaps, stacks */
#define LPAR_RLIMITSLACK ((size_t)32 << 20)

/*
** The share of rlimit 'which' that is left for one record: 'used'
** bytes of it are taken (counted without the record's own buffer),
** and a record is held 'times' over.
*/
static size_t rlimitshare(int which, size_t used, size_t times) {
  struct rlimit rl;
  size_t cur;
  if (getrlimit(which, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
    return SIZE_MAX;
  cur = rl.rlim_cur > SIZE_MAX ? SIZE_MAX : (size_t)rl.rlim_cur;
  if (used > cur || cur - used < LPAR_RLIMITSLACK)
    return 0;
  return (cur - used - LPAR_RLIMITSLACK) / times;
}

/*
** The most bytes one record may take now, and why, given that this
** process holds 'here' bytes of it already. A worker holds a record
** twice while it makes it a Lua string, and this process may hold it
** once more: a record gets a third of the memory available (counting
** what it holds already). Under RLIMIT_AS and RLIMIT_DATA (which the
** workers inherit), what counts is the address space: a record read
** from a pipe or a device is held here in the buffer and as a string,
** then as a string and in the frame sent (whose buffer grows by
** doubling), and in its worker as the frame received and a string, so
** it gets a quarter of what is left under the limit; a record of a
** regular file (read by its worker) half of it. No more than
** --max-memory either.
*/
static size_t recordlimit(Reader *r, size_t here, const char **why) {
  size_t lim = SIZE_MAX, avail = memavailable(), share;
  size_t times = r->ranges ? 2 : 4, mine = r->cap >= LPAR_BUFMAP ? r->cap : 0;
  size_t size, data;
  selfsizes(&size, &data);
  *why = NULL;
  if (avail > 0 && (avail + here) / 3 < lim) {
    lim = (avail + here) / 3;
    *why = "a third of the memory available";
  }
  share = rlimitshare(RLIMIT_AS, size > mine ? size - mine : 0, times);
  if (share < lim) {
    lim = share;
    *why = r->ranges ? "half of the address space left under ulimit -v"
                     : "a quarter of the address space left under ulimit -v";
  }
  share = rlimitshare(RLIMIT_DATA, data > mine ? data - mine : 0, times);
  if (share < lim) {
    lim = share;
    *why = r->ranges ? "half of the data size left under ulimit -d"
                     : "a quarter of the data size left under ulimit -d";
  }
  if (r->limit > 0 && r->limit < lim) {
    lim = r->limit;
    *why = "--max-memory";
  }
  return lim;
}

/* The input line (or -0 record) number of the record being read: the
   one after those cut and those complete in the buffer. */
static lua_Integer recordno(Reader *r) {
  lua_Integer n = r->shardn > 1 ? r->raw : r->count;
  const char *p = r->buf + r->pos, *end = r->buf + r->scan;
  if (r->shardn == 1)
    while (p < end && (p = memchr(p, r->sep, (size_t)(end - p))) != NULL) {
      n++;
      p++;
    }
  return n + 1;
}

/* Raise: the record being read, 'size' bytes so far, may take 'lim'. */
static void toolong(lua_State *L, Reader *r, size_t size, size_t lim,
                    const char *why) {
  r->defer = 1;
  if (size > lim + 1) /* a file's is looked at in steps: said as a pipe's */
    size = lim + 1;
  raisef(L,
         "%s %I is too long: %I bytes read and no end yet, over the %I "
         "bytes one record may take (%s)",
         r->sep == '\n' ? "line" : "item", (LUAI_UACINT)recordno(r),
         (LUAI_UACINT)size, (LUAI_UACINT)lim, why);
}

/* Free r->buf. */
static void freebuf(Reader *r) {
  lpar_buf_realloc(r->buf, r->cap, 0);
  r->buf = NULL;
}

/*
** Resize r->buf to cap bytes, keeping its bytes: 0, or -1 with r->buf
** as it was. A long record's buffer is a mapping of its own (see
** lpar_buf_realloc) grown by mremap, which moves its pages without copying
** them: growing it to gigabytes takes no time and never holds it twice.
*/
static int resizebuf(Reader *r, size_t cap) {
  void *p = lpar_buf_realloc(r->buf, r->cap, cap);
  if (p == NULL)
    return -1;
  r->buf = p;
  r->cap = cap;
  return 0;
}

/*
** Make room in r->buf for one more byte; raises when out of memory or
** when the record in it outgrows recordlimit (the buffer then grows to
** that limit at most, so the record fails as it reaches it).
*/
static void grow(lua_State *L, Reader *r) {
  size_t cap = r->cap ? 2 * r->cap : LPAR_READSIZE, size = r->len - r->pos;
  const char *why = NULL;
  if (r->cap >= LPAR_READSIZE) {
    size_t lim = recordlimit(r, size, &why);
    if (size > lim)
      toolong(L, r, size, lim, why);
    if (cap > lim + 1)
      cap = lim + 1;
  }
  if (resizebuf(r, cap) != 0) {
    r->defer = 1;
    raisef(L, "%s %I is too long: not enough memory for its %I bytes",
           r->sep == '\n' ? "line" : "item", (LUAI_UACINT)recordno(r),
           (LUAI_UACINT)size);
  }
  lpar_buf_dontfork(r->buf, r->cap); /* no worker reads it */
}

/*
** With ranges: the buffer is full of one record's start (no separator
** in it): drop those bytes, counted in r->held, and check the record's
** size against recordlimit every few megabytes and as it reaches it.
*/
static int drop(lua_State *L, Reader *r) {
  if (!r->ranges || r->pos > 0 || r->len < r->cap ||
      memchr(r->buf, r->sep, r->len) != NULL)
    return 0;
  r->held += r->len;
  r->base += (off_t)r->len;
  r->len = r->scan = r->clear = 0;
  if (r->held >= r->nextcheck) {
    const char *why;
    size_t lim = recordlimit(r, 0, &why);
    if (r->held > lim)
      toolong(L, r, r->held, lim, why);
    /* looked at again a little further on, and at the limit at most */
    r->nextcheck =
        r->held +
        (r->held / 8 > ((size_t)4 << 20) ? r->held / 8 : ((size_t)4 << 20));
    if (r->nextcheck > lim + 1)
      r->nextcheck = lim + 1;
  }
  return 1;
}

/*
** The end of one source with more to follow: end its last record if its
** last byte was not a separator, and go on with the next source.
*/
static void nextsource(lua_State *L, Reader *r) {
  if (r->tail >= 0 && r->tail != r->sep) {
    if (r->len == r->cap)
      grow(L, r);
    r->buf[r->len++] = (char)r->sep;
  }
  if (r->own)
    close(r->fd);
  r->own = r->owns[r->nextfd];
  r->fd = r->fds[r->nextfd];
  r->fds[r->nextfd++] = -1;
  r->tail = -1;
}

/* Read more input into r->buf, moving the unread bytes to its start
   (and growing it if they fill it). */
static void fill(lua_State *L, Reader *r) {
  ssize_t k;
  checkstop(L); /* an endless record must not keep a signal waiting */
  if (r->pos > 0) {
    memmove(r->buf, r->buf + r->pos, r->len - r->pos);
    r->len -= r->pos;
    r->scan -= r->pos;
    r->base += (off_t)r->pos;
    r->pos = 0;
  }
  if (r->len == r->cap && !drop(L, r))
    grow(L, r);
  do
    k = read(r->fd, r->buf + r->len,
             r->cap - r->len < LPAR_READMAX ? r->cap - r->len : LPAR_READMAX);
  while (k == -1 && errno == EINTR && !stopsignal());
  if (k < 0) {
    checkstop(L);
    raisef(L, "cannot read the items: %s", strerror(errno));
  }
  if (k > 0)
    r->tail = (unsigned char)r->buf[r->len + (size_t)k - 1];
  r->len += (size_t)k;
  if (k == 0) {
    if (r->nextfd < r->nfds)
      nextsource(L, r);
    else
      r->eof = 1;
  }
  if (r->shardn > 1) {
    sift(r);
    /* a record at buf[pos] with no end yet is this shard's, kept where it
       is, unless sift dropped it */
    if (r->clear > r->len - r->pos)
      r->clear = r->len - r->pos;
  }
  else
    r->scan = r->len;
}

/* Whether the input has data now (never waits). */
static int ready(Reader *r) {
  struct pollfd p;
  p.fd = r->fd;
  p.events = POLLIN;
  p.revents = 0;
  return r->regular || poll(&p, 1, 0) > 0;
}

/*
** A buffer that grew for a long record goes back to LPAR_READSIZE once
** the record is taken out of it (pushed as a string), so that the
** record is not held twice here while it is sent.
*/
static void shrink(Reader *r) {
  size_t rest = r->len - r->pos;
  char *p;
  if (r->cap <= 4 * LPAR_READSIZE || rest > LPAR_READSIZE / 2)
    return;
  p = malloc(LPAR_READSIZE);
  if (p == NULL)
    return; /* kept as it is */
  memcpy(p, r->buf + r->pos, rest);
  freebuf(r);
  r->buf = p;
  r->cap = LPAR_READSIZE;
  r->scan -= r->pos;
  r->base += (off_t)r->pos;
  r->len = rest;
  r->pos = 0;
}

/* pushbytes(s, n): the Lua string of the n bytes at s (a light
   userdata), in a protected call (see pushbatch). */
static int pushbytes(lua_State *L) {
  lua_pushlstring(L, lua_touserdata(L, 1), (size_t)lua_tointeger(L, 2));
  return 1;
}

/*
** Push the n bytes at s, the batch of records from r->count + 1 on, as
** a string. A long record that the memory cannot hold as a string
** fails naming it and its size, as a record over recordlimit does.
*/
static void pushbatch(lua_State *L, Reader *r, const char *s, size_t n) {
  int rc;
  if (n < ((size_t)1 << 20)) {
    lua_pushlstring(L, s, n);
    return;
  }
  lua_pushcfunction(L, pushbytes);
  lua_pushlightuserdata(L, (void *)s);
  lua_pushinteger(L, (lua_Integer)n);
  rc = lua_pcall(L, 2, 1, 0);
  if (rc == LUA_ERRMEM) {
    r->defer = 2;
    raisef(L, "%s %I is too long: not enough memory for its %I bytes",
           r->sep == '\n' ? "line" : "item", (LUAI_UACINT)(r->count + 1),
           (LUAI_UACINT)n);
  }
  if (rc != LUA_OK)
    lua_error(L);
}

/* Push the byte range {offset, length} of a batch (see l_split). */
static void pushrange(lua_State *L, off_t at, size_t len) {
  lua_createtable(L, 2, 0);
  lua_pushinteger(L, (lua_Integer)at);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, (lua_Integer)len);
  lua_rawseti(L, -2, 2);
}

/*
** Cut the next batch from the buffer (reading more first while less than
** a batch is buffered and more is at hand): up to 'want' complete records
** within LPAR_BATCHBYTES, at least one. Pushes the block (its bytes, or
** with ranges its byte range) and its record count, notes it in the ring
** and in the table at 'blocks', and returns 1; returns 0 if no complete
** record is buffered.
*/
static int cut(lua_State *L, Reader *r, int blocks, lua_Integer want) {
  char *s, *p, *end;
  lua_Integer k = 0, slot;
  if (want > LPAR_AHEAD)
    want = LPAR_AHEAD;
  while (!r->eof && r->len - r->pos < LPAR_BATCHBYTES && ready(r))
    fill(L, r);
  s = p = r->buf + r->pos;
  end = r->buf + r->len;
  if (r->held > 0 && p == end && r->eof)
    k = 1; /* a last record without separator, all of it dropped */
  while (k < want && p < end) {
    char *e = memchr(k == 0 ? p + r->clear : p, r->sep,
                     (size_t)(end - p) - (k == 0 ? r->clear : 0));
    if (e == NULL) {
      if (k == 0)
        r->clear = (size_t)(end - p);
      if (!r->eof || (k > 0 && end - s > LPAR_BATCHBYTES))
        break;
      e = end - 1; /* a last record without separator */
    }
    else if (k > 0 && e + 1 - s > LPAR_BATCHBYTES)
      break;
    p = e + 1;
    k++;
  }
  if (k == 0)
    return 0;
  if (r->ranges)
    pushrange(L, r->base + (off_t)r->pos - (off_t)r->held,
              r->held + (size_t)(p - s));
  else {
    size_t n = (size_t)(p - s);
    /* a long record alone goes without its separator, so that split
       takes it as it is, not a copy: the worker holds it once */
    if (k == 1 && n >= ((size_t)1 << 20) && p[-1] == (char)r->sep &&
        !(r->sep == '\n' && p[-2] == '\r'))
      n--;
    pushbatch(L, r, s, n);
    if (bigstrings)
      lpar_buf_dontfork(lua_tostring(L, -1), n); /* sent, never read */
  }
  r->held = r->nextcheck = r->clear = 0;
  r->pos += (size_t)(p - s);
  shrink(r);
  r->batches++;
  slot = r->batches % LPAR_AHEAD;
  r->first[slot] = r->count + 1;
  r->size[slot] = (int)k;
  r->count += k;
  r->ahead += k;
  if (!r->ranges) /* held in 'blocks' until taken */
    setinflight(L, r, r->inflight + lua_rawlen(L, -1));
  lua_pushvalue(L, -1);
  lua_rawseti(L, blocks, r->batches);
  lua_pushinteger(L, k);
  return 1;
}

/*
** A record could not be read (its message given): the records buffered
** before it are still cut, and the message is raised once they are done
** (see reader_next); nothing more is read.
*/
static void deferfail(Reader *r, const char *msg) {
  size_t keep = r->pos;
  if (r->defer == 1) {
    const char *e = memrchr(r->buf + r->pos, r->sep, r->scan - r->pos);
    if (e != NULL)
      keep = (size_t)(e - r->buf) + 1;
  }
  r->defer = 0;
  r->len = r->scan = keep;
  r->held = r->clear = 0;
  r->eof = 1;
  r->failmsg = strdup(msg);
}

/* nextbatch(r, want, blocks, pending): reader_next's work, in a
   protected call: what reader_next returns. */
static int nextbatch(lua_State *L) {
  Reader *r = lua_touserdata(L, 1);
  lua_Integer want = lua_tointeger(L, 2);
  for (;;) {
    if (cut(L, r, 3, want))
      return 2;
    if (r->eof)
      return 0;
    if (!ready(r)) {
      lua_pushvalue(L, 4);
      lua_pushinteger(L, r->fd);
      return 2;
    }
    fill(L, r);
  }
}

/*
** The items iterator of the CLI's job (a batched one): (want) -> the next
** batch of up to 'want' records and how many it holds, or nothing at the
** end of the input. It never waits: with no complete record at hand
** it returns lpar.pending (upvalue 2) and the input's fd, and the engine
** asks again once the input is readable; with LPAR_AHEAD records out, it
** returns lpar.pending alone, and is asked again once a result is taken.
*/
static int reader_next(lua_State *L) {
  Reader *r = lua_touserdata(L, lua_upvalueindex(1));
  lua_Integer want = luaL_optinteger(L, 1, 1);
  lua_settop(L, 0);
  lua_getiuservalue(L, lua_upvalueindex(1), 1); /* 1: blocks */
  if (r->fd < 0)
    return 0;
  checkstop(L);
  if (r->ahead >= LPAR_AHEAD || (r->failmsg != NULL && r->ahead > 0)) {
    lua_pushvalue(L, lua_upvalueindex(2));
    return 1;
  }
  if (r->failmsg != NULL) { /* the records before it are all done */
    lua_pushstring(L, r->failmsg);
    free(r->failmsg);
    r->failmsg = NULL;
    return lua_error(L);
  }
  r->defer = 0;
  lua_pushcfunction(L, nextbatch);
  lua_pushlightuserdata(L, r);
  lua_pushinteger(L, want);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, lua_upvalueindex(2));
  if (lua_pcall(L, 4, LUA_MULTRET, 0) == LUA_OK)
    return lua_gettop(L) - 1;
  if (!r->defer || !lua_isstring(L, -1))
    return lua_error(L);
  deferfail(r, lua_tostring(L, -1));
  if (r->failmsg == NULL) /* no memory to keep it: raised now */
    return lua_error(L);
  lua_settop(L, 0);
  lua_pushinteger(L, want);
  return reader_next(L);
}

static Reader *checkreader(lua_State *L) {
  return luaL_checkudata(L, 1, READERMT);
}

/* reader:wait() -> whether a record is there: waits for one or for the
   end of the input (once, before the run starts). */
static int reader_wait(lua_State *L) {
  Reader *r = checkreader(L);
  r->batches = 0;
  r->ahead = 0;
  lua_newtable(L);
  lua_setiuservalue(L, 1, 1); /* blocks of the run */
  while (r->fd >= 0) {
    char *s = r->buf + r->pos;
    size_t avail = r->len - r->pos;
    if (((avail > 0 || r->held > 0) && r->eof) ||
        memchr(s + r->clear, r->sep, avail - r->clear) != NULL) {
      lua_pushboolean(L, 1);
      return 1;
    }
    r->clear = avail;
    if (r->eof)
      break;
    if (!ready(r))
      waitinput(L, r, -1);
    fill(L, r);
  }
  lua_pushboolean(L, 0);
  return 1;
}

/* reader:take(i) -> first, n, block: batch i of this run (its first
   record's number, its record count, its bytes), forgotten here. */
static int reader_take(lua_State *L) {
  Reader *r = checkreader(L);
  lua_Integer i = luaL_checkinteger(L, 2), slot = i % LPAR_AHEAD;
  luaL_argcheck(L, i >= 1 && i <= r->batches, 2, "no such batch");
  r->ahead -= r->size[slot];
  lua_pushinteger(L, r->first[slot]);
  lua_pushinteger(L, r->size[slot]);
  lua_getiuservalue(L, 1, 1);
  lua_rawgeti(L, -1, i);
  if (lua_type(L, -1) == LUA_TSTRING) { /* no longer in flight */
    assert(lua_rawlen(L, -1) <= r->inflight);
    setinflight(L, r, r->inflight - lua_rawlen(L, -1));
  }
  lua_pushnil(L);
  lua_rawseti(L, -3, i);
  lua_remove(L, -2); /* pop blocks */
  return 3;
}

/* overdue() -> whether, in a worker, lpar asks the batch it runs to end
   early (see lpar_overdue) */
static int l_overdue(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) /* overdue(k): k records of it are done */
    lpar_worker_progress(luaL_checkinteger(L, 1));
  lua_pushboolean(L, lpar_overdue(L));
  return 1;
}

/* reader:skip(n) -> skipped: read past n records (fewer at the end). */
static int reader_skip(lua_State *L) {
  Reader *r = checkreader(L);
  lua_Integer n = luaL_checkinteger(L, 2), k = 0;
  while (k < n && r->fd >= 0) {
    char *s = r->buf + r->pos;
    char *e = memchr(s + r->clear, r->sep, r->len - r->pos - r->clear);
    if (e != NULL) {
      r->pos += (size_t)(e - s) + 1;
      r->held = r->nextcheck = r->clear = 0;
      k++;
      r->count++; /* counted at once: a message may name the next one */
    }
    else if (r->eof) {
      if (r->pos < r->len || r->held > 0) {
        k++;
        r->count++;
      }
      r->pos = r->len;
      r->held = r->clear = 0;
      break;
    }
    else {
      r->clear = r->len - r->pos;
      if (!ready(r))
        waitinput(L, r, -1);
      fill(L, r);
    }
  }
  lua_pushinteger(L, k);
  return 1;
}

/* reader:fileid() -> "device:inode" of a regular file or a pipe, or nil */
static int reader_fileid(lua_State *L) {
  Reader *r = checkreader(L);
  struct stat st;
  if (r->fd < 0 || r->nfds > 1 || fstat(r->fd, &st) != 0 || !pushfileid(L, &st))
    luaL_pushfail(L);
  return 1;
}

/*
** reader:identity(n) -> size, hash | nil: for a regular file, its size
** from where the items begin and the hash of its first n bytes (nil for
** the hash if it is shorter); nil for a pipe or a terminal. Reads with
** pread: the reader's position does not move.
*/
static int reader_identity(lua_State *L) {
  Reader *r = checkreader(L);
  lua_Integer n = luaL_checkinteger(L, 2), done = 0;
  struct stat st;
  uint64_t h = FNVSTART;
  char *buf;
  luaL_argcheck(L, n >= 0, 2, "must not be negative");
  if (r->fd < 0 || !r->regular || r->nfds > 1 || fstat(r->fd, &st) != 0)
    return 0;
  lua_pushinteger(L, (lua_Integer)(st.st_size - r->start));
  buf = lua_newuserdatauv(L, 65536, 0);
  while (done < n) {
    size_t want = n - done < 65536 ? (size_t)(n - done) : 65536;
    ssize_t k;
    do
      k = pread(r->fd, buf, want, r->start + (off_t)done);
    while (k == -1 && errno == EINTR);
    if (k < 0)
      return raisef(L, "cannot read the items: %s", strerror(errno));
    if (k == 0) {
      lua_pop(L, 1);
      luaL_pushfail(L);
      return 2;
    }
    h = fnv(h, buf, (size_t)k);
    done += k;
  }
  lua_pop(L, 1);
  pushhash(L, h);
  return 2;
}

/*
** reader:partial(size) -> nil if the first 'size' bytes of a regular
** file of items end with a separator (or size is 0); else the number of
** separators in them: the records before the last one, which they cut
** short. Reads with pread: the reader's position does not move.
*/
static int reader_partial(lua_State *L) {
  Reader *r = checkreader(L);
  lua_Integer size = luaL_checkinteger(L, 2), done = 0, seps = 0;
  char *buf;
  luaL_argcheck(L, size >= 0, 2, "must not be negative");
  if (r->fd < 0 || !r->regular || r->nfds > 1 || size == 0)
    return 0;
  buf = lua_newuserdatauv(L, 65536, 0);
  while (done < size) {
    size_t want = size - done < 65536 ? (size_t)(size - done) : 65536;
    const char *p, *end;
    ssize_t k;
    do
      k = pread(r->fd, buf, want, r->start + (off_t)done);
    while (k == -1 && errno == EINTR);
    if (k < 0)
      return raisef(L, "cannot read the items: %s", strerror(errno));
    if (k == 0)
      break;
    for (p = buf, end = buf + k;
         (p = memchr(p, r->sep, (size_t)(end - p))) != NULL; p++)
      seps++;
    done += k;
    if (done == size && buf[k - 1] == (char)r->sep)
      return 0;
  }
  lua_pushinteger(L, seps);
  return 1;
}

/* reader:limit(bytes): a record may take at most that many bytes (with
   --max-memory: a worker could not hold a longer one) */
static int reader_limit(lua_State *L) {
  Reader *r = checkreader(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 0, 2, "must not be negative");
  r->limit = (size_t)n;
  return 0;
}

/* reader:ranges() -> whether its batches are byte ranges that the
   workers read themselves (a regular file, alone, without --shard) */
static int reader_ranges(lua_State *L) {
  lua_pushboolean(L, checkreader(L)->ranges);
  return 1;
}

/* reader:regular() -> whether no read of its input can wait: regular
   files only, or the records given as text */
static int reader_regular(lua_State *L) {
  Reader *r = checkreader(L);
  lua_pushboolean(L, r->regular || (r->eof && r->nfds == 0));
  return 1;
}

/* reader:count() -> records read so far */
static int reader_count(lua_State *L) {
  lua_pushinteger(L, checkreader(L)->count);
  return 1;
}

/* reader:items(pending) -> the iterator function; 'pending' is what it
   returns for "no item yet" (lpar.pending) */
static int reader_items(lua_State *L) {
  checkreader(L);
  luaL_checkany(L, 2);
  lua_settop(L, 2);
  lua_pushcclosure(L, reader_next, 2);
  return 1;
}

/* Close the reader's sources and free its buffers (again: no-op). */
static void freereader(Reader *r) {
  int i;
  if (r->own && r->fd >= 0)
    close(r->fd);
  r->fd = -1;
  if (r->ranges && r->rangefd >= 0) {
    if (rangefd == r->rangefd)
      rangefd = -1;
    close(r->rangefd);
    r->rangefd = -1;
    r->ranges = 0;
  }
  for (i = r->nextfd; i < r->nfds; i++)
    if (r->owns[i] && r->fds[i] >= 0)
      close(r->fds[i]);
  r->nfds = r->nextfd = 0;
  free(r->fds);
  free(r->owns);
  r->fds = NULL;
  r->owns = NULL;
  freebuf(r);
  free(r->failmsg);
  r->failmsg = NULL;
  free(r->first);
  free(r->size);
  r->buf = NULL;
  r->first = NULL;
  r->size = NULL;
  r->cap = r->pos = r->len = r->scan = 0;
}

static int reader_close(lua_State *L) {
  Reader *r = checkreader(L);
  setinflight(L, r, 0);
  freereader(r);
  return 0;
}

/* Open one source of items: path, or stdin for NULL or "-". The fd,
   or -1 with "cannot open|read <path>: <why>" pushed. */
static int opensource(lua_State *L, const char *path, struct stat *st) {
  int fd = 0;
  if (path != NULL && strcmp(path, "-") != 0) {
    do
      fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd == -1 && errno == EINTR);
    if (fd == -1) {
      lua_pushfstring(L, "cannot open %s: %s", path, strerror(errno));
      return -1;
    }
  }
  if (fstat(fd, st) == 0 && S_ISDIR(st->st_mode)) {
    if (fd != 0)
      close(fd);
    lua_pushfstring(L, "cannot read %s: %s", path ? path : "stdin",
                    strerror(EISDIR));
    return -1;
  }
  return fd;
}

/*
** open(paths, nul [, k, n [, text [, ranges]]]) -> reader | nil,
** message: the records of a file (paths a string), of several in turn
** (a table; "-" is stdin), or of stdin (paths nil); with text, the
** records of text. With k and n (1 <= k <= n), only records k, k+n,
** k+2n... of them. With ranges, the batches of one regular file (no
** shards) are byte ranges of it, read by the workers (see l_split).
*/
static int l_open(lua_State *L) {
  int nul = lua_toboolean(L, 2), fd, i, n, ranges = lua_toboolean(L, 6);
  lua_Integer k = luaL_optinteger(L, 3, 1), shards = luaL_optinteger(L, 4, 1);
  size_t tlen = 0;
  const char *text = luaL_optlstring(L, 5, NULL, &tlen);
  struct stat st;
  Reader *r;
  luaL_argcheck(L, shards >= 1 && k >= 1 && k <= shards, 3, "bad shard");
  n = lua_istable(L, 1) ? (int)luaL_len(L, 1) : 1;
  luaL_argcheck(L, n >= 1, 1, "no source");
  r = lua_newuserdatauv(L, sizeof(Reader), 1);
  memset(r, 0, sizeof *r);
  r->fd = r->rangefd = -1;
  luaL_setmetatable(L, READERMT); /* __gc frees what follows */
  r->first = malloc(LPAR_AHEAD * sizeof *r->first);
  r->size = malloc(LPAR_AHEAD * sizeof *r->size);
  r->buf =
      lpar_buf_realloc(NULL, 0, tlen > LPAR_READSIZE ? tlen : LPAR_READSIZE);
  r->fds = malloc((size_t)n * sizeof *r->fds);
  r->owns = malloc((size_t)n);
  if (r->first == NULL || r->size == NULL || r->buf == NULL || r->fds == NULL ||
      r->owns == NULL)
    return raisef(L, "not enough memory");
  r->cap = tlen > LPAR_READSIZE ? tlen : LPAR_READSIZE;
  r->sep = nul ? '\0' : '\n';
  r->shardk = k;
  r->shardn = shards;
  r->tail = -1;
  if (text != NULL) { /* nothing to read: the records are all there */
    fd = opensource(L, "/dev/null", &st);
    if (fd < 0)
      goto fail;
    r->fd = fd;
    r->own = 1;
    memcpy(r->buf, text, tlen);
    r->len = tlen;
    r->eof = 1;
    if (r->shardn > 1)
      sift(r);
  }
  else {
    r->regular = 1;
    for (i = 0; i < n; i++) {
      const char *path = NULL;
      if (lua_istable(L, 1)) {
        lua_geti(L, 1, i + 1);
        path = lua_tostring(L, -1);
        lua_pop(L, 1); /* the table keeps the string */
        if (path == NULL)
          return luaL_argerror(L, 1, "paths must be strings");
      }
      else
        path = luaL_optstring(L, 1, NULL);
      fd = opensource(L, path, &st);
      if (fd < 0)
        goto fail;
      r->fds[r->nfds] = fd;
      r->owns[r->nfds++] = fd != 0;
      if (!S_ISREG(st.st_mode))
        r->regular = 0;
      if (i == 0 && n == 1 && S_ISREG(st.st_mode) &&
          (r->start = lseek(fd, 0, SEEK_CUR)) < 0)
        r->start = 0;
    }
    r->own = r->owns[0];
    r->fd = r->fds[0];
    r->fds[0] = -1;
    r->nextfd = 1;
    r->base = r->start;
    /* a dup that stays open for the workers (stdin is /dev/null there) */
    if (ranges && n == 1 && r->regular && r->shardn == 1 &&
        (r->rangefd = fcntl(r->fd, F_DUPFD_CLOEXEC, 3)) >= 0) {
      r->ranges = 1;
      rangefd = r->rangefd;
    }
  }
  r->scan = r->len;
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);
  return 1;
fail:
  freereader(r);
  luaL_pushfail(L);
  lua_insert(L, -2);
  return 2;
}

#define BOXMT "lpar.box"

/* __gc of a box holding a malloc'd buffer (or NULL) */
static int freebox(lua_State *L) {
  char **box = lua_touserdata(L, 1);
  free(*box);
  *box = NULL;
  return 0;
}

/*
** Read the byte range {offset, length} at 'idx' of the items file into
** a new buffer (free it); raises if it cannot be read whole.
*/
static char *readrange(lua_State *L, int idx, size_t *len) {
  lua_Integer at, n;
  size_t done = 0;
  char *buf;
  lua_rawgeti(L, idx, 1);
  lua_rawgeti(L, idx, 2);
  at = lua_tointeger(L, -2);
  n = lua_tointeger(L, -1);
  lua_pop(L, 2);
  if (rangefd < 0 || at < 0 || n < 0 || (unsigned long long)n > SIZE_MAX)
    raisef(L, "bad batch: no items file to read %I bytes at %I from",
           (LUAI_UACINT)n, (LUAI_UACINT)at);
  buf = malloc(n > 0 ? (size_t)n : 1);
  if (buf == NULL)
    raisef(L, "not enough memory for a batch of %I bytes", (LUAI_UACINT)n);
  while (done < (size_t)n) {
    ssize_t k =
        pread(rangefd, buf + done, (size_t)n - done, (off_t)at + (off_t)done);
    if (k > 0)
      done += (size_t)k;
    else if (k == 0 || errno != EINTR) {
      int err = k == 0 ? 0 : errno;
      free(buf);
      raisef(L, "cannot read the items at byte %I: %s",
             (LUAI_UACINT)(at + (lua_Integer)done),
             err ? strerror(err) : "the file is shorter than it was");
    }
  }
  *len = (size_t)n;
  return buf;
}

/*
** split(block, nul [, t]) -> t, n: in a worker, the n records of a
** batch, each without its separator (and a CR before a newline), in t[1]
** to t[n] (a new table if t is not given). A block is the batch's bytes
** or a byte range of the items file, {offset, length}, read here with
** pread: the records are made from one buffer that is freed at once, so
** a record costs at most twice its size.
*/
static int l_split(lua_State *L) {
  size_t len;
  char *range = NULL;
  const char *s, *end;
  int sep = lua_toboolean(L, 2) ? '\0' : '\n';
  lua_Integer k = 0;
  if (lua_istable(L, 3))
    lua_settop(L, 3);
  else {
    lua_settop(L, 2);
    lua_createtable(L, 64, 0);
  }
  if (lua_istable(L, 1)) {
    /* the pushes below may raise (memory): the buffer goes in a box */
    char **box = lua_newuserdatauv(L, sizeof(char *), 0);
    *box = NULL;
    if (luaL_newmetatable(L, BOXMT)) {
      lua_pushcfunction(L, freebox);
      lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    range = *box = readrange(L, 1, &len);
    lua_insert(L, 3); /* the box stays below t */
    s = range;
  }
  else
    s = luaL_checklstring(L, 1, &len);
  end = s + len;
  if (range == NULL && len > 0 && memchr(s, sep, len) == NULL) {
    /* one record, without separator (a long one, see cut): itself */
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, ++k);
    s = end;
  }
  while (s < end) {
    const char *e = memchr(s, sep, (size_t)(end - s));
    size_t n;
    if (e == NULL) /* the last record of the input, without separator */
      e = end;
    n = (size_t)(e - s);
    if (sep == '\n' && e < end && n > 0 && s[n - 1] == '\r')
      n--;
    lua_pushlstring(L, s, n);
    lua_rawseti(L, -2, ++k);
    s = e + 1;
  }
  if (range != NULL) {
    char **box = lua_touserdata(L, 3);
    free(*box);
    *box = NULL;
  }
  lua_pushinteger(L, k);
  return 2;
}

/* count(path, nul) -> number of records in a regular file, or nil */
static int l_count(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int sep = lua_toboolean(L, 2) ? '\0' : '\n', fd;
  struct stat st;
  lua_Integer n = 0;
  char last = (char)sep, *buf;
  ssize_t k;
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return 0;
  buf = malloc(1 << 20);
  if (buf == NULL || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    free(buf);
    close(fd);
    return 0;
  }
  for (;;) {
    const char *p = buf, *end;
    do
      k = read(fd, buf, 1 << 20);
    while (k == -1 && errno == EINTR);
    if (k <= 0)
      break;
    for (end = buf + k; (p = memchr(p, sep, (size_t)(end - p))) != NULL; p++)
      n++;
    last = buf[k - 1];
  }
  free(buf);
  close(fd);
  if (k < 0)
    return 0;
  lua_pushinteger(L, n + (last != (char)sep));
  return 1;
}

/* ---- odds and ends ---- */

/* now() -> seconds on the monotonic clock */
static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)now() * 1e-9);
  return 1;
}

/* clock() -> seconds since the epoch (wall clock), with a fraction */
static int l_clock(lua_State *L) {
  struct timespec ts;
  if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
    return raisef(L, "cannot read the clock: %s", strerror(errno));
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* cpus() -> the number of CPUs online (at least 1) */
static int l_cpus(lua_State *L) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* size(s) -> bytes | nil, why: a --max-memory value, read as the
   module reads max_memory (lpar_opts_parsesize); 'why' is like "is not a
   size (expected ...)" */
static int l_size(lua_State *L) {
  size_t bytes;
  const char *why = lpar_opts_parsesize(luaL_checkstring(L, 1), &bytes);
  if (why != NULL) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s (expected %s)", why, LPAR_SIZEHINT);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)bytes);
  return 1;
}

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* isolate(): in a worker, send what the script prints to stderr, so it
   cannot mix with the results, and read stdin from /dev/null, so it cannot
   take the parent's items; SIGXFSZ is as the caller of lpar had it. */
static int l_isolate(lua_State *L) {
  int fd;
  (void)L;
  if (xfszsaved)
    sigaction(SIGXFSZ, &oldxfsz, NULL);
  if (out.logfd >= 0) { /* the parent's, with its lock */
    close(out.logfd);
    out.logfd = -1;
  }
  fflush(stdout);
  dup2(2, 1);
  fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd > 0) {
    dup2(fd, 0);
    close(fd);
  }
  return 0;
}

static const luaL_Reg readermethods[] = {{"wait", reader_wait},
                                         {"take", reader_take},
                                         {"skip", reader_skip},
                                         {"count", reader_count},
                                         {"items", reader_items},
                                         {"fileid", reader_fileid},
                                         {"identity", reader_identity},
                                         {"partial", reader_partial},
                                         {"limit", reader_limit},
                                         {"ranges", reader_ranges},
                                         {"regular", reader_regular},
                                         {"close", reader_close},
                                         {NULL, NULL}};

static const luaL_Reg helpers[] = {{"signals", l_signals},
                                   {"caught", l_caught},
                                   {"startoutput", l_startoutput},
                                   {"write", l_write},
                                   {"writeln", l_writeln},
                                   {"endlines", l_endlines},
                                   {"log", l_log},
                                   {"mark", l_mark},
                                   {"redirect", l_redirect},
                                   {"openjoblog", l_openjoblog},
                                   {"openwriter", l_openwriter},
                                   {"joblog", l_joblog},
                                   {"markers", l_markers},
                                   {"checkmarks", l_checkmarks},
                                   {"clock", l_clock},
                                   {"fileid", l_fileid},
                                   {"filetype", l_filetype},
                                   {"hash", l_hash},
                                   {"report", l_report},
                                   {"bar", l_bar},
                                   {"finish", l_finish},
                                   {"open", l_open},
                                   {"count", l_count},
                                   {"split", l_split},
                                   {"overdue", l_overdue},
                                   {"now", l_now},
                                   {"isatty", l_isatty},
                                   {"cpus", l_cpus},
                                   {"size", l_size},
                                   {"isolate", l_isolate},
                                   {NULL, NULL}};

#if LUA_VERSION_NUM < 503
int luaopen_compat53_string(lua_State *L);
int luaopen_compat53_table(lua_State *L);
int luaopen_compat53_utf8(lua_State *L);

/* Before 5.3: lua-compat53's string, table and utf8 libraries, for
   lpar.cli alone (require "lpar.compat53.string" ...): the user's
   globals stay those of the Lua lpar runs on. */
static void opencompat(lua_State *L) {
  static const luaL_Reg libs[] = {
      {"lpar.compat53.string", luaopen_compat53_string},
      {"lpar.compat53.table", luaopen_compat53_table},
      {"lpar.compat53.utf8", luaopen_compat53_utf8},
      {NULL, NULL}};
  const luaL_Reg *l;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  for (l = libs; l->name != NULL; l++) {
    lua_pushcfunction(L, l->func);
    lua_setfield(L, -2, l->name);
  }
  lua_pop(L, 2); /* pop preload, package */
}
#else
#define opencompat(L) ((void)(L))
#endif

/* Push the table of C helpers that lpar.cli gets. */
static void pushhelpers(lua_State *L) {
  if (luaL_newmetatable(L, READERMT)) {
    luaL_newlib(L, readermethods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, reader_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, helpers);
  lua_pushliteral(L, LPAR_VERSION " (" LPAR_LUANAME ")");
  lua_setfield(L, -2, "version");
}

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL)
    msg =
        lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* lpar --worker [-j N]: the agent of a host (agent.h); N defaults to the
   machine's CPUs. */
static int agentmain(lua_State *L, int argc, char **argv) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  int i;
  for (i = 2; i < argc; i++) {
    char *end;
    if ((strcmp(argv[i], "-j") == 0 || strcmp(argv[i], "--jobs") == 0) &&
        i + 1 < argc) {
      errno = 0;
      n = strtol(argv[++i], &end, 10);
      if (errno != 0 || *end != '\0' || end == argv[i] || n < 1 ||
          n > LPAR_MAXWORKERS) {
        fprintf(stderr, "lpar --worker: -j wants 1 to %d workers, not '%s'\n",
                LPAR_MAXWORKERS, argv[i]);
        return 2;
      }
    }
    else {
      fprintf(stderr,
              "lpar --worker: unknown argument '%s' (usage: lpar "
              "--worker [-j N])\n",
              argv[i]);
      return 2;
    }
  }
  if (n < 1)
    n = 1;
  return lpar_agent_run(L, (int)n);
}

/*
** Stack: argc, argv. Opens the libraries and lpar (with the global
** 'parallel'), loads the built-in lpar.cli and returns the exit status
** of its main(argv, helpers).
*/
static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  const char *src;
  size_t len;
  int i;
  luaL_openlibs(L);
  lpar_openlib(L);
  opencompat(L);
  lua_getglobal(L, "lpar");
  lua_getfield(L, -1, "parallel");
  lua_setglobal(L, "parallel");
  lua_pop(L, 1); /* pop lpar */
  src = lpar_embedded("lpar.cli", &len);
  if (src == NULL)
    return luaL_error(L, "lpar.cli is not built in");
  if (luaL_loadbufferx(L, src, len, "=lpar.cli", "t") != LUA_OK)
    return lua_error(L);
  lua_call(L, 0, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "lpar.cli");
  lua_pop(L, 1); /* pop package.loaded */
  if (argc >= 2 && strcmp(argv[1], "--worker") == 0) {
    pushhelpers(L); /* lpar.cli's agent() makes the CLI's workers */
    lua_setfield(L, -2, "helpers");
    lua_pushinteger(L, agentmain(L, argc, argv));
    return 1;
  }
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  pushhelpers(L);
  lua_call(L, 2, 1);
  return 1;
}

/*
** Put /dev/null on each of fds 0-2 that is closed, so that no file lpar
** opens takes its place (the -o file as stdin, the joblog as stderr). It
** is opened the wrong way round: reading the closed stdin or writing the
** closed stdout still fails (EBADF), loudly, as it did.
*/
static void plugstdio(void) {
  int fd;
  for (fd = 0; fd <= 2; fd++) {
    int k;
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
      continue;
    do
      k = open("/dev/null", fd == 0 ? O_WRONLY : O_RDONLY);
    while (k == -1 && errno == EINTR);
    if (k != -1 && k != fd) { /* cannot be lower: fd was the lowest free */
      dup2(k, fd);
      close(k);
    }
  }
}

int main(int argc, char **argv) {
  lua_State *L;
  int status, code;
  plugstdio();
  L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "lpar: cannot create Lua state: not enough memory\n");
    return 2;
  }
#if !LPAR_LUAJIT
  /* Lua's own allocator is realloc and free, which cmdalloc keeps for
     the blocks made so far (all small) */
  lua_setallocf(L, cmdalloc, NULL);
  bigstrings = 1;
#endif
  lua_pushcfunction(L, msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 1);
  if (status != LUA_OK) {
    fflush(stdout);
    fprintf(stderr, "lpar: %s\n", lua_tostring(L, -1));
    code = 1;
  }
  else
    code = (int)lua_tointeger(L, -1);
  l_finish(L);
  lua_close(L);
  /* what the script wrote on stdout itself (print flushes each line, and
     a failure leaves only the error flag) */
  if (fflush(stdout) != 0 || ferror(stdout)) {
    if (code == 0)
      fprintf(stderr, "lpar: cannot write the output\n");
    code = code == 0 ? 1 : code;
  }
  free(out.outname);
  free(out.logname);
  lpar_buf_realloc(out.p, out.cap, 0);
  lpar_buf_realloc(out.log, out.logcap, 0);
  return code;
}
