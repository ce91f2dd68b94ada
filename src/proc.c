/*
** proc.c: fork, channels, waitpid and shutdown of worker processes.
** Plain C: returns 0 or -errno, never prints, never exits the parent.
*/
#include "proc.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#if !defined(LPAR_MAXTRACKFD)
#define LPAR_MAXTRACKFD 65536
#endif

/*
** The set of open lpar fds. Fds belong to the process, not to a Lua state,
** so this one table is process-wide; atomics make it safe for hosts that
** use lpar from several threads.
*/
#define WORDBITS 64
static _Atomic unsigned long long tracked[LPAR_MAXTRACKFD / WORDBITS];

void lpar_proc_track(int fd) {
  if (fd >= 0 && fd < LPAR_MAXTRACKFD)
    atomic_fetch_or(&tracked[fd / WORDBITS], 1ULL << (fd % WORDBITS));
}

static void untrack(int fd) {
  if (fd >= 0 && fd < LPAR_MAXTRACKFD)
    atomic_fetch_and(&tracked[fd / WORDBITS], ~(1ULL << (fd % WORDBITS)));
}

void lpar_proc_closefd(int *fd) {
  if (*fd >= 0) {
    assert(*fd > 2);
    untrack(*fd);
    close(*fd); /* never retried: the fd is gone either way */
    *fd = -1;
  }
}

/* In a new child: close every tracked fd but 'keep1' and 'keep2'. */
static void closeothers(int keep1, int keep2) {
  size_t w;
  for (w = 0; w < LPAR_MAXTRACKFD / WORDBITS; w++) {
    unsigned long long bits = atomic_load(&tracked[w]);
    while (bits) {
      int b = __builtin_ctzll(bits);
      int fd = (int)(w * WORDBITS) + b;
      bits &= bits - 1;
      if (fd != keep1 && fd != keep2) {
        close(fd);
        untrack(fd);
      }
    }
  }
}

long long lpar_proc_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void childsignals(const ChildSetup *cs) {
  struct sigaction sa, old;
  sigset_t mask;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = SIG_DFL;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGPIPE, &sa, NULL);
  sigaction(SIGCHLD, &sa, NULL);
  /* a hangup ends a worker, unless it was ignored (nohup) */
  if (sigaction(SIGHUP, NULL, &old) == 0 && old.sa_handler != SIG_IGN)
    sigaction(SIGHUP, &sa, NULL);
  /* not in the terminal's foreground group: touching the terminal fails
     (EIO) instead of stopping the worker */
  sa.sa_handler = SIG_IGN;
  sigaction(SIGTTIN, &sa, NULL);
  sigaction(SIGTTOU, &sa, NULL);
  sa.sa_handler = cs->ignint ? SIG_IGN : SIG_DFL;
  sigaction(SIGINT, &sa, NULL);
  /* the caller's mask, but never with the signals set above blocked: a
     run started inside another (a CLI retry) finds them blocked by the
     outer run, and a worker that cannot get SIGTERM ignores whoever
     stops it */
  mask = *cs->mask;
  sigdelset(&mask, SIGINT);
  sigdelset(&mask, SIGTERM);
  sigdelset(&mask, SIGHUP);
  sigprocmask(SIG_SETMASK, &mask, NULL);
}

/* A pidfd for 'pid' (close-on-exec, tracked), or -1 if the system has
   none (ENOSYS before Linux 5.3), cannot make one now (EMFILE), or the
   build says not to (LPAR_NOPIDFD): end of file on the results pipe then
   tells that the worker ended. */
static int pidopen(pid_t pid) {
#if defined(SYS_pidfd_open) && !defined(LPAR_NOPIDFD)
  long fd = syscall(SYS_pidfd_open, pid, 0);
  if (fd >= 0) {
    lpar_proc_track((int)fd);
    return (int)fd;
  }
#else
  (void)pid;
#endif
  return -1;
}

pid_t lpar_proc_fork(Proc *p, const ChildSetup *cs, const char **call) {
  int cmd[2] = {-1, -1}, res[2] = {-1, -1};
  p->pidfd = -1;
  pid_t parent = getpid(), pid;
  int rc;
  *call = "socketpair";
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, cmd) == -1)
    return -errno;
  *call = "pipe2";
  lpar_proc_track(cmd[0]);
  lpar_proc_track(cmd[1]);
  if (pipe2(res, O_CLOEXEC) == -1) {
    rc = -errno;
    goto fail;
  }
  lpar_proc_track(res[0]);
  lpar_proc_track(res[1]);
#if defined(F_SETPIPE_SZ)
  fcntl(res[1], F_SETPIPE_SZ, 1 << 20); /* best effort: fewer wake-ups */
#endif
  *call = "fcntl";
  if (fcntl(res[0], F_SETFL, O_NONBLOCK) == -1) {
    rc = -errno;
    goto fail;
  }
  fflush(NULL); /* nothing buffered is written twice */
  *call = "fork";
  pid = fork();
  if (pid == -1) {
    rc = -errno;
    goto fail;
  }
  if (pid == 0) {
    setpgid(0, 0);
    closeothers(cmd[1], res[1]);
#if defined(__linux__)
    prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    if (getppid() != parent) /* the parent died before prctl */
      _exit(1);
    childsignals(cs);
    p->pid = 0;
    p->cmdfd = cmd[1];
    p->resfd = res[1];
    return 0;
  }
  /* the child does the same: whichever runs first, the group exists
     before either goes on (ESRCH: it is gone already) */
  setpgid(pid, pid);
  lpar_proc_closefd(&cmd[1]);
  lpar_proc_closefd(&res[1]);
  p->pid = pid;
  p->cmdfd = cmd[0];
  p->resfd = res[0];
  p->pidfd = pidopen(pid);
  return pid;
fail:
  lpar_proc_closefd(&cmd[0]);
  lpar_proc_closefd(&cmd[1]);
  lpar_proc_closefd(&res[0]);
  lpar_proc_closefd(&res[1]);
  return rc;
}

void lpar_proc_close(Proc *p) {
  lpar_proc_closefd(&p->cmdfd);
  lpar_proc_closefd(&p->resfd);
}

void lpar_proc_closepid(Proc *p) {
  lpar_proc_closefd(&p->pidfd);
}

void lpar_proc_kill(pid_t pid, int sig) {
  assert(pid > 0); /* kill(0) or kill(-1) would hit far more */
  kill(-pid, sig); /* its group: what it started (fails if none) */
  kill(pid, sig);  /* and itself, even if it left the group */
}

/* pidfd_send_signal, or -ENOSYS */
static int pidsignal(const Proc *p, int sig) {
#if defined(SYS_pidfd_send_signal) && !defined(LPAR_NOPIDFD)
  if (p->pidfd >= 0)
    return syscall(SYS_pidfd_send_signal, p->pidfd, sig, NULL, 0) == 0 ? 0
                                                                       : -errno;
#else
  (void)p;
  (void)sig;
#endif
  return -ENOSYS;
}

void lpar_proc_killproc(const Proc *p, int sig) {
  int rc;
  assert(p->pid > 0);
  /* while it is not reaped (a zombie counts), its pid and its group's id
     are its own; signal 0 tells */
  rc = pidsignal(p, 0);
  if (rc == -ENOSYS || p->pidfd < 0) {
    lpar_proc_kill(p->pid, sig);
    return;
  }
  if (rc != 0)
    return; /* reaped elsewhere */
  kill(-p->pid, sig);
  pidsignal(p, sig);
}

/* waitid on worker p's pidfd (P_PIDFD, Linux 5.4), or -ENOSYS */
static int waitpidfd(const Proc *p, siginfo_t *si, int options) {
  int rc;
  if (p->pidfd < 0)
    return -ENOSYS;
  do
    rc = waitid((idtype_t)3 /* P_PIDFD */, (id_t)p->pidfd, si, options);
  while (rc == -1 && errno == EINTR);
  return rc == -1 ? -errno : 0;
}

int lpar_proc_waitproc(const Proc *p, int *status, int block) {
  siginfo_t si;
  int rc;
  memset(&si, 0, sizeof si);
  rc = waitpidfd(p, &si, WEXITED | WNOWAIT | (block ? 0 : WNOHANG));
  if (rc == -ENOSYS || rc == -EINVAL) /* no pidfd, or a kernel before 5.4 */
    return lpar_proc_wait(p->pid, status, block);
  if (rc != 0)
    return rc; /* -ECHILD: reaped elsewhere */
  if (si.si_pid == 0)
    return 0;             /* still running */
  kill(-p->pid, SIGKILL); /* a zombie: the group's id is still its own */
  memset(&si, 0, sizeof si);
  if ((rc = waitpidfd(p, &si, WEXITED)) != 0)
    return rc;
  if (si.si_code == CLD_EXITED)
    *status = (si.si_status & 0xff) << 8;
  else
    *status = (si.si_status & 0x7f) | (si.si_code == CLD_DUMPED ? 0x80 : 0);
  return 1;
}

int lpar_proc_wait(pid_t pid, int *status, int block) {
  siginfo_t si;
  pid_t r;
  int rc;
  /* see that it ended without reaping it: while it is a zombie its pid
     (and so its group's id) cannot be reused, so killing the group hits
     only what the worker left behind */
  memset(&si, 0, sizeof si);
  do
    rc = waitid(P_PID, (id_t)pid, &si,
                WEXITED | WNOWAIT | (block ? 0 : WNOHANG));
  while (rc == -1 && errno == EINTR);
  if (rc == -1)
    return -errno;
  if (si.si_pid != pid)
    return 0; /* still running */
  kill(-pid, SIGKILL);
  do
    r = waitpid(pid, status, 0);
  while (r == -1 && errno == EINTR);
  if (r == -1)
    return -errno;
  return 1;
}

int lpar_proc_waituntil(const Proc *p, long long deadline,
                        volatile sig_atomic_t *stop, int *status) {
  int rc;
  while ((rc = lpar_proc_waitproc(p, status, 0)) == 0) {
    long long left = deadline - lpar_proc_now();
    int ms;
    if (left <= 0 || (stop != NULL && *stop))
      return 0;
    ms = left > 100000000LL ? 100 : (int)(left / 1000000) + 1;
    if (p->pidfd >= 0) {
      struct pollfd pfd = {p->pidfd, POLLIN, 0};
      poll(&pfd, 1, ms); /* EINTR: look again */
    }
    else
      poll(NULL, 0, 1);
  }
  return rc;
}

int lpar_proc_reap(const Proc *p, int force, int *status) {
  int rc, tries;
  assert(p->pid > 0); /* kill(0) would hit the whole process group */
  if (force)
    lpar_proc_killproc(p, SIGKILL);
  for (tries = 0; (rc = lpar_proc_waitproc(p, status, 0)) == 0; tries++) {
    if (tries == 200)
      lpar_proc_killproc(p, SIGKILL);
    poll(NULL, 0, 1);
  }
  return rc;
}

int lpar_proc_holdchld(struct sigaction *old) {
  struct sigaction sa;
  if (sigaction(SIGCHLD, NULL, old) != 0)
    return 0;
  if (old->sa_handler != SIG_IGN && !(old->sa_flags & SA_NOCLDWAIT))
    return 0;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = SIG_DFL;
  return sigaction(SIGCHLD, &sa, NULL) == 0;
}

const char *lpar_proc_secs(double secs, char *buf, size_t size) {
  int n = snprintf(buf, size, "%.6g", secs);
  if (n > 0 && (size_t)n + 2 < size && strpbrk(buf, ".en") == NULL)
    memcpy(buf + n, ".0", 3); /* looks like a float, as in Lua */
  return buf;
}

int lpar_proc_leftbadly(int status) {
  if (WIFEXITED(status))
    return WEXITSTATUS(status) != 0;
  return WIFSIGNALED(status) && WTERMSIG(status) != SIGKILL &&
         WTERMSIG(status) != SIGPIPE;
}

const char *lpar_proc_describe(int status, char *buf, size_t size) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char *name = sigabbrev_np(sig);
    if (name)
      snprintf(buf, size, "killed by signal %d (SIG%s)", sig, name);
    else
      snprintf(buf, size, "killed by signal %d", sig);
  }
  else if (WIFEXITED(status))
    snprintf(buf, size, "exited with status %d", WEXITSTATUS(status));
  else
    snprintf(buf, size, "ended with wait status %d", status);
  return buf;
}

Slot *lpar_proc_slots(size_t n) {
  void *p = mmap(NULL, n * sizeof(Slot), PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

void lpar_proc_freeslots(Slot *s, size_t n) {
  if (s)
    munmap(s, n * sizeof(Slot));
}
