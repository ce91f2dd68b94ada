/*
** engine.c: the one loop of lpar. Owns every worker, job, timer and the
** signals of a wait; lpar.parallel, lpar.imap, pools and the CLI use it.
*/
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif
#include <sys/timerfd.h>
#include <unistd.h>

#include "codec.h"
#include "hosts.h"
#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "policy.h"
#include "proc.h"
#include "ranges.h"
#include "ring.h"
#include "wire.h"
#include "worker.h"
#include "xfer.h"

/* an engine that lives on: its chunks take at least this long once the
   time per item is known (ns): no fork to amortize, only a round trip */
#if !defined(LPAR_POOLCHUNKNS)
#define LPAR_POOLCHUNKNS 100000
#endif

/* ... and hold this many items at most before it is known */
#if !defined(LPAR_POOLPROBE)
#define LPAR_POOLPROBE 256
#endif

/* a host's chunk keeps each of its workers busy this long at least (ns):
   a round trip through ssh or srun is far longer than through a pipe */
#if !defined(LPAR_HOSTCHUNKNS)
#define LPAR_HOSTCHUNKNS 50000000
#endif

/* most items in one chunk */
#if !defined(LPAR_POOLMAXCHUNK)
#define LPAR_POOLMAXCHUNK (1 << 20)
#endif

/* a job's progress function is called at most this often (ns), and once
   more when the job is over */
#if !defined(LPAR_PROGRESSNS)
#define LPAR_PROGRESSNS 50000000LL
#endif

/* a batch of records (a batched job) runs at least this long before it
   may be asked to end early (see lpar_policy_overdue), ns */
#if !defined(LPAR_OVERDUENS)
#define LPAR_OVERDUENS 50000000LL
#endif

/* after SIGTERM for a timeout, SIGKILL follows this much later (ns) */
#define KILLGRACE 500000000LL

/* a worker that may be past a deadline soon (one not yet in its init,
   one between items) is looked at again at least this often (ns) */
#if !defined(LPAR_LOOKNS)
#define LPAR_LOOKNS 10000000LL
#endif

/*
** How the pieces fit. An Engine is a userdata holding its workers'
** places; its uservalue table holds the init and close hooks, what the
** workers inherit at fork (functions and items), the jobs that are not
** finished (anchored, so that a job nobody holds still runs), and a weak
** table of the time per item last measured for each function. A Job is a
** userdata whose uservalue holds its results, errors, items, the function
** and the engine. Active jobs form a list, oldest first: idle workers
** take chunks from the oldest job that has some left.
**
** Every fd the parent watches is in one epoll set, together with a timer
** for deadlines; pool:fd() hands that set to a host's own loop. All work
** is done by pump(), which never blocks unless asked to.
*/

/* fields of the engine's uservalue */
enum {
  EU_INIT = 1,
  EU_CLOSE,
  EU_FNS,
  EU_ITEMS,
  EU_ANCHORS,
  EU_TNS,
  EU_BROKEN,
  EU_INITERR,
  EU_HOSTS,  /* what lpar_engine_sethosts was given */
  EU_SETUP,  /* ... and the SETUP frame its agents get */
  EU_HOSTERR /* why the last host was left out */
};
#define EU_N EU_HOSTERR

/* fields of a job's uservalue */
enum {
  JU_RESULTS = 1,
  JU_ERRORS,
  JU_ITEMS,
  JU_FAILURE,
  JU_ENGINE,
  JU_F,
  JU_ATTEMPTS, /* item -> times run again so far, with retries */
  JU_INFLIGHT, /* a stream's items handed out and not yet reported */
  JU_PROGRESS, /* the progress function, if any */
  JU_KINDS,    /* item -> kind code (kind.h) of its collected failure */
  JU_SLICE,    /* o.slice: cuts a batch into parts */
  JU_KIDS,     /* item -> its node (see "records" below) */
  JU_ONEVENT,  /* o.onevent */
  JU_STARTS    /* item -> when it was handed out (ns), with o.onevent */
};
#define JU_N JU_STARTS

/* the first index of the items made of parts of batches (o.slice), so
   that the iterator's items keep their own numbers */
#define KIDBASE ((lua_Integer)1 << 48)

/* epoll data: what an event is about, and which worker (or job) */
enum { EV_RES = 0, EV_CMD, EV_TIMER, EV_PID, EV_WAKE };
#define EVDATA(kind, i) (((uint64_t)(kind) << 32) | (uint32_t)(i))

/* what the functions below share: the engine and its uservalue's index */
typedef struct Ctx {
  lua_State *L;
  Engine *e;
  int uv;
} Ctx;

/* the signal that interrupted a blocking wait */
static volatile sig_atomic_t interrupted;

/* what an iterator returns for "no item yet" (its address) */
static const char pendingkey = 0;

static void onint(int sig) {
  interrupted = sig;
}

static void nomem(lua_State *L, int rc) {
  if (rc != 0)
    luaL_error(L, "not enough memory");
}

void lpar_engine_pushpending(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&pendingkey);
}

static void waitpending(lua_State *L, int fdidx);

void lpar_engine_nextitem(lua_State *L, int iter) {
  iter = lua_absindex(L, iter);
  for (;;) {
    lua_pushvalue(L, iter);
    lua_call(L, 0, 2);
    if (lua_touserdata(L, -2) != &pendingkey) {
      lua_pop(L, 1);
      return;
    }
    waitpending(L, lua_gettop(L));
    lua_pop(L, 2);
  }
}

static void waitpending(lua_State *L, int fdidx) {
  int isfd;
  lua_Integer fd = lua_tointegerx(L, fdidx, &isfd);
  struct pollfd p;
  if (!isfd || fd < 0 || fd > INT32_MAX)
    return;
  p.fd = (int)fd;
  p.events = POLLIN;
  p.revents = 0;
  if (poll(&p, 1, -1) == -1 && errno != EINTR)
    luaL_error(L, "cannot wait on fd %d for the items iterator: %s", (int)fd,
               strerror(errno));
}

/* ---- fds and processes ---- */

/*
** While the engine works, SIGCHLD is deliverable even if the caller
** ignores it, or the kernel would reap ended workers before their exit
** status is read. The caller's action is back when the outermost call
** returns.
*/
static void holdchld(Engine *e) {
  if (e->chld++ == 0)
    e->heldchld = lpar_proc_holdchld(&e->oldchld);
}

static void releasechld(Engine *e) {
  if (--e->chld == 0 && e->heldchld) {
    sigaction(SIGCHLD, &e->oldchld, NULL);
    e->heldchld = 0;
  }
}

static int evctl(Engine *e, int op, int fd, uint32_t events, uint64_t data) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.u64 = data;
  return epoll_ctl(e->epfd, op, fd, &ev) == -1 ? -errno : 0;
}

/* Reap the killed workers that have ended ('block': wait for all). */
static void reapdying(Engine *e, int block) {
  int i = 0, status;
  while (i < e->ndying) {
    if (lpar_proc_wait(e->dying[i], &status, block) != 0)
      e->dying[i] = e->dying[--e->ndying];
    else
      i++;
  }
}

/* Close a worker's channel, leaving its pid (and pidfd, no longer
   watched) in place. */
static void closeworker(Engine *e, EWorker *w) {
  if (w->proc.resfd >= 0)
    evctl(e, EPOLL_CTL_DEL, w->proc.resfd, 0, 0);
  if (w->proc.pidfd >= 0)
    evctl(e, EPOLL_CTL_DEL, w->proc.pidfd, 0, 0);
  if (w->watchout && w->proc.cmdfd >= 0)
    evctl(e, EPOLL_CTL_DEL, w->proc.cmdfd, 0, 0);
  w->watchout = 0;
  lpar_proc_close(&w->proc);
  w->in.n = 0;
  w->out.n = w->outpos = 0;
}

/* Empty w's place (its process is someone else's business now). */
static void vacate(Engine *e, EWorker *w) {
  e->vacated = 1; /* the pump fills it before it waits */
  w->proc.pid = 0;
  w->state = W_EMPTY;
  w->job = NULL;
  w->nq = 0;
  if (!w->host)
    e->live--;
}

/* Kill worker w and empty its place; it is reaped later. */
static void dropworker(Engine *e, EWorker *w) {
  pid_t pid = w->proc.pid;
  closeworker(e, w);
  lpar_proc_killproc(&w->proc, SIGKILL);
  lpar_proc_closepid(&w->proc);
  if (e->ndying == e->capdying) {
    int cap = e->capdying ? 2 * e->capdying : 8;
    pid_t *d = realloc(e->dying, (size_t)cap * sizeof(pid_t));
    if (d == NULL) { /* cannot defer: reap it now */
      lpar_proc_wait(pid, &(int){0}, 1);
      pid = 0;
    }
    else {
      e->dying = d;
      e->capdying = cap;
    }
  }
  if (pid != 0)
    e->dying[e->ndying++] = pid;
  vacate(e, w);
}

/* Let idle worker w go: end of file on its channel makes it leave, and
   it exits (running close) while the others finish. It is reaped when
   the engine closes. */
static void retire(Ctx *c, EWorker *w) {
  Engine *e = c->e;
  if (e->nretired == e->capretired) {
    int cap = e->capretired ? 2 * e->capretired : 8;
    Proc *p = realloc(e->retired, (size_t)cap * sizeof(Proc));
    nomem(c->L, p == NULL);
    e->retired = p;
    e->capretired = cap;
  }
  closeworker(e, w);
  e->retired[e->nretired++] = w->proc; /* keeps the pid and pidfd */
  w->proc.pidfd = -1;
  vacate(e, w);
}

/* Drop the results of every job (in a freshly forked worker: they are
   the caller's, not the worker's heap). */
static void dropresults(Ctx *c) {
  lua_State *L = c->L;
  Job *j;
  for (j = c->e->jobs; j; j = j->nextjob) {
    lua_rawgeti(L, c->uv, EU_ANCHORS);
    if (lua_rawgetp(L, -1, j) == LUA_TUSERDATA) {
      lua_getiuservalue(L, -1, 1);
      lua_pushnil(L);
      lua_rawseti(L, -2, JU_RESULTS);
      lua_pushnil(L);
      lua_rawseti(L, -2, JU_ERRORS);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
}

/* Place i has a fresh process, w: start its conversation, watching its
   channel and its end. 0, or -errno with *call naming the call that
   failed (then it is dropped). */
static int startplace(Engine *e, EWorker *w, int i, const char **call) {
  int rc;
  w->state = W_STARTING;
  w->job = NULL;
  w->fnjob = 0;
  w->fresh = 0;
  w->nq = 0;
  w->got = w->busy = 0;
  w->in.n = 0;
  w->out.n = w->outpos = 0;
  w->watchout = 0;
  w->timedout = 0;
  w->blame = 0;
  w->killat = 0;
  w->hello = 0;
  w->hostn = 0;
  w->rtt = 0;
  w->lastread = lpar_proc_now();
  /* timed beats begin once its agent runs: the first would measure the
     connection's start */
  w->probeat = w->lastread + LPAR_HOSTSTARTNS;
  rc = evctl(e, EPOLL_CTL_ADD, w->proc.resfd, EPOLLIN, EVDATA(EV_RES, i));
  if (rc == 0 && w->proc.pidfd >= 0) /* its end, whoever holds its pipe */
    rc = evctl(e, EPOLL_CTL_ADD, w->proc.pidfd, EPOLLIN, EVDATA(EV_PID, i));
  if (rc != 0) {
    *call = "epoll_ctl";
    dropworker(e, w);
  }
  return rc;
}

/* What a child of e starts with: the caller's signal mask (the one in
   force now, or the one a wait replaced, in 'cur'), SIGINT as 'ignint'
   says. */
static ChildSetup childsetup(Engine *e, sigset_t *cur, int ignint) {
  ChildSetup cs;
  sigprocmask(SIG_BLOCK, NULL, cur);
  cs.mask = e->waiting ? &e->oldmask : cur;
  cs.ignint = ignint;
  return cs;
}

/*
** The buffers of the other places (bytes on their way to a worker or
** from it: a long item, a long result) are left out of a fork: a worker
** forked while lpar sends a long line to another has no use for its
** bytes, and would count them in its memory. Before the fork (child 0)
** they are marked; in the child (1) the large ones are forgotten, never
** freed nor read: their pages are not there.
*/
static void sparebufs(Engine *e, int child) {
  int i;
  for (i = 0; i < e->o.n; i++) {
    Buf *b[2];
    int k;
    b[0] = &e->w[i].out;
    b[1] = &e->w[i].in;
    for (k = 0; k < 2; k++) {
      if (b[k]->cap < LPAR_BUFMAP)
        continue;
      if (child)
        *b[k] = (Buf){NULL, 0, 0};
      else
        lpar_buf_nofork(b[k]);
    }
  }
}

/* Fork a worker into empty place i; 0, or -errno with *call naming the
   call that failed. */
static int spawn(Ctx *c, int i, const char **call) {
  lua_State *L = c->L;
  Engine *e = c->e;
  EWorker *w = &e->w[i];
  sigset_t cur;
  ChildSetup cs = childsetup(e, &cur, e->o.ignint);
  pid_t pid;
  e->slots[i].item = 0;
  lpar_ring_unmap(&w->ring); /* the last worker in this place is gone */
  if (lpar_ring_map(&w->ring, LPAR_RINGSIZE) != 0)
    w->ring.base = NULL; /* no ring: every frame takes the pipe */
  lua_rawgeti(L, c->uv, EU_FNS);
  lua_rawgeti(L, c->uv, EU_ITEMS);
  lua_rawgeti(L, c->uv, EU_INIT);
  lua_rawgeti(L, c->uv, EU_CLOSE);
  sparebufs(e, 0);
  pid = lpar_proc_fork(&w->proc, &cs, call);
  if (pid == 0) {
    WorkerArgs a;
    int top = lua_gettop(L);
    sparebufs(e, 1);
    dropresults(c);
    a.cmdfd = w->proc.cmdfd;
    a.resfd = w->proc.resfd;
    a.fnsidx = lua_isnil(L, top - 3) ? 0 : top - 3;
    a.itemsidx = lua_isnil(L, top - 2) ? 0 : top - 2;
    a.initidx = lua_isnil(L, top - 1) ? 0 : top - 1;
    a.closeidx = lua_isnil(L, top) ? 0 : top;
    a.place = i;
    a.maxmem = e->o.maxmem;
    a.ring = w->ring;
    a.slot = &e->slots[i];
    lpar_worker_run(L, &a);
  }
  lua_pop(L, 4);
  lpar_ring_keep(&w->ring);
  if (pid < 0) {
    lpar_ring_unmap(&w->ring);
    return (int)pid;
  }
  e->live++;
  e->forks++;
  lpar_policy_started(&e->wave, e->live, lpar_proc_now());
  return startplace(e, w, i, call);
}

static int broken(Ctx *c);
static int sendsome(Engine *e, EWorker *w);

/* a send buffer larger than this is freed once all of it is sent */
#if !defined(LPAR_KEEPOUT)
#define LPAR_KEEPOUT (4 * 1024 * 1024)
#endif

/* The places of local workers come first, hosts after them. */
static int nlocal(const Engine *e) {
  return e->o.n - e->o.nhosts;
}

/* Push the description of w's host (see lpar_hosts_parse). */
static void pushhost(Ctx *c, const EWorker *w) {
  lua_rawgeti(c->L, c->uv, EU_HOSTS);
  lua_rawgeti(c->L, -1, w->host);
  lua_remove(c->L, -2);
}

/* The spec of w's host, for messages (valid while the engine lives: the
   string is held by EU_HOSTS). */
static const char *hostname(Ctx *c, const EWorker *w) {
  const char *spec;
  pushhost(c, w);
  lua_getfield(c->L, -1, "spec");
  spec = lua_tostring(c->L, -1);
  lua_pop(c->L, 2);
  return spec ? spec : "?";
}

/* Queue frame (type, count) with payload p[0..len) for host w. */
static void hostframe(Ctx *c, EWorker *w, int type, uint32_t count,
                      const char *p, size_t len) {
  if (w->outpos == w->out.n)
    w->out.n = w->outpos = 0;
  nomem(c->L, lpar_wire_addframe(&w->out, (uint32_t)type, count, p, len));
}

/*
** Start host k's command in empty place i, its stdin and stdout the
** place's channel, and queue SETUP for its agent; 0, or -errno with
** *call naming the call that failed. The command runs in a process group
** of its own, killed with the place (ssh then hangs up, and the agent
** leaves at end of file).
*/
static int spawnhost(Ctx *c, int i, const char **call) {
  lua_State *L = c->L;
  Engine *e = c->e;
  EWorker *w = &e->w[i];
  sigset_t cur;
  ChildSetup cs = childsetup(e, &cur, 1);
  pid_t pid;
  int rc, top = lua_gettop(L);
  lua_Integer k, n;
  const char **argv;
  size_t len;
  const char *setup;
  pushhost(c, w);
  lua_getfield(L, -1, "argv");
  n = (lua_Integer)lua_rawlen(L, -1);
  argv = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof(char *), 0);
  for (k = 1; k <= n; k++) {
    lua_rawgeti(L, top + 2, k);
    argv[k - 1] = lua_tostring(L, -1);
    lua_pop(L, 1); /* still held by the table */
  }
  argv[n] = NULL;
  e->slots[i].item = 0;
  pid = lpar_proc_fork(&w->proc, &cs, call);
  if (pid == 0) {
    int in = w->proc.cmdfd, out = w->proc.resfd;
#if defined(__linux__)
    /* should the parent die, even by SIGKILL, the command is told to stop,
       not killed: an agent here stops its workers' children too */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
    /* both above 2 first, so that neither is overwritten by the other */
    if (in <= 2)
      in = fcntl(in, F_DUPFD, 3);
    if (out <= 2)
      out = fcntl(out, F_DUPFD, 3);
    if (in < 0 || out < 0 || dup2(in, 0) < 0 || dup2(out, 1) < 0)
      _exit(127);
    execvp(argv[0], (char *const *)argv);
    fprintf(stderr, "lpar: host '%s': cannot run %s: %s\n", hostname(c, w),
            argv[0], strerror(errno));
    _exit(127);
  }
  lua_settop(L, top);
  if (pid < 0)
    return (int)pid;
  w->ring.base = NULL;
  if ((rc = startplace(e, w, i, call)) != 0)
    return rc;
  lua_rawgeti(L, c->uv, EU_SETUP); /* the whole frame */
  setup = lua_tolstring(L, -1, &len);
  nomem(L, lpar_buf_add(&w->out, setup, len));
  lua_pop(L, 1);
  return 0;
}

/* Whether every host is left out and no local place exists: then the
   engine has nothing to run on. */
static int nohost(Engine *e) {
  int i;
  if (nlocal(e) > 0 || e->o.nhosts == 0)
    return 0;
  for (i = nlocal(e); i < e->o.n; i++)
    if (!e->w[i].dropped)
      return 0;
  return 1;
}

/* Leave host w out for good, saying why on stderr; 'why' is kept as the
   last host's failure. */
static void leaveout(Ctx *c, EWorker *w, const char *why) {
  const char *name = hostname(c, w);
  w->dropped = 1;
  fprintf(stderr, "lpar: host '%s' is left out: %s\n", name, why);
  fflush(stderr);
  lua_pushfstring(c->L, "host '%s': %s", name, why);
  lua_rawseti(c->L, c->uv, EU_HOSTERR);
}

static void breakengine(Ctx *c, int code);

/* With every host left out and no local place, the engine breaks, naming
   the last host's failure. */
static void checkhosts(Ctx *c) {
  if (!nohost(c->e) || broken(c))
    return;
  lua_rawgeti(c->L, c->uv, EU_HOSTERR);
  lua_pushfstring(c->L, "no host can run workers (the last: %s)",
                  lua_tostring(c->L, -1));
  lua_remove(c->L, -2);
  breakengine(c, LPAR_KLOST);
}

/* ---- jobs ---- */

/* Push job j (from the anchors) and its uservalue; returns the index of
   the uservalue. */
static int pushjob(Ctx *c, Job *j) {
  lua_State *L = c->L;
  lua_rawgeti(L, c->uv, EU_ANCHORS);
  lua_rawgetp(L, -1, j);
  lua_remove(L, -2);
  lua_getiuservalue(L, -1, 1);
  return lua_gettop(L);
}

static void freejob(Job *j) {
  lpar_ranges_free(&j->redo);
  lpar_buf_free(&j->call);
  lpar_buf_free(&j->hostcall);
}

/* Stop watching j's wakefd. */
static void unwatchwake(Engine *e, Job *j) {
  if (j->watchwake) {
    evctl(e, EPOLL_CTL_DEL, j->wakefd, 0, 0);
    lpar_proc_closefd(&j->wakefd); /* a copy of the iterator's fd */
    j->watchwake = 0;
  }
}

/* Take finished job j out of the engine's list and anchors. */
static void detach(Ctx *c, Job *j) {
  lua_State *L = c->L;
  Engine *e = c->e;
  Job **pp;
  int i;
  for (pp = &e->jobs; *pp && *pp != j; pp = &(*pp)->nextjob)
    ;
  if (*pp == NULL)
    return;
  *pp = j->nextjob;
  if (e->lastjob == j) {
    Job *k;
    e->lastjob = NULL;
    for (k = e->jobs; k; k = k->nextjob)
      e->lastjob = k;
  }
  j->nextjob = NULL;
  unwatchwake(e, j);
  for (i = 0; i < e->o.n; i++)
    if (e->w[i].job == j)
      e->w[i].job = NULL;
  if (j->state == J_DONE && j->tns > 0) { /* remember for the next job */
    int uv = pushjob(c, j);
    lua_rawgeti(L, c->uv, EU_TNS);
    lua_rawgeti(L, uv, JU_F);
    lua_pushnumber(L, (lua_Number)j->tns);
    lua_rawset(L, -3);
    lua_pop(L, 3);
  }
  lua_rawgeti(L, c->uv, EU_ANCHORS);
  lua_pushnil(L);
  lua_rawsetp(L, -2, j);
  lua_pop(L, 1);
  freejob(j);
}

static void tellend(Ctx *c, Job *j, int juv, lua_Integer i, int eidx, int code,
                    lua_Integer ok, lua_Integer failed, lua_Integer again);

/* Job j (with on_event) is cancelled: the items its workers run end so. */
static void tellcancelled(Ctx *c, Job *j) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int i, k, uv = pushjob(c, j);
  lua_Integer item;
  lua_pushliteral(L, "cancelled");
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->job != j)
      continue;
    for (k = 0; k < w->nq; k++)
      for (item = w->q[k].first + (k == 0 ? w->got : 0);
           item < w->q[k].first + w->q[k].count; item++)
        tellend(c, j, uv, item, uv + 1, LPAR_KCANCELLED, -1, 0, 0);
  }
  lua_settop(L, uv - 2);
}

/*
** Job j ends with the error value at the top of the stack (popped) as its
** failure, of kind 'code' (kind.h). Workers still running its chunks are
** killed and replaced, but 'self', which skips the rest of its chunk by
** itself (unless it holds another chunk of the job); what it sends until
** it is idle is dropped.
*/
static void endjob(Ctx *c, Job *j, int state, EWorker *self, int code) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int i, uv;
  if (j->state != J_RUNNING) {
    lua_pop(L, 1);
    return;
  }
  uv = pushjob(c, j);
  lua_pushvalue(L, uv - 2);
  lua_rawseti(L, uv, JU_FAILURE);
  lua_pop(L, 3);
  j->state = state;
  j->failcode = code;
  e->ended = 1;
  e->vacated = 1; /* a wait for it must not block */
  if (state == J_CANCELLED && j->o.onevent)
    tellcancelled(c, j);
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->job != j)
      continue;
    /* it skips the rest and says READY; a host's agent is told to stop
       its chunks (a host costs a connection) and says READY for each */
    if (w->host) {
      w->job = NULL;
      if (w->proc.cmdfd >= 0) { /* a channel that failed ends it later */
        hostframe(c, w, LPAR_FCANCEL, 0, NULL, 0);
        sendsome(e, w);
      }
    }
    else if (w == self && w->nq == 1)
      w->job = NULL;
    else
      dropworker(e, w);
  }
  detach(c, j);
}

static void failjob(Ctx *c, Job *j, EWorker *self, int code) {
  endjob(c, j, J_FAILED, self, code);
}

/* Whether every item of j is reported. */
static int complete(Job *j) {
  if (j->halting) /* what was handed out is in */
    return j->done + j->redo.items == j->n + j->nkids;
  return j->done == j->n + j->nkids &&
         (!j->stream || (j->exhausted && j->redo.n == 0));
}

/* Job j is over if all its items are reported. */
static void unhold(Ctx *c, Job *j);

static void settle(Ctx *c, Job *j) {
  if (j->state == J_RUNNING && complete(j)) {
    if (j->halting)
      unhold(c, j);
    j->state = J_DONE;
    c->e->vacated = 1; /* a wait for it must not block */
    detach(c, j);
  }
}

/*
** Events (o.onevent): on_event(ev) is called as each item is handed to a
** place, ev = {event = "start", item = i, attempt = k, host = spec (nil:
** this machine)}, and as it ends, ev = {event = "end", item, attempt,
** host, status = "ok" | "failed" | "timeout" | "lost", error = message,
** seconds}. For a part of a batch (see "records") item is its batch's
** number and 'at' and 'n' say which records it holds; an end of a
** batched job's item also says how many of its records ended ok, failed
** for good ('failed') or run again ('again'). An error it raises fails the
** job.
*/
/* Push on_event and a new event for item i (start or end); returns the
   event's index. */
static int newevent(Ctx *c, Job *j, int juv, lua_Integer i, int start) {
  lua_State *L = c->L;
  int ev;
  lua_Integer attempt = 1;
  long long now = lpar_proc_now();
  lua_rawgeti(L, juv, JU_ONEVENT);
  lua_createtable(L, 0, 10);
  ev = lua_gettop(L);
  lua_pushstring(L, start ? "start" : "end");
  lua_setfield(L, ev, "event");
  if (i > KIDBASE) {
    lua_rawgeti(L, juv, JU_KIDS);
    if (lua_rawgeti(L, -1, i) == LUA_TTABLE) {
      lua_getfield(L, -1, "root");
      lua_setfield(L, ev, "item");
      lua_getfield(L, -1, "at");
      lua_setfield(L, ev, "at");
      lua_getfield(L, -1, "n");
      lua_setfield(L, ev, "n");
      lua_getfield(L, -1, "attempt");
      attempt = lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
  else {
    lua_pushinteger(L, i);
    lua_setfield(L, ev, "item");
  }
  if (!j->o.slice && j->o.retries > 0) { /* the item as a whole runs again */
    lua_rawgeti(L, juv, JU_ATTEMPTS);
    if (lua_istable(L, -1)) {
      lua_rawgeti(L, -1, i);
      attempt = lua_tointeger(L, -1) + 1;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pushinteger(L, attempt);
  lua_setfield(L, ev, "attempt");
  lua_rawgeti(L, juv, JU_STARTS);
  if (start) {
    lua_pushinteger(L, now);
    lua_rawseti(L, -2, i);
  }
  else {
    if (lua_rawgeti(L, -1, i) == LUA_TNUMBER) {
      lua_pushnumber(L, (double)(now - lua_tointeger(L, -1)) / 1e9);
      lua_setfield(L, ev, "seconds");
    }
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
  }
  lua_pop(L, 1);
  return ev;
}

/* Call on_event with the event on top (both popped); an error it raises
   fails the job. */
static void callevent(Ctx *c, Job *j) {
  if (lua_pcall(c->L, 1, 0, 0) != LUA_OK)
    failjob(c, j, NULL, LPAR_KERROR);
}

/* Item i was handed to worker w. An item handed out again unblamed (it
   went back with the chunk of a worker that was lost) is not started
   again: its start has had no end, and its end comes once it ran. */
static void tellstart(Ctx *c, Job *j, int juv, lua_Integer i, EWorker *w) {
  lua_State *L = c->L;
  int ev, open, top = lua_gettop(L);
  lua_rawgeti(L, juv, JU_STARTS);
  open = lua_istable(L, -1) && lua_rawgeti(L, -1, i) == LUA_TNUMBER;
  lua_settop(L, top);
  if (open)
    return;
  ev = newevent(c, j, juv, i, 1);
  lua_pushinteger(L, (lua_Integer)(w - c->e->w) + 1);
  lua_setfield(L, ev, "place");
  if (w->host) {
    pushhost(c, w);
    lua_getfield(L, -1, "spec");
    lua_setfield(L, ev, "host");
    lua_pop(L, 1);
  }
  callevent(c, j);
}

/* The status an end event gives a failure of kind 'code' (kind.h). */
static const char *endstatus(int code) {
  switch (LPAR_KINDOF(code)) {
  case LPAR_KTIMEOUT:
    return "timeout";
  case LPAR_KSIGNAL:
  case LPAR_KEXIT:
  case LPAR_KLOST:
  case LPAR_KPROTOCOL:
    return "lost";
  case LPAR_KCANCELLED:
  case LPAR_KINTERRUPTED:
    return "cancelled";
  default:
    return "failed";
  }
}

/* Item i ended: its error (nil: none) at 'eidx', of kind 'code' (0: as
   JU_KINDS has it); for a batched job, what became of its records: ok,
   failed for good, run again (-1: not a batched job). */
static void tellend(Ctx *c, Job *j, int juv, lua_Integer i, int eidx, int code,
                    lua_Integer ok, lua_Integer failed, lua_Integer again) {
  lua_State *L = c->L;
  int ev = newevent(c, j, juv, i, 0);
  if (!lua_isnil(L, eidx) && code == 0) {
    code = LPAR_KERROR;
    if (lua_rawgeti(L, juv, JU_KINDS) == LUA_TTABLE &&
        lua_rawgeti(L, -1, i) == LUA_TNUMBER)
      code = (int)lua_tointeger(L, -1);
    lua_settop(L, ev);
  }
  lua_pushstring(L, lua_isnil(L, eidx) ? "ok" : endstatus(code));
  lua_setfield(L, ev, "status");
  if (!lua_isnil(L, eidx)) {
    lpar_kind_push(L, code);
    lua_setfield(L, ev, "detail");
    lua_setfield(L, ev, "kind");
    if (lua_istable(L, eidx))
      lua_getfield(L, eidx, "message");
    else
      lua_pushvalue(L, eidx);
    lua_setfield(L, ev, "error");
  }
  if (c->e->from > 0) {
    lua_rawgeti(L, c->uv, EU_HOSTS);
    lua_rawgeti(L, -1, c->e->from);
    lua_getfield(L, -1, "spec");
    lua_setfield(L, ev, "host");
    lua_pop(L, 2);
  }
  if (ok >= 0) {
    lua_pushinteger(L, ok);
    lua_setfield(L, ev, "ok");
    lua_pushinteger(L, failed);
    lua_setfield(L, ev, "failed");
    lua_pushinteger(L, again);
    lua_setfield(L, ev, "again");
  }
  callevent(c, j);
}

/*
** Records (a batched job with o.slice). A batch is an item, and so is
** each part of a batch run again: a record that failed with retries left
** (alone, its next attempt), the records a batch handed back (its field
** 'rest': it ran past its time), and those of a batch lost with its
** worker (before the record it was running, that record if it has
** retries left, after it). Parts are items from KIDBASE on, handed out
** before fresh ones, so they run in parallel with the rest, on any
** worker. Each has a node in JU_KIDS while it runs: {root = the batch it
** comes from, at = its first record there (1-based, in the item it was
** cut from), n = records, attempt = k}; when it is reported the node gets
** value, error and host (the spec, nil: this machine), and the nodes of
** its own parts in 'kids'. A batch with parts has a node too ({kids,
** hold = parts not reported}) and is emitted once hold is 0, its parts in
** the field 'kids' of its result ({kids = ...} for a batch lost whole).
** A batch's result is a string (all ran), or a table of strings and
** {k, error} (record k failed) with the field 'rest'.
*/

/* Cut records from..to (run for the 'attempt'th time) of the batch at
   'bidx' as a new part, child of the node at 'nidx' whose root is item
   'root'. 0, or -1 with the job failed (slice raised). */
static int addpart(Ctx *c, Job *j, int juv, int bidx, int nidx,
                   lua_Integer root, lua_Integer from, lua_Integer to,
                   lua_Integer attempt) {
  lua_State *L = c->L;
  lua_Integer kid = KIDBASE + j->nkids + 1;
  lua_rawgeti(L, juv, JU_SLICE);
  lua_pushvalue(L, bidx);
  lua_pushinteger(L, from);
  lua_pushinteger(L, to);
  if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
    failjob(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  j->nkids++;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_insert(L, -2);
  lua_rawseti(L, -2, kid);
  lua_pop(L, 1);
  lua_createtable(L, 0, 8); /* its node */
  lua_pushinteger(L, root);
  lua_setfield(L, -2, "root");
  lua_pushinteger(L, from);
  lua_setfield(L, -2, "at");
  lua_pushinteger(L, to - from + 1);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, attempt);
  lua_setfield(L, -2, "attempt");
  lua_rawgeti(L, juv, JU_KIDS);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, kid);
  lua_pop(L, 1);
  if (lua_isnil(L, nidx)) { /* a batch's first part: its node */
    lua_newtable(L);
    lua_replace(L, nidx);
  }
  if (lua_getfield(L, nidx, "kids") == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, nidx, "kids");
  }
  lua_insert(L, -2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 1);
  /* a record run again is a suspect: alone, so that losing its worker
     again names it */
  nomem(L, lpar_ranges_push(&j->redo, kid, 1, attempt > 1));
  return 0;
}

/* The parts of item i (records 1..n, run for the 'attempt'th time; its
   result at 'vidx', its error at 'eidx', its batch at 'bidx', its node at
   'nidx'): how many were made, or -1 with the job failed. */
static lua_Integer addparts(Ctx *c, Job *j, int juv, const int idx[4],
                            lua_Integer root, lua_Integer n,
                            lua_Integer attempt, lua_Integer cnt[2]) {
  lua_State *L = c->L;
  int vidx = idx[0], eidx = idx[1], bidx = idx[2], nidx = idx[3];
  int stop = j->halting; /* nothing more runs */
  int again = !stop && lpar_policy_retry(attempt - 1, j->o.retries);
  /* a failure with retries left when the job halts is not one for good:
     the record is not run again, and neither ok nor failed */
  int pending = stop && lpar_policy_retry(attempt - 1, j->o.retries);
  lua_Integer made = 0, k, x, len, p = 0;
  /* cnt: records failed for good, records in parts */
#define PART(from, to, a)                                                      \
  do {                                                                         \
    if (addpart(c, j, juv, bidx, nidx, root, from, to, a) != 0)                \
      return -1;                                                               \
    made++;                                                                    \
    cnt[1] += (to) - (from) + 1;                                               \
  } while (0)
  cnt[0] = cnt[1] = 0;
  if (lua_istable(L, vidx)) {
    len = (lua_Integer)lua_rawlen(L, vidx);
    for (x = 1; x <= len; x++) {
      if (lua_rawgeti(L, vidx, x) == LUA_TTABLE) {
        lua_rawgeti(L, -1, 1);
        k = lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (again && k >= 1 && k <= n) {
          lua_pop(L, 1);
          PART(k, k, attempt + 1);
          continue;
        }
        cnt[pending]++;
      }
      lua_pop(L, 1);
    }
    lua_getfield(L, vidx, "rest");
    k = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (k >= 1 && k <= n && stop)
      cnt[1] += n - k + 1;       /* not run: neither ok nor failed */
    else if (k >= 1 && k <= n) { /* handed back: spread over the places */
      lua_Integer left = n - k + 1, ways = c->e->o.n, size;
      if (ways > left)
        ways = left;
      for (x = 0; x < ways; x++) {
        size = (left - x + ways - 1) / ways; /* sums to 'left' */
        PART(k, k + size - 1, attempt);
        k += size;
      }
    }
    return made;
  }
  if (lua_isnil(L, eidx)) /* ran whole */
    return 0;
  /* lost with its worker, or stopped at its timeout */
  if (lua_istable(L, eidx)) {
    lua_getfield(L, eidx, "record");
    p = lua_tointeger(L, -1);
    lua_pop(L, 1);
  }
  if (stop) { /* the record it ran failed (if known), the others did not run */
    cnt[0] = (p >= 1 && p <= n) || n == 1 ? !pending : 0;
    cnt[1] = n - cnt[0];
    return 0;
  }
  if (p < 1 || p > n) {
    if (n == 1 && again)
      PART(1, 1, attempt + 1);
    else if (n > 1) /* which record did it is not known: each alone */
      for (k = 1; k <= n; k++)
        PART(k, k, attempt);
    else
      cnt[0] = 1;
    return made;
  }
  if (p > 1)
    PART(1, p - 1, attempt);
  if (again)
    PART(p, p, attempt + 1);
  else
    cnt[0] = 1;
  if (p < n)
    PART(p + 1, n, attempt);
#undef PART
  return made;
}

/* Every part of batch 'root' is reported: it may be emitted, its parts in
   its result's field 'kids'. */
static void release(Ctx *c, Job *j, int juv, lua_Integer root) {
  lua_State *L = c->L;
  lua_rawgeti(L, juv, JU_RESULTS);
  if (lua_rawgeti(L, -1, root) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, root);
  }
  lua_rawgeti(L, juv, JU_KIDS);
  lua_rawgeti(L, -1, root);
  lua_getfield(L, -1, "kids");
  lua_setfield(L, -4, "kids");
  lua_pop(L, 1);
  lua_pushnil(L);
  lua_rawseti(L, -2, root);
  lua_pop(L, 3);
  if (j->fin != NULL) {
    j->fin[(root - 1) % LPAR_WINDOW] = 1;
    if (j->o.unordered)
      j->queue[j->qtail++ % LPAR_WINDOW] = root;
  }
}

/*
** Item i of a job with o.slice is reported, its result on top (left
** there): make its parts (see "records"). Returns -1 for a part (its
** node has its outcome; the result must not be stored), 1 for a batch
** that waits for its parts, 0 for a batch that may be emitted.
*/
static int adopt(Ctx *c, Job *j, int juv, lua_Integer i) {
  lua_State *L = c->L;
  int top = lua_gettop(L), idx[4];
  lua_Integer root = i, attempt = 1, n, made, hold, cnt[2];
  idx[0] = top;
  lua_rawgeti(L, juv, JU_KIDS); /* top + 1 */
  if (i > KIDBASE) {
    lua_rawgeti(L, top + 1, i); /* its node */
    lua_getfield(L, -1, "root");
    lua_getfield(L, -2, "attempt");
    lua_getfield(L, -3, "n");
    root = lua_tointeger(L, -3);
    attempt = lua_tointeger(L, -2);
    n = lua_tointeger(L, -1);
    lua_pop(L, 3);
  }
  else {
    lua_pushnil(L); /* its node, made if it gets parts */
    n = j->recs[(i - 1) % LPAR_WINDOW];
  }
  idx[3] = top + 2;
  lua_rawgeti(L, juv, JU_ERRORS);
  lua_rawgeti(L, -1, i);
  lua_remove(L, -2);
  idx[1] = top + 3;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_rawgeti(L, -1, i);
  lua_remove(L, -2);
  idx[2] = top + 4;
  made = addparts(c, j, juv, idx, root, n, attempt, cnt);
  if (made < 0) {
    lua_settop(L, top);
    return i > KIDBASE ? -1 : 0;
  }
  if (j->o.onevent)
    tellend(c, j, juv, i, idx[1], 0, n - cnt[0] - cnt[1], cnt[0], cnt[1]);
  if (i <= KIDBASE) {
    if (made > 0) {
      lua_pushinteger(L, made);
      lua_setfield(L, idx[3], "hold");
      lua_pushvalue(L, idx[3]);
      lua_rawseti(L, top + 1, i);
    }
    lua_settop(L, top);
    return made > 0;
  }
  /* a part: its outcome goes into its node, with its failure's kind */
  lua_pushvalue(L, top);
  lua_setfield(L, idx[3], "value");
  lua_pushvalue(L, idx[1]);
  lua_setfield(L, idx[3], "error");
  if (!lua_isnil(L, idx[1])) {
    int code = LPAR_KERROR;
    if (lua_rawgeti(L, juv, JU_KINDS) == LUA_TTABLE) {
      if (lua_rawgeti(L, -1, i) == LUA_TNUMBER)
        code = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
      lua_pushnil(L);
      lua_rawseti(L, -2, i);
    }
    lua_pop(L, 1);
    lpar_kind_push(L, code);
    lua_setfield(L, idx[3], "detail");
    lua_setfield(L, idx[3], "kind");
  }
  if (c->e->from > 0) {
    lua_rawgeti(L, c->uv, EU_HOSTS);
    lua_rawgeti(L, -1, c->e->from);
    lua_getfield(L, -1, "spec");
    lua_setfield(L, idx[3], "host");
    lua_pop(L, 2);
  }
  lua_pushnil(L);
  lua_rawseti(L, top + 1, i);
  lua_rawgeti(L, juv, JU_ERRORS);
  lua_pushnil(L);
  lua_rawseti(L, -2, i);
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_pushnil(L);
  lua_rawseti(L, -2, i);
  lua_rawgeti(L, top + 1, root);
  lua_getfield(L, -1, "hold");
  hold = lua_tointeger(L, -1) + made - 1;
  lua_pushinteger(L, hold);
  lua_setfield(L, -3, "hold");
  lua_settop(L, top);
  if (hold == 0 && j->state == J_RUNNING)
    release(c, j, juv, root);
  return -1;
}

/* A halted job is over: the batches that wait for parts that will not
   run are emitted as they are, and (in order) those never run as not run
   (nil, nil). */
static void unhold(Ctx *c, Job *j) {
  lua_State *L = c->L;
  int top = lua_gettop(L), juv;
  lua_Integer i;
  if (j->fin == NULL)
    return;
  juv = pushjob(c, j);
  if (j->o.slice) {
    lua_rawgeti(L, juv, JU_KIDS);
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
      i = lua_tointeger(L, -2);
      lua_pop(L, 1);
      if (i <= KIDBASE)
        release(c, j, juv, i);
    }
  }
  if (!j->o.unordered)
    for (i = j->emit; i <= j->n; i++)
      j->fin[(i - 1) % LPAR_WINDOW] = 1;
  lua_settop(L, top);
}

/* The value on top is the result of item i of j, whose uservalue is at
   'juv' (popped). */
static void store(Ctx *c, Job *j, int juv, lua_Integer i) {
  lua_State *L = c->L;
  int held = 0;
  if (j->pending && !j->watchwake) /* it waited for a result */
    j->pending = 0;
  if (j->o.onevent && !j->o.slice) {
    lua_rawgeti(L, juv, JU_ERRORS);
    lua_rawgeti(L, -1, i);
    tellend(c, j, juv, i, lua_gettop(L), 0, -1, 0, 0);
    lua_pop(L, 2);
  }
  if (j->o.slice) {
    held = adopt(c, j, juv, i);
    if (held < 0) { /* a part: it went into its batch's node */
      lua_pop(L, 1);
      j->done++;
      c->e->stored++;
      return;
    }
  }
  if (j->stream) {
    lua_rawgeti(L, juv, JU_INFLIGHT);
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
  }
  if (j->where != NULL)
    j->where[(i - 1) % LPAR_WINDOW] = (unsigned short)c->e->from;
  if (j->fin != NULL && !held) {
    j->fin[(i - 1) % LPAR_WINDOW] = 1;
    if (j->o.unordered)
      j->queue[j->qtail++ % LPAR_WINDOW] = i;
  }
  if (lua_isnil(L, -1))
    lua_pop(L, 1);
  else {
    if (!j->sized && !j->stream) {
      /* made now rather than at submit, so that filling it does not copy
         pages the caller shares with workers forked before */
      j->sized = 1;
      lua_createtable(L, j->n < INT32_MAX ? (int)j->n : 0, 0);
      lua_rawseti(L, juv, JU_RESULTS);
    }
    lua_rawgeti(L, juv, JU_RESULTS);
    lua_insert(L, -2);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
  }
  j->done++;
  c->e->stored++;
}

/*
** Item i of job j failed with the error value and traceback at the top of
** the stack (both popped), of kind 'code' (kind.h): run again if it has
** retries left, recorded when collecting, else the job fails with "item
** i: <message>\n<traceback>". 'self' as for endjob.
*/
static void itemfailed(Ctx *c, Job *j, lua_Integer i, EWorker *self, int code) {
  lua_State *L = c->L;
  char prefix[48];
  int uv;
  if (j->o.retries > 0 && !j->o.slice) { /* a batch's records retry alone */
    lua_Integer tries;
    uv = pushjob(c, j);
    if (lua_rawgeti(L, uv, JU_ATTEMPTS) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawseti(L, uv, JU_ATTEMPTS);
    }
    lua_rawgeti(L, -1, i);
    tries = lua_tointeger(L, -1);
    if (lpar_policy_retry(tries, j->o.retries)) {
      if (j->o.onevent) { /* this try ends; the next starts when handed out */
        int top = lua_gettop(L);
        tellend(c, j, uv, i, uv - 3, code, -1, 0, 0);
        lua_settop(L, top);
      }
      lua_pushinteger(L, tries + 1);
      lua_rawseti(L, -3, i);
      lua_pop(L, 6); /* count, attempts, uservalue, job, error, traceback */
      /* it failed before: a suspect, run alone, so that losing its worker
         again names it */
      nomem(L, lpar_ranges_push(&j->redo, i, 1, 1));
      return;
    }
    lua_pop(L, 4);
  }
  if (j->o.collect) {
    lpar_worker_failure(L, NULL);
    uv = pushjob(c, j);
    lua_rawgeti(L, uv, JU_ERRORS);
    lua_pushvalue(L, uv - 2);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
    if (code != LPAR_KERROR) { /* the kinds of failures but Lua errors */
      if (lua_rawgeti(L, uv, JU_KINDS) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_rawseti(L, uv, JU_KINDS);
      }
      lua_pushinteger(L, code);
      lua_rawseti(L, -2, i);
      lua_pop(L, 1);
    }
    lua_pushnil(L);
    store(c, j, uv, i);
    j->failed++;
    lua_pop(L, 3);
    settle(c, j);
    return;
  }
  snprintf(prefix, sizeof prefix, "item %lld: ", (long long)i);
  lpar_worker_failure(L, prefix);
  failjob(c, j, self, code);
}

/* ---- workers lost ---- */

/* Make the engine unusable: 'why' on top (popped), of kind 'code', fails
   every job. */
static void breakengine(Ctx *c, int code) {
  lua_State *L = c->L;
  lua_pushvalue(L, -1);
  lua_rawseti(L, c->uv, EU_BROKEN);
  c->e->brokencode = code;
  while (c->e->jobs) {
    lua_pushvalue(L, -1);
    failjob(c, c->e->jobs, NULL, code);
  }
  lua_pop(L, 1);
}

/* Hand the chunks w holds back to their job, as they are. */
static void giveback(Ctx *c, EWorker *w, int from) {
  Job *j = w->job;
  int k;
  if (j == NULL || j->state != J_RUNNING)
    return;
  for (k = w->nq - 1; k >= from; k--) {
    lua_Integer skip = k == 0 ? w->got : 0;
    nomem(c->L, lpar_ranges_push(&j->redo, w->q[k].first + skip,
                                 w->q[k].count - skip, w->q[k].alone));
  }
}

/*
** Host w is gone or must go: its command is killed and reaped, and the
** chunks it held go back to their job as they are, unblamed (the host
** failed, not an item: a failing item is the agent's to name). Said on
** stderr. A host lost LPAR_HOSTFAILS times with no chunk done in between,
** or before its agent said HELLO, is left out; else it starts again a
** little later. With no host left and no local place, the engine breaks.
*/
static void losehost(Ctx *c, EWorker *w, int force, const char *why) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int status = 0, rc;
  lua_Integer inflight = 0;
  char desc[96];
  const char *name = hostname(c, w);
  int k;
  /* a frame it broke cannot be the item's doing (a relay, its agent):
     that item goes back too */
  if (w->blame && w->nq > 0 && w->blame >= w->q[0].first &&
      w->blame - w->q[0].first < w->got)
    w->got = w->blame - w->q[0].first;
  w->blame = 0;
  for (k = 0; k < w->nq; k++)
    inflight += w->q[k].count - (k == 0 ? w->got : 0);
  closeworker(e, w);
  if (force) /* its agent stops its workers (and their children) first */
    lpar_proc_killproc(&w->proc, SIGTERM);
  rc = lpar_proc_reap(&w->proc, 0, &status);
  lpar_proc_closepid(&w->proc);
  if (why == NULL)
    why = rc < 0 ? "vanished (reaped elsewhere)"
                 : lpar_proc_describe(status, desc, sizeof desc);
  if (w->job != NULL && w->job->state == J_RUNNING)
    giveback(c, w, 0);
  else
    inflight = 0;
  w->hostfails++;
  if (!w->dropped && (!w->hello || w->hostfails >= LPAR_HOSTFAILS)) {
    leaveout(c, w,
             lua_pushfstring(L, "its command %s%s", why,
                             w->hello ? ", again and again" : ""));
    lua_pop(L, 1);
  }
  else if (!w->dropped)
    fprintf(stderr, "lpar: host '%s' was lost (its command %s)\n", name, why);
  if (inflight > 0)
    fprintf(stderr, "lpar: %lld item%s of host '%s' run again elsewhere\n",
            (long long)inflight, inflight == 1 ? "" : "s", name);
  fflush(stderr);
  w->retryat = lpar_proc_now() + (long long)w->hostfails * 1000000000LL;
  vacate(e, w);
  checkhosts(c);
}

/*
** Worker w is gone or must go: reap it (killing it first if 'force'),
** name the item it was running, and queue the rest of its chunk again.
** 'why' overrides the wait status in the message, and 'code' its kind
** (kind.h; 0: from the wait status).
*/
static void lose(Ctx *c, EWorker *w, int force, const char *why, int code) {
  lua_State *L = c->L;
  Engine *e = c->e;
  pid_t pid = w->proc.pid;
  Slot *slot = &e->slots[w - e->w];
  Job *j = w->job;
  int status = 0, rc, starting = w->state == W_STARTING;
  int broke = why != NULL; /* a reason given: not its death's */
  lua_Integer culprit, from, end, got;
  int suspects, nq;
  Chunk q0;
  char desc[96];
  if (w->host) {
    losehost(c, w, force, why);
    return;
  }
  closeworker(e, w);
  rc = lpar_proc_reap(&w->proc, force, &status);
  lpar_proc_closepid(&w->proc);
  if (why == NULL)
    why = rc < 0 ? "vanished (reaped elsewhere)"
                 : lpar_proc_describe(status, desc, sizeof desc);
  if (code == 0)
    code = rc < 0 ? LPAR_KLOST : lpar_kind_fromstatus(status);
  if (starting) {
    giveback(c, w, 0); /* nothing of them ran */
    vacate(e, w);
    if (w->timedout == LPAR_SLOTHOOK) { /* stopped in init */
      if (lua_rawgeti(L, c->uv, EU_INITERR) == LUA_TNIL) {
        char secs[32];
        lua_pushfstring(L, "worker init timed out after %s s",
                        lpar_proc_secs(e->o.timeout, secs, sizeof secs));
        lua_rawseti(L, c->uv, EU_INITERR);
        e->initcode = LPAR_KINIT;
      }
      lua_pop(L, 1);
    }
    else if ((!force || broke) && slot->item == LPAR_SLOTHOOK) {
      /* it died in init, or broke the protocol there */
      if (lua_rawgeti(L, c->uv, EU_INITERR) == LUA_TNIL) {
        lua_pushfstring(L, "worker init failed: worker %d %s", (int)pid, why);
        lua_rawseti(L, c->uv, EU_INITERR);
        e->initcode = LPAR_KINIT;
      }
      lua_pop(L, 1);
    }
    lua_rawgeti(L, c->uv, EU_INITERR);
    /* one worker's init failing is the failure of a call's engine, or of
       a pool being made; a pool that lives on tries a few times */
    if ((!lua_isnil(L, -1) && (e->creating || e->o.ondemand)) ||
        ++e->startfails > 2 * e->o.n + 2) {
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      }
      else
        code = e->initcode;
      breakengine(c, code);
    }
    else
      lua_pop(L, 1);
    return;
  }
  if (j != NULL && j->state == J_RUNNING && w->nq > 0)
    giveback(c, w, 1); /* the chunk waiting its turn goes back as it is */
  q0 = w->q[0];
  nq = w->nq;
  got = w->got;
  vacate(e, w);
  if (j == NULL || j->state != J_RUNNING || nq == 0)
    return;
  from = q0.first + got;
  end = q0.first + q0.count;
  culprit = w->blame ? 0
                     : lpar_policy_culprit(q0.first, q0.count, got,
                                           (lua_Integer)slot->item, w->timedout,
                                           q0.alone);
  nomem(L, lpar_ranges_requeue(&j->redo, from, end, culprit, !w->blame));
  suspects = culprit == 0 && !w->blame && from < end;
  if (w->blame) /* it broke the protocol reporting this one */
    culprit = w->blame;
  if (culprit) {
    if (w->timedout) {
      lua_pushfstring(L, "timed out after %s s",
                      lpar_proc_secs(j->o.timeout, desc, sizeof desc));
      code = LPAR_KTIMEOUT;
    }
    else
      lua_pushfstring(L, "worker %d %s", (int)pid, why);
    /* a batch that said how far it got: the record it was running is
       named, {message = ..., record = k} */
    if (j->o.slice || (j->o.batched && culprit == (lua_Integer)slot->item &&
                       slot->part >= 0)) { /* {message, record} */
      lua_createtable(L, 0, 2);
      lua_insert(L, -2);
      lua_setfield(L, -2, "message");
      if (culprit == (lua_Integer)slot->item && slot->part >= 0) {
        lua_pushinteger(L, (lua_Integer)slot->part + 1);
        lua_setfield(L, -2, "record");
      }
    }
    lua_pushnil(L);
    itemfailed(c, j, culprit, NULL, code);
  }
  /* a loss that sent items back as suspects is bound to name one of them
     if it happens again: only the others count towards the limit */
  else if (!suspects) {
    if (++j->lost > 2 * e->o.n + 2) {
      lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      failjob(c, j, NULL, code);
    }
  }
}

static void protoerror(Ctx *c, EWorker *w, const char *what) {
  char why[256];
  snprintf(why, sizeof why, "broke the protocol (%s)", what);
  lose(c, w, 1, why, LPAR_KPROTOCOL);
}

/* ---- sending ---- */

/* Send what is pending to w, watching its fd while some is left. 0, or
   -errno if the worker cannot be written. */
static int sendsome(Engine *e, EWorker *w) {
  int rc = lpar_wire_sendsome(w->proc.cmdfd, &w->out, &w->outpos);
  if (rc != 0)
    return rc;
  if (w->outpos < w->out.n && !w->watchout) {
    rc = evctl(e, EPOLL_CTL_ADD, w->proc.cmdfd, EPOLLOUT,
               EVDATA(EV_CMD, w - e->w));
    if (rc != 0)
      return rc;
    w->watchout = 1;
  }
  else if (w->outpos == w->out.n && w->watchout) {
    evctl(e, EPOLL_CTL_DEL, w->proc.cmdfd, 0, 0);
    w->watchout = 0;
  }
  if (w->outpos == w->out.n && w->out.cap > LPAR_KEEPOUT) {
    lpar_buf_free(&w->out); /* a long item, sent: not held until the next */
    w->outpos = 0;
  }
  return 0;
}

/* Items of j handed out so far, fresh ones only. */
static lua_Integer handed(Job *j) {
  return j->stream ? j->n : j->next - 1;
}

/* How many more fresh items j may hand out now: results waiting to be
   taken (imap), or a stream's items in flight, stay within
   LPAR_WINDOW. */
static lua_Integer room(Job *j) {
  lua_Integer left = j->stream ? LPAR_WINDOW : j->n - j->next + 1;
  lua_Integer win =
      LPAR_WINDOW - (handed(j) - (j->fin ? j->emit - 1 : j->done));
  if (j->fin || j->stream)
    return win < left ? win : left;
  return left;
}

static int workleft(Job *j) {
  if (j->state != J_RUNNING || j->halting)
    return 0;
  if (j->redo.n > 0)
    return 1;
  if (j->stream)
    return !j->exhausted && !j->pending && room(j) > 0;
  return j->next <= j->n && room(j) > 0;
}

/* Whether j has handed out every item (none left to hand out again). */
static int drained(Job *j) {
  return j->redo.n == 0 && (j->stream ? j->exhausted : j->next > j->n);
}

/* Items of j not handed out yet (fresh or again); -1: unknown. */
static lua_Integer itemsleft(Job *j) {
  if (j->stream)
    return j->exhausted ? j->redo.items : -1;
  return j->n - j->next + 1 + j->redo.items;
}

/* The time per item (per record for a batched job) that stream j's next
   chunk is sized by: the time learnt, raised by any of its chunks that is
   overdue by the time it was sized by (see lpar_policy_pace). */
static double pace(Engine *e, Job *j) {
  long long now = 0;
  double tns = j->tns;
  int i;
  for (i = 0; i < e->o.n && tns > 0; i++) {
    EWorker *w = &e->w[i];
    if (w->job == j && w->nq > 0 && w->state == W_BUSY) {
      double t;
      if (now == 0)
        now = lpar_proc_now();
      t = lpar_policy_pace(w->q[0].tns, now - w->started, w->q[0].weight,
                           LPAR_OVERDUENS);
      if (t > tns)
        tns = t;
    }
  }
  return tns;
}

/* Chunk size (see lpar_policy_chunk), in records for a batched job. The
   engine of a call amortizes
   forks (LPAR_MINCHUNKS of work at least, more for a stream, which has
   no tail to balance until it ends); one that lives on only a round trip
   (LPAR_POOLCHUNKNS), with at most LPAR_POOLPROBE items until the time
   per item is known. */
static lua_Integer chunksize(Engine *e, Job *j) {
  SchedChunk s = {0};
  s.fixed = j->o.chunk;
  s.left = itemsleft(j);
  s.places = e->o.n;
  s.tns = j->stream ? pace(e, j) : j->tns;
  if (e->o.ondemand) {
    s.minns = (j->stream ? 4.0 : 1.0) * LPAR_MINCHUNKNS;
    s.max = j->stream && j->o.chunk <= 0 ? LPAR_MAXSTREAMCHUNK : 0;
  }
  else {
    s.minns = LPAR_POOLCHUNKNS;
    s.probe = LPAR_POOLPROBE;
    s.max = LPAR_POOLMAXCHUNK;
  }
  return (lua_Integer)lpar_policy_chunk(&s);
}

/* Workers of the engine that can run a job now: local places and the
   agents' workers of the hosts that said HELLO. */
static int workers(Engine *e) {
  int i, n = nlocal(e);
  for (i = nlocal(e); i < e->o.n; i++)
    if (e->w[i].state != W_EMPTY && e->w[i].hello)
      n += e->w[i].hostn;
  return n > 0 ? n : 1;
}

/* Chunk size for host w (see lpar_policy_hostchunk): each of its workers
   gets a chunk that is long next to a round trip (LPAR_HOSTCHUNKNS). */
static lua_Integer hostchunk(Engine *e, Job *j, EWorker *w) {
  SchedChunk s = {0};
  s.fixed = j->o.chunk;
  s.left = itemsleft(j);
  s.places = workers(e);
  s.tns = j->tns;
  s.minns = lpar_policy_hostwork(LPAR_HOSTCHUNKNS, w->rtt);
  s.probe = LPAR_POOLPROBE;
  s.max = LPAR_POOLMAXCHUNK;
  return (lua_Integer)lpar_policy_hostchunk(&s, w->hostn);
}

/* The CALL frame of job j as hosts take it: the timeout per item (ns)
   before the function. */
static void makehostcall(lua_State *L, Job *j) {
  Frame f;
  nomem(L, lpar_buf_reserve(&j->hostcall, j->call.n + 8));
  lpar_wire_getheader(j->call.p, &f);
  f.len += 8;
  lpar_wire_putheader(j->hostcall.p, &f);
  lpar_wire_put64(j->hostcall.p + LPAR_HDRSIZE,
                  (uint64_t)(j->o.timeout > 0 ? j->o.timeout * 1e9 : 0));
  memcpy(j->hostcall.p + LPAR_HDRSIZE + 8, j->call.p + LPAR_HDRSIZE,
         j->call.n - LPAR_HDRSIZE);
  j->hostcall.n = j->call.n + 8;
}

/* lua_CFunction: (iterator [, want]) -> its next item and what follows
   it (the fd after lpar.pending; a batch's record count), under
   lua_pcall. */
static int callnext(lua_State *L) {
  lua_call(L, lua_gettop(L) - 1, 2);
  return 2;
}

/* Items of stream j handed out and not reported yet. */
static lua_Integer inflight(Job *j) {
  return j->n + j->nkids - j->done - j->redo.items;
}

static int emittable(Job *j);

/* Whether j's items come from an iterator that may block (one with no
   wakefd) and its results are taken one by one (imap): then it is not
   asked while a result is ready to go back (see pollfirst), nor for a
   busy worker's second chunk. */
static int mayblock(const Job *j) {
  return j->stream && j->fin != NULL && j->o.wakefd < 0 && !j->exhausted;
}

/* Stream j's iterator returned lpar.pending, with what follows it at
   'fdidx': pulling waits until that fd (else the job's wakefd) is
   readable, or a result is taken (one in flight, or one done that the
   caller has still to take). 0, or -1 if there is nothing to wait for
   (the job failed). */
static int pending(Ctx *c, Job *j, int fdidx) {
  lua_State *L = c->L;
  int isfd, d, rc;
  lua_Integer fd = lua_tointegerx(L, fdidx, &isfd);
  if (!isfd || fd < 0 || fd > INT32_MAX)
    fd = j->o.wakefd;
  if (fd < 0) {
    if (inflight(j) == 0 && !(j->fin != NULL && emittable(j))) {
      lua_pushliteral(L, "the items iterator returned lpar.pending with no "
                         "fd to wait on and no result to wait for");
      failjob(c, j, NULL, LPAR_KERROR);
      return -1;
    }
    j->pending = 1; /* asked again as a result comes */
    return 0;
  }
  if (j->watchwake && j->wakesrc == fd) {
    j->pending = 1;
    return 0;
  }
  unwatchwake(c->e, j);
  /* a copy is watched: the same fd may be another job's too */
  d = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) {
    lua_pushfstring(L, "cannot wait on fd %d for the items iterator: %s",
                    (int)fd, strerror(errno));
    failjob(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  rc = evctl(c->e, EPOLL_CTL_ADD, d, EPOLLIN, EVDATA(EV_WAKE, j->id));
  if (rc == -EPERM) { /* a regular file: always readable, ask again */
    close(d);
    c->e->vacated = 1; /* the pump looks again without waiting */
    return 1;
  }
  if (rc != 0) {
    close(d);
    lua_pushfstring(L, "cannot wait on fd %d for the items iterator: %s",
                    (int)fd, strerror(-rc));
    failjob(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  lpar_proc_track(d);
  j->watchwake = 1;
  j->wakefd = d;
  j->wakesrc = (int)fd;
  j->pending = 1;
  return 0;
}

/*
** Whether the iterator at 'idx' reads a Lua file (file:lines, io.lines):
** a C closure whose first upvalue is an open file. Then its fd goes in
** *fd, and the file is returned, so that the engine waits for the fd
** rather than ask the iterator while nothing can be read (see
** fileready): results that are ready go back meanwhile. NULL if not, or
** where stdio's buffer cannot be seen (not glibc).
*/
static luaL_Stream *fileiter(lua_State *L, int idx, int *fd) {
#if defined(__GLIBC__)
  luaL_Stream *s = NULL;
  if (lua_iscfunction(L, idx) && lua_getupvalue(L, idx, 1) != NULL) {
    s = luaL_testudata(L, -1, LUA_FILEHANDLE);
    lua_pop(L, 1);
    if (s != NULL && (LPAR_STREAMCLOSED(s) || s->f == NULL || fileno(s->f) < 0))
      s = NULL;
    if (s != NULL)
      *fd = fileno(s->f);
  }
  return s;
#else
  (void)L, (void)idx, (void)fd;
  return NULL;
#endif
}

/* Whether reading file s (fd 'fd') can give bytes without waiting: stdio
   holds some, or the fd is readable (or at its end); a closed file too
   (its iterator says so). */
static int fileready(luaL_Stream *s, int fd) {
#if defined(__GLIBC__)
  struct pollfd p;
  int n;
  if (LPAR_STREAMCLOSED(s) || s->f->_IO_read_ptr < s->f->_IO_read_end)
    return 1;
  p.fd = fd;
  p.events = POLLIN;
  do
    n = poll(&p, 1, 0);
  while (n == -1 && errno == EINTR);
  return n != 0;
#else
  (void)s, (void)fd;
  return 1;
#endif
}

/*
** Ask stream j (uservalue at 'juv') for its next item: 1 with the item
** pushed (counted, and kept in flight); 0 with nothing pushed when it has
** ended or has none yet (lpar.pending); -1 when it raised or waits on an
** fd that cannot be (the job failed).
*/
static int askiter(Ctx *c, Job *j, int juv) {
  lua_State *L = c->L;
  lua_Integer weight = 1;
  if (j->file != NULL && !fileready(j->file, j->o.wakefd)) {
    int rc;
    lua_pushnil(L); /* no fd of its own: the file's */
    rc = pending(c, j, lua_gettop(L));
    lua_pop(L, 1);
    if (rc <= 0)
      return rc;
  }
  lua_pushcfunction(L, callnext);
  lua_rawgeti(L, juv, JU_ITEMS);
  if (j->o.batched)
    lua_pushinteger(L, chunksize(c->e, j));
  if (lua_pcall(L, j->o.batched ? 2 : 1, 2, 0) != LUA_OK) {
    failjob(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  lua_insert(L, -2); /* the item on top, what follows it below */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 2);
    j->exhausted = 1;
    unwatchwake(c->e, j);
    settle(c, j); /* its items may all be in */
    return 0;
  }
  if (lua_touserdata(L, -1) == &pendingkey) {
    int rc = pending(c, j, lua_gettop(L) - 1);
    lua_pop(L, 2);
    return rc < 0 ? -1 : 0;
  }
  if (j->o.batched) {
    int isnum;
    weight = lua_tointegerx(L, -2, &isnum);
    if (!isnum || weight < 1) {
      const char *got = luaL_tolstring(L, -2, NULL);
      lua_pushfstring(L,
                      "the items iterator (batched) gave %s as the record "
                      "count of its batch %I, not a positive integer",
                      got, (LUAI_UACINT)(j->n + 1));
      lua_replace(L, -4);
      lua_pop(L, 2);
      failjob(c, j, NULL, LPAR_KERROR);
      return -1;
    }
  }
  lua_remove(L, -2);
  j->n++;
  if (j->recs != NULL)
    j->recs[(j->n - 1) % LPAR_WINDOW] = weight;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, j->n);
  lua_pop(L, 1);
  return 1;
}

/*
** Pull up to 'max' fresh items of stream j (uservalue at juv) into w->out;
** returns how many, or -1 if the job failed (the iterator raised, or an
** item cannot be sent).
*/
static lua_Integer pull(Ctx *c, Job *j, int juv, EWorker *w, lua_Integer max) {
  lua_State *L = c->L;
  lua_Integer k = 0;
  while (k < max && !j->exhausted && !j->pending && room(j) > 0 &&
         !(mayblock(j) && emittable(j))) {
    int rc = askiter(c, j, juv);
    if (rc <= 0)
      return rc < 0 ? -1 : k;
    if (lpar_codec_encode(L, -1, &w->out) != 0) {
      lua_pushfstring(L, "item %I: cannot send item: %s", (LUAI_UACINT)j->n,
                      lua_tostring(L, -1));
      lua_replace(L, -3);
      lua_pop(L, 1);
      failjob(c, j, NULL, LPAR_KERROR);
      return -1;
    }
    lua_pop(L, 1);
    k++;
  }
  return k;
}

/* Records in part k (see "records"). */
static lua_Integer partsize(Ctx *c, int juv, lua_Integer k) {
  lua_Integer n;
  lua_rawgeti(c->L, juv, JU_KIDS);
  lua_rawgeti(c->L, -1, k);
  lua_getfield(c->L, -1, "n");
  n = lua_tointeger(c->L, -1);
  lua_pop(c->L, 3);
  return n > 0 ? n : 1;
}

/* Encode items first .. first+count-1 of the table at 'tidx' into
   w->out; 0, or -1 with the job failed. */
static int putitems(Ctx *c, Job *j, int tidx, EWorker *w, lua_Integer first,
                    lua_Integer count) {
  lua_State *L = c->L;
  lua_Integer i;
  for (i = first; i < first + count; i++) {
    lua_geti(L, tidx, i);
    if (lpar_codec_encode(L, -1, &w->out) != 0) {
      lua_pushfstring(L, "item %I: cannot send item: %s", (LUAI_UACINT)i,
                      lua_tostring(L, -1));
      lua_replace(L, -3);
      lua_pop(L, 1);
      failjob(c, j, NULL, LPAR_KERROR);
      return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/*
** Hand worker w a chunk of job j (uservalue at 'juv'): the job's function
** first if w does not hold it, then the items (a range of the inherited
** table, or encoded). Nothing is sent when a stream has no item ready.
*/
static void assign(Ctx *c, EWorker *w, Job *j, int juv) {
  lua_State *L = c->L;
  int alone = 0, type = j->o.inherit ? LPAR_FWORK : LPAR_FITEMS;
  lua_Integer first, count;
  size_t at, start;
  int top = lua_gettop(L);
  Frame f;
  if (w->outpos == w->out.n) /* all sent: start afresh */
    w->out.n = w->outpos = 0;
  start = w->out.n;
  if (w->fnjob != j->id && w->host) {
    if (j->hostcall.n == 0)
      makehostcall(L, j);
    nomem(L, lpar_buf_add(&w->out, j->hostcall.p, j->hostcall.n));
  }
  else if (w->fnjob != j->id)
    nomem(L, lpar_buf_add(&w->out, j->call.p, j->call.n));
  if (w->fnjob != j->id)
    w->fresh = 1;
  at = w->out.n;
  nomem(L, lpar_buf_reserve(&w->out, LPAR_HDRSIZE + 8));
  w->out.n += LPAR_HDRSIZE + 8;
  /* a batched job's chunk is one batch, of the records the policy wants
     (asked of the iterator); a host's, as many batches as make its share
     of records */
  if (j->o.batched && w->host) {
    lua_Integer per = chunksize(c->e, j);
    count = (hostchunk(c->e, j, w) + per - 1) / per;
    if (count < w->hostn)
      count = w->hostn;
  }
  else if (j->o.batched)
    count = 1;
  else
    count = w->host ? hostchunk(c->e, j, w) : chunksize(c->e, j);
  if (count > LPAR_MAXFRAMECOUNT) /* a frame's count is a u32 */
    count = LPAR_MAXFRAMECOUNT;
  if (j->redo.n > 0) {
    long long from;
    count = lpar_ranges_take(&j->redo, count, &from, &alone);
    first = from;
    if (!j->o.inherit)
      lua_rawgeti(L, juv, j->stream ? JU_INFLIGHT : JU_ITEMS);
  }
  else if (j->stream) {
    first = j->n + 1;
    count = pull(c, j, juv, w, count);
  }
  else {
    lua_Integer r = room(j);
    first = j->next;
    if (count > r)
      count = r;
    j->next += count;
    if (!j->o.inherit)
      lua_rawgeti(L, juv, JU_ITEMS);
  }
  if (lua_gettop(L) > top) { /* items from a table */
    int rc = putitems(c, j, top + 1, w, first, count);
    lua_settop(L, top);
    if (rc != 0)
      count = -1;
  }
  if (count <= 0) { /* nothing, or the job failed: the frame never leaves */
    w->out.n = start;
    settle(c, j); /* a stream that ended may be complete now */
    return;
  }
  f.type = (uint32_t)type;
  f.count = (uint32_t)count;
  f.len = w->out.n - at - LPAR_HDRSIZE;
  lpar_wire_putheader(w->out.p + at, &f);
  lpar_wire_put64(w->out.p + at + LPAR_HDRSIZE, (uint64_t)first);
  w->fnjob = j->id;
  if (w->state == W_IDLE)
    w->state = W_BUSY;
  w->job = j;
  w->q[w->nq].first = first;
  w->q[w->nq].count = count;
  w->q[w->nq].weight = count;
  w->q[w->nq].tns = j->tns;
  if (j->recs != NULL) { /* the records of its batches */
    lua_Integer k;
    w->q[w->nq].weight = 0;
    for (k = first; k < first + count; k++)
      w->q[w->nq].weight +=
          k > KIDBASE ? partsize(c, juv, k) : j->recs[(k - 1) % LPAR_WINDOW];
  }
  w->q[w->nq].alone = alone;
  if (w->nq++ == 0) {
    w->got = 0;
    w->busy = 0;
    w->started = lpar_proc_now();
    c->e->slots[w - c->e->w].cut = 0;
  }
  if (j->o.onevent) {
    lua_Integer k;
    for (k = first; k < first + count && j->state == J_RUNNING; k++)
      tellstart(c, j, juv, k, w);
  }
  if (sendsome(c->e, w) != 0) /* gone, or going: reaped as it ends */
    lose(c, w, 0, NULL, 0);
}

/* The highest first item of the chunks w holds: a slot cut there asks
   them all to end early (parts of batches have higher indices than the
   batches after them, see "records"). */
static long long lastitem(const EWorker *w) {
  long long at = 0;
  int k;
  for (k = 0; k < w->nq; k++)
    if (w->q[k].first > at)
      at = w->q[k].first;
  return at;
}

/* Whether busy worker w should get a second chunk of its job now, to
   start as soon as it is done with the first rather than wait for the
   parent (see lpar_policy_prefetch). */
static int prefetch(Engine *e, EWorker *w, long long now) {
  Job *j = w->job;
  if (w->state != W_BUSY || w->nq != 1 || j == NULL || !workleft(j))
    return 0;
  if (mayblock(j)) /* its results go back before its iterator is asked */
    return 0;
  if (w->host) /* a round trip away: its next chunk waits there */
    return 1;
  if (e->slots[w - e->w].cut >= w->q[0].first) /* overdue: not behind it */
    return 0;
  return lpar_policy_prefetch(j->tns, w->q[0].weight, now - w->started,
                              e->o.ondemand ? LPAR_MINCHUNKNS
                                            : LPAR_POOLCHUNKNS,
                              itemsleft(j) < 0 ? LPAR_WINDOW : itemsleft(j),
                              e->o.n, j->o.batched ? 1 : chunksize(e, j));
}

/* Whether w may be handed a chunk: live and holding none (a worker still
   in init takes it after init). */
static int takes(const EWorker *w) {
  if (w->host) /* once its agent runs */
    return w->state == W_IDLE && w->nq == 0;
  return (w->state == W_IDLE || w->state == W_STARTING) && w->nq == 0;
}

/* Whether some job has everything handed out (nothing to wait for). */
static int alldrained(Engine *e) {
  Job *j;
  for (j = e->jobs; j; j = j->nextjob)
    if (!drained(j))
      return 0;
  return 1;
}

/*
** Give every idle worker a chunk of the oldest job with work left. Then,
** if there is still work, give busy workers whose items are quick a second
** chunk of their job. An engine that retires its workers lets the idle
** ones go once every item is handed out.
*/
static void dispatch(Ctx *c) {
  Engine *e = c->e;
  Job *j = e->waited;
  int i, juv = 0;
  lua_State *L = c->L;
  int top = lua_gettop(L);
  /* the job the caller waits for goes first (a side job waited for in
     the body of another's loop must not queue behind it) */
  for (i = 0; j && i < e->o.n && workleft(j) && j->state == J_RUNNING; i++) {
    EWorker *w = &e->w[i];
    if (!takes(w) || (w->host && j->o.inherit))
      continue;
    if (juv == 0)
      juv = pushjob(c, j);
    assign(c, w, j, juv);
  }
  lua_settop(L, top);
  juv = 0;
  j = e->jobs;
  for (i = 0; i < e->o.n && j; i++) {
    EWorker *w = &e->w[i];
    if (!takes(w))
      continue;
    while (j && !workleft(j)) {
      j = j->nextjob;
      juv = 0;
      lua_settop(L, top);
    }
    if (j == NULL)
      break;
    if (w->host && j->o.inherit) /* items a host cannot have */
      continue;
    if (juv == 0)
      juv = pushjob(c, j);
    assign(c, w, j, juv);
    if (j->state != J_RUNNING) { /* it failed meanwhile */
      j = e->jobs;
      juv = 0;
      lua_settop(L, top);
    }
  }
  lua_settop(L, top);
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (prefetch(e, w, lpar_proc_now())) {
      assign(c, w, w->job, pushjob(c, w->job));
      lua_settop(L, top);
    }
  }
  if (e->o.retire && alldrained(e))
    for (i = 0; i < e->o.n; i++) {
      EWorker *w = &e->w[i];
      if (w->state == W_IDLE && w->nq == 0)
        retire(c, w);
    }
}

/*
** Whether job j has an item to hand out. A stream that has none at hand
** is asked for its next one (kept in flight, handed out first), so that
** no worker starts for items that do not exist.
*/
static int hasitem(Ctx *c, Job *j) {
  lua_State *L = c->L;
  int top = lua_gettop(L);
  if (!workleft(j))
    return 0;
  if (!j->stream || j->redo.n > 0)
    return 1;
  if (mayblock(j) && emittable(j)) /* it goes back first */
    return 0;
  if (askiter(c, j, pushjob(c, j)) > 0)
    nomem(L, lpar_ranges_add(&j->redo, j->n, 1)); /* handed out first */
  lua_settop(L, top);
  return j->state == J_RUNNING && j->redo.n > 0;
}

/* Whether the engine is broken (no worker will start). */
static int broken(Ctx *c) {
  int b = lua_rawgeti(c->L, c->uv, EU_BROKEN) != LUA_TNIL;
  lua_pop(c->L, 1);
  return b;
}

/* Start every host that is not running, not left out and not waiting to
   start again. */
static void refillhosts(Ctx *c) {
  Engine *e = c->e;
  long long now = lpar_proc_now();
  int i, starting = 0;
  for (i = nlocal(e); i < e->o.n; i++)
    starting += e->w[i].state == W_STARTING && !e->w[i].hello;
  for (i = nlocal(e); i < e->o.n && !broken(c); i++) {
    EWorker *w = &e->w[i];
    const char *call = "fork";
    int rc;
    if (w->state != W_EMPTY || w->dropped || now < w->retryat)
      continue;
    if (starting >= LPAR_HOSTWAVE)
      break; /* the next wave starts as these say HELLO */
    starting++;
    rc = spawnhost(c, i, &call);
    if (rc == 0 && sendsome(e, w) != 0)
      lose(c, w, 0, NULL, 0);
    else if (rc != 0) {
      char why[128];
      snprintf(why, sizeof why, "cannot start (%s: %s)", call, strerror(-rc));
      leaveout(c, w, why);
      checkhosts(c);
    }
  }
}

/* Fork a worker into the first empty place; 0 or -errno, *call set. */
static int spawnone(Ctx *c, const char **call) {
  int i;
  for (i = 0; i < nlocal(c->e); i++)
    if (c->e->w[i].state == W_EMPTY)
      return spawn(c, i, call);
  return 0;
}

/*
** Start workers: in every empty place (an engine that keeps them all), or
** one when none is running and there is work (an engine that starts them
** on demand; more follow in pump()). The first fork checks max_memory
** against the caller's heap, which the worker inherits; a replacement
** checks for itself, and says so as its init's failure.
*/
static void refill(Ctx *c) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int i, rc = 0;
  const char *call = "fork";
  Job *j;
  if (e->closed || broken(c))
    return;
  if (e->o.nhosts > 0) {
    refillhosts(c);
    if (broken(c) || nlocal(e) == 0)
      return;
  }
  if (e->o.ondemand) {
    if (e->live > 0)
      return;
    for (j = e->jobs; j && !hasitem(c, j); j = j->nextjob)
      ;
    if (j == NULL)
      return;
  }
  else if (e->live == nlocal(e))
    return;
  if (e->o.maxmem > 0 && e->forks == 0 &&
      lpar_worker_checkheap(L, e->o.maxmem)) {
    breakengine(c, LPAR_KMEMORY);
    return;
  }
  if (e->o.ondemand)
    rc = spawnone(c, &call);
  else
    for (i = 0; i < nlocal(e); i++)
      if (e->w[i].state == W_EMPTY) {
        int r = spawn(c, i, &call);
        if (r != 0)
          rc = r;
      }
  if (e->live == 0 && rc != 0) {
    lua_pushfstring(L, "cannot start a worker: %s: %s", call, strerror(-rc));
    breakengine(c, LPAR_KINIT);
  }
}

/* Time per item as the shared slots show it before any results came
   back: from a worker past the first item of its chunk; 0 if none is. */
static double slotestimate(Engine *e, long long now) {
  double est = 0;
  int i;
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->state != W_EMPTY && w->nq > 0) {
      double per = lpar_policy_slotrate(now - w->started, w->q[0].first,
                                        (lua_Integer)e->slots[i].item);
      if (per > est)
        est = per;
    }
  }
  return est;
}

/* For an engine that starts workers on demand, whether to start another
   now: 0 yes, -1 no, else ask again in this many ms (see
   lpar_policy_spawn). */
static Job *canspawn(Ctx *c) {
  Engine *e = c->e;
  Job *j;
  int i;
  if (!e->o.ondemand || e->closed || e->live == 0 || e->live >= e->cap)
    return NULL;
  for (i = 0; i < e->o.n; i++)
    if (takes(&e->w[i]))
      return NULL;
  for (j = e->jobs; j && !hasitem(c, j); j = j->nextjob)
    ;
  return j;
}

static int spawnwait(Ctx *c) {
  Engine *e = c->e;
  SchedSpawn s;
  Job *j = canspawn(c);
  if (j == NULL)
    return -1;
  s.now = lpar_proc_now();
  /* per item: a batched job's items are batches of chunksize records */
  s.tns = j->tns > 0 ? j->tns * (j->o.batched ? (double)chunksize(e, j) : 1.0)
                     : slotestimate(e, s.now);
  s.left = itemsleft(j);
  s.live = e->live;
  s.pns = e->pns;
  s.pitems = e->pitems;
  s.worthns = LPAR_FORKWORTHNS;
  s.wavegap = LPAR_SPAWNWAITNS;
  return lpar_policy_spawn(&s, &e->wave);
}

/* ---- receiving ---- */

/* Decode the error value and traceback after the u64 index of an ERROR
   frame's payload; 0, or -1 with a message pushed. */
static int geterror(lua_State *L, const char *p, size_t len) {
  size_t pos = 8;
  if (lpar_codec_decode(L, p, len, &pos) != 0)
    return -1;
  if (lpar_codec_decode(L, p, len, &pos) != 0) {
    lua_remove(L, -2);
    return -1;
  }
  if (pos != len) {
    lua_pop(L, 2);
    lua_pushliteral(L, "trailing bytes in a frame");
    return -1;
  }
  return 0;
}

/* Store the n values decoded aside (in the table at 'aside', [k + 1] for
   item first + k) as results of j (uservalue at 'juv'). */
static void storeaside(Ctx *c, Job *j, int juv, int aside, lua_Integer first,
                       uint32_t n) {
  uint32_t k;
  for (k = 0; k < n; k++) {
    lua_rawgeti(c->L, aside, (lua_Integer)k + 1);
    store(c, j, juv, first + k);
  }
}

/* Results of items first .. first+count-1 at p[16..len) from worker w.
   0, or -1 with a message pushed. */
static int results(Ctx *c, EWorker *w, const char *p, size_t len,
                   lua_Integer first, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  uint32_t k;
  size_t pos = 16;
  int juv, aside;
  if (j == NULL)
    return 0; /* dropped */
  if (first != w->q[0].first + w->got ||
      first - w->q[0].first + (lua_Integer)count > w->q[0].count) {
    lua_pushliteral(L, "result for an item it was not given");
    return -1;
  }
  juv = pushjob(c, j);
  if (w->got + (lua_Integer)count == w->q[0].count) {
    /* its chunk is done: learn from its timing, and give the engine of a
       call's worker its next chunk before decoding, so that it works
       while the caller does */
    j->tns = lpar_policy_learn(j->tns, j->tnsn, w->busy, w->q[0].weight);
    j->tnsn = w->q[0].weight;
    j->lost = 0;
    if (c->e->o.retire && w->nq == 1 && j == c->e->jobs && workleft(j))
      assign(c, w, j, juv);
    if (w->state == W_EMPTY || j->state != J_RUNNING) {
      lua_settop(L, juv - 2);
      return 0;
    }
  }
  else if (j->tns == 0) /* a first estimate before the chunk ends */
    j->tns = (double)(w->busy > 0 ? w->busy : 1) /
             (double)(w->got + (lua_Integer)count);
  /* decoded aside, and stored only once the frame has proved sound */
  lua_createtable(L, count < 1024 ? (int)count : 1024, 0);
  aside = lua_gettop(L);
  for (k = 0; k < count; k++) {
    if (lpar_codec_decode(L, p, len, &pos) != 0) {
      /* the item whose value this is fails (a worker sends the same
         bytes again if it runs again); the ones after it run again */
      storeaside(c, j, juv, aside, first, k);
      lua_replace(L, juv - 1);
      lua_settop(L, juv - 1);
      w->got += k + 1;
      w->blame = first + k;
      return -1;
    }
    lua_rawseti(L, aside, (lua_Integer)k + 1);
  }
  if (pos != len) { /* none is taken: its first item fails, the others
                       run again */
    lua_settop(L, juv - 2);
    lua_pushliteral(L, "trailing bytes in a frame");
    w->got += 1;
    w->blame = first;
    return -1;
  }
  storeaside(c, j, juv, aside, first, count);
  lua_settop(L, juv - 2);
  w->got += count;
  settle(c, j);
  return 0;
}

/* An ERROR frame for item i (0: init or loading the function failed), of
   kind 'code'. 0, or -1 with a message pushed. */
static int errorframe(Ctx *c, EWorker *w, const char *p, size_t len,
                      lua_Integer i, int code) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (geterror(L, p, len) != 0) {
    if (j != NULL && w->nq > 0 && i >= w->q[0].first + w->got &&
        i < w->q[0].first + w->q[0].count) { /* that item fails */
      w->got = i - w->q[0].first + 1;
      w->blame = i;
    }
    return -1;
  }
  if (i == 0 && w->state == W_STARTING && w->host) {
    /* its agent could not start: it says why and leaves (the engine
       breaks, if it must, as its stream ends) */
    lpar_worker_failure(L, NULL);
    leaveout(c, w, luaL_tolstring(L, -1, NULL));
    lua_pop(L, 2);
    return 0;
  }
  if (i == 0 && w->state == W_STARTING) {
    lpar_worker_failure(L, "worker init failed: ");
    lua_rawseti(L, c->uv, EU_INITERR);
    c->e->initcode = LPAR_KINIT;
    return 0; /* it leaves: lose() follows at end of file */
  }
  if (w->state != W_BUSY) {
    lua_pop(L, 2);
    lua_pushliteral(L, "error frame while idle");
    return -1;
  }
  if (j == NULL) {
    lua_pop(L, 2);
    return 0; /* dropped */
  }
  if (i == 0) {
    /* the job failed as a whole: its function did not load (a worker),
       or the host's own job failed; only as the answer to a CALL, with a
       message, and of a kind a worker sends */
    int kind = LPAR_KINDOF(code);
    if (!w->fresh || lua_type(L, -2) != LUA_TSTRING ||
        (!w->host && kind != LPAR_KERROR && kind != LPAR_KMEMORY)) {
      lua_pop(L, 2);
      lua_pushliteral(L, "error frame for no item");
      return -1;
    }
    lua_pop(L, 1); /* the message says it all */
    failjob(c, j, w, code);
    return 0;
  }
  if (i < w->q[0].first + w->got || i >= w->q[0].first + w->q[0].count) {
    lua_pop(L, 2);
    lua_pushliteral(L, "error for an item it was not given");
    return -1;
  }
  w->got = i - w->q[0].first + 1;
  if (w->got == w->q[0].count)
    j->lost = 0;
  itemfailed(c, j, i, w, code);
  return 0;
}

/* A READY frame: started (count 1) or done with its chunk (count 0).
   0, or -1 with a message pushed. */
static int readyframe(Ctx *c, EWorker *w, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (count == 1 && w->state == W_STARTING) {
    w->state = w->nq > 0 ? W_BUSY : W_IDLE;
    w->probeat = lpar_proc_now(); /* its round trip, at once */
    c->e->startfails = 0;
    return 0;
  }
  if (count != 0 || w->state != W_BUSY || w->nq == 0) {
    lua_pushliteral(L, "unexpected ready frame");
    return -1;
  }
  if (j != NULL && w->got != w->q[0].count) {
    lua_pushliteral(L, "chunk ended early");
    return -1;
  }
  w->q[0] = w->q[1];
  w->got = 0;
  w->busy = 0;
  w->started = lpar_proc_now();
  w->hostfails = 0; /* a host that finishes chunks is sound */
  if (--w->nq == 0) {
    w->state = W_IDLE;
    w->job = NULL;
  }
  return 0;
}

/* A HELLO frame from host w: its agent's versions must be this lpar's.
   0, or -1 with a message pushed. */
static int helloframe(Ctx *c, EWorker *w, const Frame *f, const char *p) {
  char why[400];
  if (lpar_hosts_checkversions(p, (size_t)f->len, "its agent", why,
                               sizeof why) != 0) {
    lua_pushstring(c->L, why);
    return -1;
  }
  if (f->count < 1) {
    lua_pushliteral(c->L, "its agent has no workers");
    return -1;
  }
  if (f->count > LPAR_MAXWORKERS) {
    snprintf(why, sizeof why, "its agent announces %lu workers, more than %d",
             (unsigned long)f->count, LPAR_MAXWORKERS);
    lua_pushstring(c->L, why);
    return -1;
  }
  w->hello = 1;
  w->hostn = (int)f->count;
  return 0;
}

/* Handle frame f (payload at p) from worker w: 0, or -1 when w broke the
   protocol with it (it is lost then). */
static int frame(Ctx *c, EWorker *w, const Frame *f, const char *p) {
  lua_State *L = c->L;
  int rc;
  c->e->from = w->host; /* what it stores is from there */
  if (f->type == LPAR_FRESULT && f->len >= 16 && f->count > 0 &&
      w->state == W_BUSY) {
    w->busy += (long long)lpar_wire_get64(p + 8);
    rc = results(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p),
                 f->count);
  }
  else if (f->type == LPAR_FERROR && f->len >= 8)
    rc = errorframe(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p),
                    lpar_kind_fromwire(f->count));
  else if (f->type == LPAR_FREADY && (!w->host || w->hello))
    rc = readyframe(c, w, f->count);
  else if (f->type == LPAR_FHELLO && w->host && !w->hello)
    rc = helloframe(c, w, f, p);
  else if (f->type == LPAR_FBEAT && w->host) {
    /* still there (lastread says so); a timed one came back */
    if (f->count == 1 && f->len == 8) {
      long long rtt = lpar_proc_now() - (long long)lpar_wire_get64(p);
      if (rtt > 0 && (w->rtt == 0 || rtt < w->rtt))
        w->rtt = rtt;
    }
    rc = 0;
  }
  else {
    lua_pushstring(L, f->type == LPAR_FRESULT ? "bad frame header"
                                              : "unexpected frame");
    rc = -1;
  }
  c->e->from = 0;
  if (f->type == LPAR_FRESULT || f->type == LPAR_FERROR ||
      f->type == LPAR_FREADY)
    w->fresh = 0; /* it answered the CALL */
  if (rc != 0) {
    char what[160];
    snprintf(what, sizeof what, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    protoerror(c, w, what);
  }
  return rc;
}

/* A RING frame: the frame w put in its ring at the place that p names;
   its space is handed back once it is handled. */
static int ringframe(Ctx *c, EWorker *w, const char *p) {
  uint64_t pos = lpar_wire_get64(p), n = lpar_wire_get64(p + 8);
  const char *q = lpar_ring_get(&w->ring, pos, n);
  Frame f;
  if (q == NULL || n < LPAR_HDRSIZE || lpar_wire_getheader(q, &f) != 0 ||
      f.len != n - LPAR_HDRSIZE || f.type == LPAR_FRING) {
    protoerror(c, w, "bad place in the ring");
    return -1;
  }
  if (frame(c, w, &f, q + LPAR_HDRSIZE) != 0)
    return -1;
  if (w->state != W_EMPTY)
    lpar_ring_release(&w->ring, pos + n);
  return 0;
}

/* Handle the whole frames w has sent; -1 if w is gone meanwhile. */
static int frames(Ctx *c, EWorker *w) {
  size_t at = 0;
  pid_t pid = w->proc.pid;
  for (;;) {
    Frame f;
    const char *p;
    if (w->host) /* the '\n' an agent writes after each frame */
      while (at < w->in.n && w->in.p[at] == '\n')
        at++;
    if (w->in.n - at < LPAR_HDRSIZE)
      break;
    if (lpar_wire_getheader(w->in.p + at, &f) != 0 ||
        (f.type == LPAR_FRING && f.len != 16)) {
      protoerror(c, w, "bad frame header");
      return -1;
    }
    if (f.len > w->in.n - at - LPAR_HDRSIZE)
      break; /* not all there yet */
    p = w->in.p + at + LPAR_HDRSIZE;
    if ((f.type == LPAR_FRING ? ringframe(c, w, p) : frame(c, w, &f, p)) != 0)
      return -1;
    if (w->state == W_EMPTY || w->proc.pid != pid)
      return -1; /* its job failed and took it along */
    at += LPAR_HDRSIZE + (size_t)f.len;
  }
  lpar_buf_drop(&w->in, at);
  return 0;
}

/* Read what worker w has sent and handle it. The time an engine of a
   call spends on it counts as the caller's cost per result. */
static void readworker(Ctx *c, EWorker *w) {
  Engine *e = c->e;
  long long t0 = e->o.ondemand ? lpar_proc_now() : 0;
  long long stored0 = e->stored;
  for (;;) {
    long k = lpar_wire_tryread(w->proc.resfd, &w->in);
    if (k == -EAGAIN)
      break;
    if (k == -ENOMEM) {
      char what[96];
      protoerror(c, w, lpar_wire_toolong(&w->in, what, sizeof what));
      return;
    }
    if (k <= 0) { /* end of file (a partial frame is dropped) or error */
      lose(c, w, k < 0, NULL, 0);
      return;
    }
    w->lastread = lpar_proc_now();
    if (frames(c, w) != 0)
      return;
  }
  if (e->o.ondemand) {
    e->pns += lpar_proc_now() - t0;
    e->pitems += e->stored - stored0;
  }
}

/* ---- time ---- */

/*
** A worker that is not running an item (idle, between items, or in its
** init, which sends nothing) and left a frame unfinished for the timeout
** (its job's, else the engine's, else LPAR_STALLNS) broke the protocol;
** what it sent so far is read first. Returns when to look again
** (ns; 0: never, -1: something was handled, the pump goes on).
*/
static long long stalled(Ctx *c, EWorker *w, long long now) {
  Engine *e = c->e;
  double secs =
      w->job && w->job->o.timeout > 0 ? w->job->o.timeout : e->o.timeout;
  long long limit = secs > 0 ? (long long)(secs * 1e9) : LPAR_STALLNS;
  char what[96], num[32];
  if (w->in.n == 0 || e->slots[w - e->w].item > 0)
    return 0;
  if (now < w->lastread + limit)
    return w->lastread + limit;
  readworker(c, w);
  if (w->state == W_EMPTY || w->in.n == 0 || now < w->lastread + limit)
    return -1;
  snprintf(what, sizeof what, "partial frame, nothing more for %s s",
           lpar_proc_secs(secs > 0 ? secs : (double)LPAR_STALLNS / 1e9, num,
                          sizeof num));
  protoerror(c, w, what);
  return -1;
}

/*
** A busy worker of a job with a timeout that is between items: one that
** has taken no item (nor sent a byte) for the timeout since its chunk
** came, its last item began or its last bytes came, is stopped (SIGSTOP,
** a debugger) or stuck outside any item; what it sent is read first. It
** is let go and its items go back as suspects, unblamed. Returns when to
** look again (ns), or -1 if it was let go.
*/
static long long idlelimit(Ctx *c, EWorker *w, long long now) {
  Engine *e = c->e;
  Slot *slot = &e->slots[w - e->w];
  long long t = w->started, limit;
  if (w->lastread > t)
    t = w->lastread;
  if (slot->since > t)
    t = slot->since;
  limit = t + (long long)(w->job->o.timeout * 1e9);
  if (w->in.n > 0) /* a frame begun: stalled() judges it */
    return limit;
  if (now < limit)
    return limit < now + LPAR_LOOKNS ? limit : now + LPAR_LOOKNS;
  readworker(c, w); /* what it sent counts */
  if (w->state != W_BUSY || slot->item != 0 || w->lastread > t || w->in.n > 0)
    return now + LPAR_LOOKNS; /* it moved on */
  w->q[0].alone = 0;          /* no item of its chunk is to blame */
  lose(c, w, 1, "took no item for the timeout", LPAR_KTIMEOUT);
  return -1;
}

/*
** Host w: lost when it sent nothing (not even BEAT) for its limit, what
** it sent being read first; sent BEAT when it was sent nothing for
** LPAR_BEATNS. Returns when to look again (ns), or -1 if it was lost.
*/
static long long hostdeadline(Ctx *c, EWorker *w, long long now) {
  /* until READY, the agent loads (the CLI's script runs there) */
  long long limit =
      w->state == W_STARTING ? LPAR_HOSTSTARTNS : LPAR_HOSTSILENCENS;
  long long due;
  if (now >= w->lastread + limit) {
    readworker(c, w); /* waiting bytes are not silence */
    if (w->state == W_EMPTY)
      return -1;
    if (now >= w->lastread + limit) {
      char why[96];
      snprintf(why, sizeof why, "sent nothing for %.0f s (stopped, or cut off)",
               (double)limit / 1e9);
      lose(c, w, 1, why, LPAR_KLOST);
      return -1;
    }
  }
  if (now >= w->probeat) { /* timed: the round trip is measured */
    char clock[8];
    lpar_wire_put64(clock, (uint64_t)now);
    hostframe(c, w, LPAR_FBEAT, 0, clock, sizeof clock);
    if (sendsome(c->e, w) != 0) {
      lose(c, w, 0, NULL, 0);
      return -1;
    }
    w->probeat = now + LPAR_BEATNS;
  }
  due = w->lastread + limit;
  return w->probeat < due ? w->probeat : due;
}

/* Timeouts per item and for init, stalled frames, TERM -> KILL
   escalation; arms the timer for the next deadline. Returns whether a
   worker was lost meanwhile (then do not wait: its place wants filling). */
static int deadlines(Ctx *c) {
  Engine *e = c->e;
  long long now = lpar_proc_now(), next = 0;
  int i, acted = 0;
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    long long due = 0, stall;
    if (w->host) {
      if (w->state != W_EMPTY)
        due = hostdeadline(c, w, now);
      else if (!w->dropped && w->retryat > now)
        due = w->retryat; /* it starts again then */
      if (due < 0)
        acted = 1;
      else if (due > 0 && (next == 0 || due < next))
        next = due;
      continue;
    }
    if (w->state == W_EMPTY)
      continue;
    if (w->killat > 0) {
      if (now >= w->killat) {
        lpar_proc_killproc(&w->proc, SIGKILL);
        w->killat = 0;
      }
      else
        due = w->killat;
    }
    else if (w->state == W_STARTING && e->o.timeout > 0) {
      long long limit = e->slots[i].since + (long long)(e->o.timeout * 1e9);
      if (e->slots[i].item == LPAR_SLOTHOOK && now >= limit) {
        w->timedout = LPAR_SLOTHOOK;
        lpar_proc_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else /* not in init yet, or until its limit */
        due = e->slots[i].item == LPAR_SLOTHOOK ? limit : now + LPAR_LOOKNS;
    }
    else if (w->state == W_BUSY && w->job && w->job->o.timeout > 0) {
      lua_Integer item = e->slots[i].item;
      long long limit =
          e->slots[i].since + (long long)(w->job->o.timeout * 1e9);
      if (item != 0 && now >= limit) {
        w->timedout = item;
        lpar_proc_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else if (item != 0)
        due = limit;
      else if ((due = idlelimit(c, w, now)) < 0) { /* it was let go */
        acted = 1;
        continue;
      }
    }
    if (w->killat == 0 && w->state == W_BUSY && w->nq > 0 && w->job &&
        w->job->o.batched && e->slots[i].cut < lastitem(w)) {
      /* a batch far past the time it was sized for gives back the records
         it has not run, and so does the one queued behind it: they go to
         the other workers */
      long long at =
          w->started +
          lpar_policy_overdue(w->q[0].tns, w->q[0].weight, LPAR_OVERDUENS);
      if (now >= at)
        e->slots[i].cut = lastitem(w);
      else if (due == 0 || at < due)
        due = at;
    }
    if (w->killat == 0 && w->state != W_EMPTY &&
        (stall = stalled(c, w, now)) != 0) {
      if (stall < 0)
        acted = 1;
      else if (due == 0 || stall < due)
        due = stall;
    }
    if (due > 0 && (next == 0 || due < next))
      next = due;
  }
  if (next != e->armed) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (next > 0) {
      its.it_value.tv_sec = next / 1000000000LL;
      its.it_value.tv_nsec = next % 1000000000LL;
    }
    /* cannot fail with the values given: if it does, no deadline would
       ever fire, so the call fails (as epoll_wait's failure does) */
    if (timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
      luaL_error(c->L, "timerfd_settime: %s", strerror(errno));
    e->armed = next;
  }
  return acted;
}

/* ---- the pump ---- */

/* Wait up to 'ms' for events and handle them; returns how many came. */
static int events(Ctx *c, int ms) {
  Engine *e = c->e;
  lua_State *L = c->L;
  int i, n;
  do
    n = epoll_pwait(e->epfd, e->evs, e->nevs, ms,
                    e->waiting && e->watching ? &e->waitmask : NULL);
  while (n == -1 && errno == EINTR && !interrupted);
  if (n == -1 && errno != EINTR)
    luaL_error(L, "epoll_wait: %s", strerror(errno));
  for (i = 0; i < n; i++) {
    uint32_t kind = (uint32_t)(e->evs[i].data.u64 >> 32);
    uint32_t k = (uint32_t)e->evs[i].data.u64;
    EWorker *w;
    if (kind == EV_TIMER) {
      uint64_t ticks;
      if (read(e->tfd, &ticks, sizeof ticks) < 0) { /* just clearing it */
      }
      e->armed = 0;
      continue;
    }
    if (kind == EV_WAKE) { /* a stream's input may have an item now */
      Job *j;
      for (j = e->jobs; j; j = j->nextjob)
        if ((uint32_t)j->id == k && j->pending) {
          j->pending = 0;
          unwatchwake(e, j);
        }
      continue;
    }
    if (k >= (uint32_t)e->o.n)
      continue;
    w = &e->w[k];
    if (w->state == W_EMPTY)
      continue;
    if (kind == EV_RES)
      readworker(c, w);
    else if (kind == EV_PID) { /* it ended, maybe with its pipe held */
      pid_t pid = w->proc.pid;
      readworker(c, w); /* what it sent before it ended counts */
      if (w->state != W_EMPTY && w->proc.pid == pid)
        lose(c, w, 0, NULL, 0);
    }
    else if (sendsome(e, w) != 0)
      lose(c, w, 0, NULL, 0);
  }
  return n < 0 ? 0 : n;
}

/* Before anything asks an iterator that may block (see mayblock): read
   what the workers sent, without waiting, so that results that are ready
   go back first. */
static void pollfirst(Ctx *c) {
  Job *j;
  for (j = c->e->jobs; j; j = j->nextjob)
    if (j->state == J_RUNNING && mayblock(j) && !emittable(j)) {
      if (events(c, 0) > 0)
        c->e->vacated = 1; /* what it read may be waited for: no wait */
      return;
    }
}

/*
** Handle what is ready, waiting up to 'ms' (-1: until something happens;
** the timer wakes it for deadlines): reap, start workers, hand out
** chunks, read results, write pending items.
*/
static void pump(Ctx *c, int ms) {
  Engine *e = c->e;
  int d;
  reapdying(e, 0);
  pollfirst(c);
  refill(c);
  if (broken(c))
    return; /* no worker is left to wait for */
  dispatch(c);
  if (deadlines(c)) /* armed for workers just started, too */
    ms = 0;
  if (canspawn(c)) { /* all busy: another worker, unless results are in */
    if (events(c, 0) > 0) {
      deadlines(c);
      refill(c);
      dispatch(c);
      return;
    }
    d = spawnwait(c);
    if (d == 0) {
      const char *call = "fork";
      if (spawnone(c, &call) < 0)
        e->cap = e->live; /* go on with the workers there are */
      dispatch(c);
      return;
    }
    if (d > 0 && (ms < 0 || d < ms))
      ms = d;
  }
  /* a place emptied or a job ended in any step above (even asking a
     stream for an item): look again before waiting */
  if (e->vacated)
    ms = 0;
  e->vacated = 0;
  events(c, ms);
  deadlines(c);
  refill(c);
  dispatch(c);
}

/* lua_CFunction: (ctx, ms, engine's uservalue) under lua_pcall, so that
   an error cannot leave the engine marked as pumping. */
static int pumpcall(lua_State *L) {
  Ctx own = *(Ctx *)lua_touserdata(L, 1);
  own.L = L;
  own.uv = 3;
  pump(&own, (int)lua_tointeger(L, 2));
  return 0;
}

static void safepump(Ctx *c, int ms) {
  lua_State *L = c->L;
  int status;
  if (c->e->inpump)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  c->e->inpump = 1;
  holdchld(c->e);
  lua_pushcfunction(L, pumpcall);
  lua_pushlightuserdata(L, c);
  lua_pushinteger(L, ms);
  lua_pushvalue(L, c->uv);
  status = lua_pcall(L, 3, 0, 0);
  releasechld(c->e);
  c->e->inpump = 0;
  if (status != LUA_OK)
    lua_error(L);
}

/* ---- the API ---- */

/* Set up a Ctx for the engine at 'idx' (pushes its uservalue). Raises if
   it is closed, belongs to another process, or is pumping (a finalizer
   run by the pump's allocations cannot use it). */
static void ctxof(lua_State *L, int idx, Ctx *c) {
  c->L = L;
  c->e = lua_touserdata(L, idx);
  if (c->e->owner != getpid())
    luaL_error(L, "pool belongs to another process");
  if (c->e->closed)
    luaL_error(L, "pool is closed");
  if (c->e->inpump)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  lua_getiuservalue(L, idx, 1);
  c->uv = lua_gettop(L);
}

/* Set up a Ctx for the engine of the job at 'jidx' (pushes the job's
   uservalue, the engine and its uservalue). */
static void jobctx(lua_State *L, int jidx, Ctx *c) {
  lua_getiuservalue(L, jidx, 1);
  lua_rawgeti(L, -1, JU_ENGINE);
  ctxof(L, lua_gettop(L), c);
}

Engine *lpar_engine_new(lua_State *L, const EngineOpts *o, const char *mt) {
  Engine *e;
  int i, top = lua_gettop(L);
  e = lua_newuserdatauv(L, sizeof(Engine), 1);
  memset(e, 0, sizeof *e);
  e->epfd = e->tfd = -1;
  e->owner = getpid();
  e->o = *o;
  e->cap = o->n - o->nhosts;
  e->closed = 1; /* until it is complete: __gc has nothing to do */
  luaL_setmetatable(L, mt);
  lua_createtable(L, EU_N, 0);
  for (i = 0; i < 4; i++) { /* init, close, fns, items */
    lua_pushvalue(L, top - 3 + i);
    lua_rawseti(L, -2, EU_INIT + i);
  }
  lua_newtable(L);
  lua_rawseti(L, -2, EU_ANCHORS);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawseti(L, -2, EU_TNS);
  lua_setiuservalue(L, -2, 1);
  lua_replace(L, top - 3);
  lua_settop(L, top - 3);
  e->nevs = 3 * o->n + 8;
  e->w = calloc((size_t)o->n, sizeof(EWorker));
  e->evs = calloc((size_t)e->nevs, sizeof(struct epoll_event));
  if (e->w == NULL || e->evs == NULL)
    luaL_error(L, "not enough memory"); /* __gc frees what was made */
  for (i = 0; i < o->n; i++)
    e->w[i].proc.cmdfd = e->w[i].proc.resfd = e->w[i].proc.pidfd = -1;
  e->slots = lpar_proc_slots((size_t)o->n);
  if (e->slots == NULL)
    luaL_error(L, "cannot map shared memory: %s", strerror(errno));
  e->closed = 0;
  e->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (e->epfd >= 0)
    lpar_proc_track(e->epfd);
  e->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (e->tfd >= 0)
    lpar_proc_track(e->tfd);
  if (e->epfd < 0 || e->tfd < 0 ||
      evctl(e, EPOLL_CTL_ADD, e->tfd, EPOLLIN, EVDATA(EV_TIMER, 0)) != 0)
    luaL_error(L, "cannot %s: %s: %s",
               o->ondemand ? "start a worker" : "make a pool",
               e->epfd < 0  ? "epoll_create1"
               : e->tfd < 0 ? "timerfd_create"
                            : "epoll_ctl",
               strerror(errno));
  return e;
}

void lpar_engine_start(lua_State *L, int idx) {
  Ctx c;
  Engine *e;
  int i, status = LUA_OK;
  idx = lua_absindex(L, idx);
  ctxof(L, idx, &c);
  e = c.e;
  e->creating = 1;
  holdchld(e);
  for (;;) {
    int starting = 0;
    lua_pushcfunction(L, pumpcall);
    lua_pushlightuserdata(L, &c);
    lua_pushinteger(L, -1);
    lua_pushvalue(L, c.uv);
    status = lua_pcall(L, 3, 0, 0);
    if (status != LUA_OK)
      break;
    if (lua_rawgeti(L, c.uv, EU_BROKEN) != LUA_TNIL)
      break;
    lua_pop(L, 1);
    for (i = 0; i < e->o.n; i++)
      starting += e->w[i].state == W_STARTING;
    if (starting == 0)
      break;
  }
  e->creating = 0;
  releasechld(e);
  if (lua_gettop(L) > c.uv) { /* an error, or the reason it broke */
    lpar_engine_close(L, idx, "pool closed");
    if (status != LUA_OK)
      lua_error(L);
    lpar_kind_raise(L, e->brokencode);
  }
  lua_pop(L, 1);
}

Job *lpar_engine_submit(lua_State *L, int eidx, int fidx, int iidx,
                        lua_Integer n, const JobOpts *o) {
  Ctx c;
  Job *j;
  Frame f;
  int ju;
  eidx = lua_absindex(L, eidx);
  fidx = lua_absindex(L, fidx);
  iidx = lua_absindex(L, iidx);
  ctxof(L, eidx, &c);
  if (lua_rawgeti(L, c.uv, EU_BROKEN) != LUA_TNIL)
    lpar_kind_raise(L, c.e->brokencode);
  lua_pop(L, 1);
  j = lua_newuserdatauv(L, sizeof(Job), 1);
  memset(j, 0, sizeof *j);
  luaL_setmetatable(L, LPAR_JOBMT);
  ju = lua_gettop(L);
  j->e = c.e;
  j->id = ++c.e->nextid;
  j->o = *o;
  j->stream = n < 0;
  j->n = n < 0 ? 0 : n;
  j->next = 1;
  j->emit = 1;
  j->state = J_RUNNING;
  lua_createtable(L, JU_N, 0);
  lua_newtable(L);
  lua_rawseti(L, -2, JU_RESULTS);
  lua_newtable(L);
  lua_rawseti(L, -2, JU_ERRORS);
  lua_pushvalue(L, iidx);
  lua_rawseti(L, -2, JU_ITEMS);
  lua_pushvalue(L, eidx);
  lua_rawseti(L, -2, JU_ENGINE);
  lua_pushvalue(L, fidx);
  lua_rawseti(L, -2, JU_F);
  if (j->stream) {
    lua_newtable(L);
    lua_rawseti(L, -2, JU_INFLIGHT);
    if (j->o.wakefd < 0)
      j->file = fileiter(L, iidx, &j->o.wakefd);
  }
  if (o->progress != 0) {
    lua_pushvalue(L, o->progress);
    lua_rawseti(L, -2, JU_PROGRESS);
  }
  if (o->onevent != 0) {
    lua_pushvalue(L, o->onevent);
    lua_rawseti(L, -2, JU_ONEVENT);
    lua_newtable(L);
    lua_rawseti(L, -2, JU_STARTS);
  }
  if (o->slice != 0 && o->batched && n < 0 && o->emitting) {
    lua_pushvalue(L, o->slice);
    lua_rawseti(L, -2, JU_SLICE);
    lua_newtable(L);
    lua_rawseti(L, -2, JU_KIDS);
  }
  else
    j->o.slice = 0;
  j->toldone = -1;
  lua_setiuservalue(L, ju, 1);
  if (j->o.batched && j->stream) {
    j->recs = calloc(LPAR_WINDOW, sizeof(lua_Integer));
    if (j->recs == NULL)
      luaL_error(L, "not enough memory"); /* __gc frees it */
  }
  else
    j->o.batched = 0;
  if (o->emitting) {
    j->fin = calloc(LPAR_WINDOW, 1);
    j->queue = calloc(LPAR_WINDOW, sizeof(lua_Integer));
    if (c.e->o.nhosts > 0)
      j->where = calloc(LPAR_WINDOW, sizeof(unsigned short));
    if (j->fin == NULL || j->queue == NULL ||
        (c.e->o.nhosts > 0 && j->where == NULL))
      luaL_error(L, "not enough memory"); /* __gc frees them */
  }
  /* a function the workers inherited is named, not sent */
  if (j->o.fnk == 0) {
    if (lua_rawgeti(L, c.uv, EU_FNS) == LUA_TTABLE) {
      lua_Integer k, nf = (lua_Integer)lua_rawlen(L, -1);
      for (k = 1; k <= nf && j->o.fnk == 0; k++) {
        lua_rawgeti(L, -1, k);
        if (lua_rawequal(L, -1, fidx))
          j->o.fnk = (int)k;
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  o = &j->o;
  /* the function, once, as a CALL frame */
  nomem(L, lpar_buf_reserve(&j->call, LPAR_HDRSIZE + 8));
  j->call.n = LPAR_HDRSIZE;
  if (o->fnk > 0) {
    lpar_wire_put64(j->call.p + LPAR_HDRSIZE, (uint64_t)o->fnk);
    j->call.n += 8;
  }
  else if (lpar_xfer_encode(L, fidx, &j->call) != 0) {
    freejob(j);
    luaL_error(L, "cannot send the function: %s", lua_tostring(L, -1));
  }
  f.type = LPAR_FCALL;
  /* with retries, a worker goes on with its chunk after an item fails */
  f.count = (o->collect || o->retries > 0 ? LPAR_CALLCOLLECT : 0) |
            (o->timeout > 0 ? LPAR_CALLTIMED : 0) |
            (o->fnk > 0 ? LPAR_CALLINHERIT : 0);
  f.len = j->call.n - LPAR_HDRSIZE;
  lpar_wire_putheader(j->call.p, &f);
  /* what was learnt about this function's items last time */
  lua_rawgeti(L, c.uv, EU_TNS);
  lua_pushvalue(L, fidx);
  if (lua_rawget(L, -2) == LUA_TNUMBER)
    j->tns = (double)lua_tonumber(L, -1);
  lua_pop(L, 2);
  if (n == 0) {
    j->state = J_DONE;
    freejob(j);
    lua_settop(L, ju);
    lua_remove(L, c.uv);
    return j;
  }
  /* anchor it and queue it, then start it at once */
  lua_rawgeti(L, c.uv, EU_ANCHORS);
  lua_pushvalue(L, ju);
  lua_rawsetp(L, -2, j);
  lua_pop(L, 1);
  if (c.e->lastjob)
    c.e->lastjob->nextjob = j;
  else
    c.e->jobs = j;
  c.e->lastjob = j;
  if (!c.e->o.ondemand) /* a call's engine starts as it is waited for */
    safepump(&c, 0);
  lua_settop(L, ju);
  lua_remove(L, c.uv);
  return j;
}

void lpar_engine_sethosts(lua_State *L, int eidx, int hostsidx, int setupidx) {
  Engine *e = lua_touserdata(L, eidx);
  Buf b = {0};
  size_t len;
  const char *setup;
  int i, bad;
  hostsidx = lua_absindex(L, hostsidx);
  setup = lua_tolstring(L, setupidx, &len);
  lua_getiuservalue(L, eidx, 1);
  lua_pushvalue(L, hostsidx);
  lua_rawseti(L, -2, EU_HOSTS);
  /* the frame every host's agent gets first, made once */
  bad = lpar_buf_reserve(&b, LPAR_HDRSIZE) != 0;
  if (!bad) {
    b.n = LPAR_HDRSIZE;
    bad = lpar_hosts_putversions(&b) != 0 || lpar_buf_add(&b, setup, len) != 0;
  }
  if (!bad) {
    Frame f = {LPAR_FSETUP, 0, b.n - LPAR_HDRSIZE};
    lpar_wire_putheader(b.p, &f);
    lua_pushlstring(L, b.p, b.n);
    lua_rawseti(L, -2, EU_SETUP);
  }
  lpar_buf_free(&b);
  nomem(L, bad);
  lua_pop(L, 1);
  for (i = 0; i < e->o.nhosts; i++)
    e->w[nlocal(e) + i].host = i + 1;
}

void lpar_engine_pump(lua_State *L, int idx, int ms) {
  Ctx c;
  ctxof(L, idx, &c);
  safepump(&c, ms);
  lua_pop(L, 1);
}

/* Whether the next result of emitting job j may be taken. */
static int emittable(Job *j) {
  if (j->o.unordered)
    return j->qhead < j->qtail;
  return j->emit <= j->n && j->fin[(j->emit - 1) % LPAR_WINDOW];
}

/*
** Call the progress function of job j (at 'jidx') if it has one and it is
** due: the counts changed and LPAR_PROGRESSNS passed since the last call,
** or the job is over and its last counts were not told. Returns the ms
** until a call is due (-1: none). An error it raises ends the job (failed)
** with that error. The caller has the engine marked as pumping, so the
** function cannot use the pool.
*/
static int tellprogress(Ctx *c, int jidx, Job *j) {
  lua_State *L = c->L;
  long long now, wait;
  int over = j->state != J_RUNNING;
  if (j->o.progress == 0 || (j->done == j->toldone && j->failed == j->toldfail))
    return -1;
  if (j->state == J_FAILED || j->state == J_CANCELLED)
    return -1;
  now = lpar_proc_now();
  wait = j->toldone < 0 ? 0 : j->toldat + LPAR_PROGRESSNS - now;
  if (!over && wait > 0)
    return (int)(wait / 1000000) + 1;
  j->toldone = j->done;
  j->toldfail = j->failed;
  j->toldat = now;
  lua_getiuservalue(L, jidx, 1);
  lua_rawgeti(L, -1, JU_PROGRESS);
  lua_remove(L, -2);
  lua_pushinteger(L, j->done);
  if (j->stream && !j->exhausted)
    lua_pushnil(L);
  else
    lua_pushinteger(L, j->n);
  lua_pushinteger(L, j->failed);
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
    if (j->state == J_RUNNING)
      endjob(c, j, J_FAILED, NULL, LPAR_KERROR);
    else { /* over: it fails all the same */
      lua_getiuservalue(L, jidx, 1);
      lua_insert(L, -2);
      lua_rawseti(L, -2, JU_FAILURE);
      lua_pop(L, 1);
      j->state = J_FAILED;
      j->failcode = LPAR_KERROR;
    }
  }
  return -1;
}

/* Under lua_pcall: (ctx, job, engine's uservalue) pumps until the job is
   finished, or has a result to take if it emits. */
static int waitloop(lua_State *L) {
  Ctx own = *(Ctx *)lua_touserdata(L, 1);
  Job *j = lua_touserdata(L, 2);
  own.L = L;
  own.uv = 3;
  for (;;) {
    int ms = tellprogress(&own, 2, j);
    if (j->state != J_RUNNING || (j->fin && emittable(j)))
      break;
    pump(&own, ms);
    if (interrupted && j->state == J_RUNNING) {
      own.e->interrupted = interrupted;
      lua_pushstring(L, interrupted == SIGTERM  ? "terminated"
                        : interrupted == SIGHUP ? "hangup"
                                                : "interrupted");
      endjob(&own, j, J_CANCELLED, NULL,
             LPAR_KINDCODE(LPAR_KINTERRUPTED, interrupted));
    }
  }
  return 0;
}

/* Pump until job j (at 'jidx') is finished or has a result to take, with
   SIGINT ending the wait, and SIGTERM and SIGHUP too when the engine
   takes them. A signal the caller ignores stays ignored. */
static void waitjob(lua_State *L, int jidx, Job *j) {
  static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
  Ctx c;
  Engine *e;
  struct sigaction sa, old[3];
  sigset_t block;
  int status, k, taken[3] = {0, 0, 0};
  if ((j->state != J_RUNNING || (j->fin && emittable(j))) &&
      (j->o.progress == 0 || j->e->closed ||
       (j->done == j->toldone && j->failed == j->toldfail)))
    return;
  jobctx(L, jidx, &c);
  e = c.e;
  if (e->waiting)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  /* the signals taken: not one the caller ignores (blocked, it would be
     left pending for the caller to find) */
  sigemptyset(&block);
  for (k = 0; k < 3; k++)
    if ((k == 0 || e->o.sigterm) && sigaction(sigs[k], NULL, &old[k]) == 0 &&
        old[k].sa_handler != SIG_IGN) {
      taken[k] = 1;
      sigaddset(&block, sigs[k]);
    }
  sigprocmask(SIG_BLOCK, &block, &e->oldmask);
  e->waitmask = e->oldmask;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = onint;
  sigemptyset(&sa.sa_mask);
  for (k = 0; k < 3; k++) {
    if (taken[k]) {
      sigaction(sigs[k], &sa, NULL);
      sigdelset(&e->waitmask, sigs[k]);
    }
  }
  e->watching = taken[0] || taken[1] || taken[2];
  interrupted = 0;
  e->waiting = 1;
  e->waited = j;
  e->inpump = 1;
  holdchld(e);
  lua_pushcfunction(L, waitloop);
  lua_pushlightuserdata(L, &c);
  lua_pushvalue(L, jidx);
  lua_pushvalue(L, c.uv);
  status = lua_pcall(L, 3, 0, 0);
  reapdying(e, 1); /* workers killed for a failure: no zombie is left */
  releasechld(e);
  e->inpump = 0;
  e->waiting = 0;
  e->waited = NULL;
  for (k = 0; k < 3; k++)
    if (taken[k])
      sigaction(sigs[k], &old[k], NULL);
  sigprocmask(SIG_SETMASK, &e->oldmask, NULL);
  if (status != LUA_OK)
    lua_error(L);
  lua_pop(L, 3);
}

void lpar_engine_wait(lua_State *L, int jidx) {
  jidx = lua_absindex(L, jidx);
  waitjob(L, jidx, lua_touserdata(L, jidx));
}

int lpar_engine_results(lua_State *L, int idx) {
  Job *j = lua_touserdata(L, idx);
  lua_getiuservalue(L, idx, 1);
  if (j->state != J_DONE) {
    lua_rawgeti(L, -1, JU_FAILURE);
    return lpar_kind_raise(L, j->failcode);
  }
  lua_rawgeti(L, -1, JU_RESULTS);
  lua_pushinteger(L, j->n);
  if (!j->o.collect)
    return 2;
  lua_rawgeti(L, -3, JU_ERRORS);
  return 3;
}

/* Push index, value, error of item i of the job whose uservalue is at
   'uv', and forget them. */
static int emit(lua_State *L, Job *j, int uv, lua_Integer i) {
  int code = 0;
  j->fin[(i - 1) % LPAR_WINDOW] = 0;
  lua_rawgeti(L, uv, JU_RESULTS);
  lua_rawgeti(L, uv, JU_ERRORS);
  lua_pushinteger(L, i);
  lua_rawgeti(L, -3, i);
  if (lua_rawgeti(L, -3, i) != LUA_TNIL) { /* its kind */
    code = LPAR_KERROR;
    if (lua_rawgeti(L, uv, JU_KINDS) == LUA_TTABLE) {
      if (lua_rawgeti(L, -1, i) == LUA_TNUMBER)
        code = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
      lua_pushnil(L);
      lua_rawseti(L, -2, i);
    }
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  lua_rawseti(L, -6, i);
  lua_pushnil(L);
  lua_rawseti(L, -5, i);
  if (j->where == NULL || j->where[(i - 1) % LPAR_WINDOW] == 0)
    lua_pushnil(L);
  else {
    lua_rawgeti(L, uv, JU_ENGINE); /* the host's spec */
    lua_getiuservalue(L, -1, 1);
    lua_rawgeti(L, -1, EU_HOSTS);
    lua_rawgeti(L, -1, j->where[(i - 1) % LPAR_WINDOW]);
    lua_getfield(L, -1, "spec");
    lua_replace(L, -5);
    lua_pop(L, 3);
  }
  lpar_kind_push(L, code);
  return 6;
}

int lpar_engine_next(lua_State *L, int jidx) {
  Job *j;
  int uv;
  jidx = lua_absindex(L, jidx);
  j = lua_touserdata(L, jidx);
  waitjob(L, jidx, j);
  lua_getiuservalue(L, jidx, 1);
  uv = lua_gettop(L);
  if (emittable(j)) {
    lua_Integer i =
        j->o.unordered ? j->queue[j->qhead++ % LPAR_WINDOW] : j->emit;
    j->emit++;
    /* a stream that said "not yet" may have held back for room: it is
       asked again */
    if (j->pending) {
      j->pending = 0;
      unwatchwake(j->e, j);
    }
    return emit(L, j, uv, i);
  }
  if (j->state == J_DONE)
    return 0;
  lua_rawgeti(L, uv, JU_FAILURE);
  return lpar_kind_raise(L, j->failcode);
}

void lpar_engine_pushengine(lua_State *L, int jidx) {
  lua_getiuservalue(L, jidx, 1);
  lua_rawgeti(L, -1, JU_ENGINE);
  lua_remove(L, -2);
}

int lpar_engine_itemkind(lua_State *L, int jidx, lua_Integer i) {
  int code = 0, top = lua_gettop(L);
  lua_getiuservalue(L, jidx, 1);
  if (lua_rawgeti(L, top + 1, JU_ERRORS) == LUA_TTABLE &&
      lua_rawgeti(L, top + 2, i) != LUA_TNIL) {
    code = LPAR_KERROR;
    if (lua_rawgeti(L, top + 1, JU_KINDS) == LUA_TTABLE &&
        lua_rawgeti(L, -1, i) == LUA_TNUMBER)
      code = (int)lua_tointeger(L, -1);
  }
  lua_settop(L, top);
  return code;
}

int lpar_engine_failkind(lua_State *L, int jidx) {
  Job *j = lua_touserdata(L, jidx);
  return j->state == J_FAILED || j->state == J_CANCELLED ? j->failcode : 0;
}

void lpar_engine_halt(lua_State *L, int jidx) {
  Job *j;
  Engine *e;
  int i;
  jidx = lua_absindex(L, jidx);
  j = lua_touserdata(L, jidx);
  e = j->e;
  if (j->state != J_RUNNING || j->halting)
    return;
  j->halting = 1;
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->job == j && w->nq > 0 && !w->host)
      e->slots[i].cut = lastitem(w); /* between records, it stops */
  }
  if (!e->inpump) { /* nothing in flight: it is over now */
    Ctx c;
    jobctx(L, jidx, &c);
    settle(&c, j);
    lua_pop(L, 3); /* job's uservalue, engine, engine's uservalue */
  }
}

void lpar_engine_cancel(lua_State *L, int jidx, const char *why) {
  Job *j;
  Ctx c;
  jidx = lua_absindex(L, jidx);
  j = lua_touserdata(L, jidx);
  if (j->state != J_RUNNING)
    return;
  jobctx(L, jidx, &c);
  lua_pushstring(L, why);
  holdchld(c.e);
  endjob(&c, j, J_CANCELLED, NULL, LPAR_KCANCELLED);
  reapdying(c.e, 1); /* killed: no zombie is left for a later pump */
  releasechld(c.e);
  lua_pop(L, 3);
}

/* the signals a wait takes: SIGINT; SIGTERM and SIGHUP with 'sigterm' */
static const int stopsigs[] = {SIGINT, SIGTERM, SIGHUP};

/*
** While close hooks are waited for: take the signals a wait takes (those
** the caller does not ignore), noting them in 'interrupted', so that one
** ends the wait at once (the workers are killed). taken[k] and old[k]
** say which, and *prior what 'interrupted' held (a wait this one is
** inside of has yet to see it), for givesignals.
*/
static void takesignals(Engine *e, int taken[3], struct sigaction old[3],
                        int *prior, sigset_t *mask) {
  struct sigaction sa;
  sigset_t set;
  int k;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = onint;
  sigemptyset(&sa.sa_mask);
  *prior = interrupted;
  interrupted = 0;
  for (k = 0; k < 3; k++)
    taken[k] = (k == 0 || e->o.sigterm) &&
               sigaction(stopsigs[k], NULL, &old[k]) == 0 &&
               old[k].sa_handler != SIG_IGN &&
               sigaction(stopsigs[k], &sa, NULL) == 0;
  /* unblocked while it waits (the CLI blocks them): one pending is
     taken at once */
  sigemptyset(&set);
  for (k = 0; k < 3; k++)
    if (taken[k])
      sigaddset(&set, stopsigs[k]);
  sigprocmask(SIG_UNBLOCK, &set, mask);
}

/* Put back the caller's signal mask and actions, and give it the signal
   that came, if any, as it would have had it without the wait (pending,
   if it blocks it). */
static void givesignals(const int taken[3], const struct sigaction old[3],
                        int prior, const sigset_t *mask) {
  int k, sig;
  sigprocmask(SIG_SETMASK, mask, NULL);
  sig = interrupted;
  for (k = 0; k < 3; k++)
    if (taken[k])
      sigaction(stopsigs[k], &old[k], NULL);
  interrupted = prior;
  if (sig != 0)
    raise(sig);
}

void lpar_engine_close(lua_State *L, int idx, const char *why) {
  Engine *e = lua_touserdata(L, idx);
  Ctx c;
  int i, hasclose, isbroken, hard = 0, report;
  long long grace, deadline;
  double secs;
  const char *who;
  int taken[3], prior;
  struct sigaction old[3];
  sigset_t mask;
  if (e == NULL || e->closed || e->owner != getpid())
    return;
  idx = lua_absindex(L, idx);
  holdchld(e);
  c.L = L;
  c.e = e;
  lua_getiuservalue(L, idx, 1);
  c.uv = lua_gettop(L);
  while (e->jobs) {
    hard = 1;
    lua_pushstring(L, why);
    endjob(&c, e->jobs, J_CANCELLED, NULL, LPAR_KCANCELLED);
  }
  e->closed = 1;
  isbroken = broken(&c); /* workers still in init are of no use */
  for (i = 0; e->w && i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->state == W_EMPTY)
      continue;
    /* busy ones are killed; so are all of a call's engine after a failure
       (no close hook is waited for). A busy host's command is told to
       stop (its agent kills its busy workers, their children with them,
       then leaves); one not started yet is of no use. */
    if (w->host && w->nq > 0)
      lpar_proc_killproc(&w->proc, SIGTERM);
    else if (w->nq > 0 || (isbroken && w->state == W_STARTING) ||
             (e->o.ondemand && e->ended) || (w->host && w->state == W_STARTING))
      lpar_proc_killproc(&w->proc, SIGKILL);
    closeworker(e, w); /* end of file: an idle worker leaves */
  }
  /* idle ones run close: the timeout, or a grace period, bounds it; one
     still there is killed and reported, as a failing close is. A call's
     engine reports a bad leave only when the call went well. */
  lua_rawgeti(L, c.uv, EU_CLOSE);
  hasclose = !lua_isnil(L, -1);
  lua_pop(L, 1);
  grace =
      e->o.timeout > 0 ? (long long)(e->o.timeout * 1e9) : LPAR_CLOSEGRACENS;
  secs = e->o.timeout > 0 ? e->o.timeout : (double)grace / 1e9; /* as given */
  if (!hasclose && grace < LPAR_LEAVENS) {
    /* nothing of the user's runs as it leaves: a tiny timeout is not
       the time an exit takes */
    grace = LPAR_LEAVENS;
    secs = (double)grace / 1e9;
  }
  deadline = lpar_proc_now() + grace;
  report = e->o.ondemand ? !hard && !e->ended : 1;
  who = e->o.ondemand ? "worker" : "pool worker";
  takesignals(e, taken, old, &prior, &mask);
  for (i = 0; e->w && i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    /* os.exit(7) in close, or a crash, is reported; not the busy ones
       killed above, whose places are empty by now */
    if (w->state != W_EMPTY)
      lpar_worker_finish(&w->proc, deadline, secs, hasclose, report,
                         w->host ? "host command" : who, &interrupted);
    w->state = W_EMPTY;
    lpar_buf_free(&w->in);
    lpar_buf_free(&w->out);
    lpar_ring_unmap(&w->ring);
  }
  for (i = 0; i < e->nretired; i++) {
    if (e->interrupted) /* Ctrl-C: no close hook is waited for */
      lpar_proc_killproc(&e->retired[i], SIGKILL);
    lpar_worker_finish(&e->retired[i], deadline, secs, hasclose, report, who,
                       &interrupted);
  }
  e->nretired = 0;
  e->live = 0;
  givesignals(taken, old, prior, &mask);

  reapdying(e, 1);
  releasechld(e);
  lua_pop(L, 1);
  lpar_proc_closefd(&e->epfd);
  lpar_proc_closefd(&e->tfd);
  lpar_proc_freeslots(e->slots, (size_t)e->o.n);
  e->slots = NULL;
  free(e->w);
  free(e->evs);
  free(e->dying);
  free(e->retired);
  e->w = NULL;
  e->evs = NULL;
  e->dying = NULL;
  e->retired = NULL;
  e->ndying = e->capdying = e->capretired = 0;
}

/* __gc and __close of a call's engine. */
static int engine_gc(lua_State *L) {
  lua_settop(L, 1);
  lpar_engine_close(L, 1, "pool closed");
  return 0;
}

/* A running job is anchored by its engine, so this runs for it only when
   the state closes or the job is done; the engine's own __gc ends it. */
static int job_gc(lua_State *L) {
  Job *j = lua_touserdata(L, 1);
  freejob(j);
  free(j->fin);
  free(j->queue);
  free(j->where);
  free(j->recs);
  j->fin = NULL;
  j->queue = NULL;
  j->where = NULL;
  j->recs = NULL;
  return 0;
}

void lpar_engine_open(lua_State *L) {
  if (luaL_newmetatable(L, LPAR_ENGINEMT)) {
    lua_pushcfunction(L, engine_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, engine_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, LPAR_JOBMT)) {
    lua_pushcfunction(L, job_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
