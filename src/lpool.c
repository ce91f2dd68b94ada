/*
** lpool.c: persistent pools: lpar.pool, pool:map and pool:submit, and
** jobs that a host polls from its frame loop without blocking.
*/
#include "lpool.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "codec.h"
#include "lauxlib.h"
#include "lpar.h"
#include "opts.h"
#include "policy.h"
#include "pool.h"
#include "pworker.h"
#include "ranges.h"
#include "ring.h"
#include "wire.h"
#include "worker.h"
#include "xfer.h"

/* a pool's chunks take at least this long once the time per item is
   known (ns): no fork to amortize, only a round trip */
#if !defined(LPAR_POOLCHUNKNS)
#define LPAR_POOLCHUNKNS 100000
#endif

/* items in a chunk before the time per item is known */
#if !defined(LPAR_POOLPROBE)
#define LPAR_POOLPROBE 256
#endif

/* most items in one chunk */
#if !defined(LPAR_POOLMAXCHUNK)
#define LPAR_POOLMAXCHUNK (1 << 20)
#endif

/* after SIGTERM for a timeout, SIGKILL follows this much later (ns) */
#define KILLGRACE 500000000LL

/*
** How the pieces fit. A Pool is a userdata holding its workers' places;
** its uservalue table holds the init and close hooks, the jobs that are
** not finished (anchored, so that a job nobody holds still runs), and a
** weak table of the time per item last measured for each function. A Job
** is a userdata whose uservalue holds its results, errors, items, the
** function and the pool. Active jobs also form a list, oldest first:
** idle workers take chunks from the oldest job that has some left.
**
** Every fd the parent watches is in one epoll set, together with a timer
** for timeouts; pool:fd() hands that set to a host's own loop. All work
** is done by pump(), which never blocks unless asked to: job:done(),
** job:progress() and pool:pump() call it with no wait, job:wait() and
** pool:map() until their job is finished.
*/

enum { W_EMPTY = 0, W_STARTING, W_IDLE, W_BUSY };
enum { J_RUNNING = 0, J_DONE, J_FAILED, J_CANCELLED };

/* fields of the pool's uservalue */
enum { PU_INIT = 1, PU_CLOSE, PU_ANCHORS, PU_TNS, PU_BROKEN, PU_INITERR };
#define PU_N PU_INITERR

/* fields of a job's uservalue */
enum {
  JU_RESULTS = 1,
  JU_ERRORS,
  JU_ITEMS,
  JU_FAILURE,
  JU_POOL,
  JU_F,
  JU_ATTEMPTS /* item -> times run again so far, with retries */
};
#define JU_N JU_ATTEMPTS

/* epoll data: what an event is about, and which worker */
enum { EV_RES = 0, EV_CMD, EV_TIMER, EV_PID };
#define EVDATA(kind, i) (((uint64_t)(kind) << 32) | (uint32_t)(i))

struct Job;

typedef struct Chunk {
  lua_Integer first, count;
  int alone; /* one suspect (see lpar_ranges_take) */
} Chunk;

typedef struct PWorker {
  Proc proc;
  int state;            /* W_* */
  struct Job *job;      /* job of the chunks it runs; NULL when idle, or
                           when the results of its chunks are dropped */
  uint64_t fnjob;       /* id of the job whose function it holds */
  Chunk q[2];           /* chunks sent: q[0] runs, q[1] waits its turn */
  int nq;               /* chunks sent and not finished */
  lua_Integer got;      /* items of q[0] reported so far */
  long long busy;       /* ns it reports spending on q[0] */
  long long started;    /* when q[0] was sent, or became the first */
  Buf in;               /* bytes received and not yet handled */
  long long lastread;   /* when bytes last came */
  Buf out;              /* bytes to send */
  Ring ring;            /* big results frames arrive here */
  size_t outpos;        /* bytes of 'out' already sent */
  int watchout;         /* its command fd is in the epoll set */
  lua_Integer timedout; /* item it was stopped for, 0 if none */
  lua_Integer blame;    /* item whose report broke the protocol, 0 if none */
  long long killat;     /* if > 0: SIGKILL due at this time */
} PWorker;

typedef struct Pool {
  pid_t owner; /* the process that made it (children inherit copies) */
  int n;       /* places */
  int closed;
  int creating;    /* lpar.pool is waiting for the first workers */
  int inpump;      /* pump() is running (guards against re-entry) */
  int epfd;        /* every fd watched, and the timer */
  int tfd;         /* timerfd of the next deadline */
  long long armed; /* deadline the timer is set to, 0 when disarmed */
  PWorker *w;
  Slot *slots;
  struct epoll_event *evs;
  pid_t *dying; /* workers killed and not yet reaped */
  int ndying, capdying;
  struct Job *jobs, *lastjob; /* active jobs, oldest first */
  uint64_t nextid;
  int startfails; /* workers lost before READY, in a row */
  int waiting;    /* a blocking wait owns SIGINT (and SIGTERM) */
  int sigterm;    /* SIGTERM ends a blocking wait too */
  int watching;   /* signals a blocking wait takes: it waits with waitmask */
  sigset_t oldmask, waitmask;
  double timeout; /* seconds for init and close, 0 for none */
  size_t maxmem;  /* Lua heap limit of each worker in bytes, 0 for none */
  int chld;       /* depth of the calls that made SIGCHLD deliverable */
  int heldchld;   /* the caller ignored SIGCHLD: oldchld is its action */
  struct sigaction oldchld;
} Pool;

typedef struct Job {
  Pool *pool;
  struct Job *nextjob;
  uint64_t id;
  int state;         /* J_* */
  int collect;       /* on_error = "collect" */
  int retries;       /* times a failed item is run again */
  lua_Integer chunk; /* fixed chunk size, 0 for adaptive */
  double timeout;    /* seconds per item, 0 for none */
  lua_Integer n;     /* items */
  lua_Integer next;  /* next item never handed out */
  lua_Integer done;  /* items reported */
  double tns;        /* ns per item, 0 until measured */
  Ranges redo;       /* items to hand out again */
  int lost;          /* workers lost under it without a culprit */
  Buf call;          /* CALL frame: header and encoded function */
} Job;

/* what the functions below share: the pool and its uservalue's index */
typedef struct Ctx {
  lua_State *L;
  Pool *p;
  int uv;
} Ctx;

/* the signal that interrupted a blocking wait */
static volatile sig_atomic_t interrupted;

static void onint(int sig) {
  interrupted = sig;
}

static void nomem(lua_State *L, int rc) {
  if (rc != 0)
    luaL_error(L, "not enough memory");
}

/* ---- fds and processes ---- */

/*
** While the pool works, SIGCHLD is deliverable even if the caller ignores
** it, or the kernel would reap ended workers before their exit status is
** read. The caller's action is back when the outermost call returns.
*/
static void holdchld(Pool *p) {
  if (p->chld++ == 0)
    p->heldchld = lpar_pool_holdchld(&p->oldchld);
}

static void releasechld(Pool *p) {
  if (--p->chld == 0 && p->heldchld) {
    sigaction(SIGCHLD, &p->oldchld, NULL);
    p->heldchld = 0;
  }
}

static int evctl(Pool *p, int op, int fd, uint32_t events, uint64_t data) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.u64 = data;
  return epoll_ctl(p->epfd, op, fd, &ev) == -1 ? -errno : 0;
}

/* Reap the killed workers that have ended ('block': wait for all). */
static void reapdying(Pool *p, int block) {
  int i = 0, status;
  while (i < p->ndying) {
    if (lpar_pool_wait(p->dying[i], &status, block) != 0)
      p->dying[i] = p->dying[--p->ndying];
    else
      i++;
  }
}

/* Close a worker's channel, leaving its pid (and pidfd, no longer
   watched) in place. */
static void closeworker(Pool *p, PWorker *w) {
  if (w->proc.resfd >= 0)
    evctl(p, EPOLL_CTL_DEL, w->proc.resfd, 0, 0);
  if (w->proc.pidfd >= 0)
    evctl(p, EPOLL_CTL_DEL, w->proc.pidfd, 0, 0);
  if (w->watchout && w->proc.cmdfd >= 0)
    evctl(p, EPOLL_CTL_DEL, w->proc.cmdfd, 0, 0);
  w->watchout = 0;
  lpar_pool_close(&w->proc);
  w->in.n = 0;
  w->out.n = w->outpos = 0;
}

/* Kill worker w and empty its place; it is reaped later. */
static void dropworker(lua_State *L, Pool *p, PWorker *w) {
  pid_t pid = w->proc.pid;
  closeworker(p, w);
  lpar_pool_killproc(&w->proc, SIGKILL);
  lpar_pool_closepid(&w->proc);
  if (p->ndying == p->capdying) {
    int cap = p->capdying ? 2 * p->capdying : 8;
    pid_t *d = realloc(p->dying, (size_t)cap * sizeof(pid_t));
    if (d == NULL) { /* cannot defer: reap it now */
      lpar_pool_wait(pid, &(int){0}, 1);
      pid = 0;
    }
    else {
      p->dying = d;
      p->capdying = cap;
    }
  }
  if (pid != 0)
    p->dying[p->ndying++] = pid;
  w->proc.pid = 0;
  w->state = W_EMPTY;
  w->job = NULL;
  (void)L;
}

/* Fork a worker into empty place i; 0, or -errno with *call naming the
   call that failed. */
static int spawn(Ctx *c, int i, const char **call) {
  lua_State *L = c->L;
  Pool *p = c->p;
  PWorker *w = &p->w[i];
  ChildSetup cs;
  sigset_t cur;
  pid_t pid;
  int rc;
  sigprocmask(SIG_BLOCK, NULL, &cur);
  cs.mask = p->waiting ? &p->oldmask : &cur;
  cs.ignint = 1; /* a pool's workers outlive Ctrl-C; they die with it */
  p->slots[i].item = 0;
  lpar_ring_unmap(&w->ring); /* the last worker in this place is gone */
  if (lpar_ring_map(&w->ring, LPAR_RINGSIZE) != 0)
    w->ring.base = NULL; /* no ring: every frame takes the pipe */
  lua_rawgeti(L, c->uv, PU_INIT);
  lua_rawgeti(L, c->uv, PU_CLOSE);
  pid = lpar_pool_fork(&w->proc, &cs, call);
  if (pid == 0) {
    PWorkerArgs a;
    int top = lua_gettop(L);
    a.cmdfd = w->proc.cmdfd;
    a.resfd = w->proc.resfd;
    a.initidx = lua_isnil(L, top - 1) ? 0 : top - 1;
    a.closeidx = lua_isnil(L, top) ? 0 : top;
    a.place = i;
    a.maxmem = p->maxmem;
    a.ring = w->ring;
    a.slot = &p->slots[i];
    lpar_pworker_run(L, &a);
  }
  lua_pop(L, 2);
  lpar_ring_keep(&w->ring);
  if (pid < 0) {
    lpar_ring_unmap(&w->ring);
    return (int)pid;
  }
  w->state = W_STARTING;
  w->job = NULL;
  w->fnjob = 0;
  w->nq = 0;
  w->got = w->busy = 0;
  w->in.n = 0;
  w->out.n = w->outpos = 0;
  w->watchout = 0;
  w->timedout = 0;
  w->blame = 0;
  w->killat = 0;
  w->lastread = lpar_pool_now();
  rc = evctl(p, EPOLL_CTL_ADD, w->proc.resfd, EPOLLIN, EVDATA(EV_RES, i));
  if (rc == 0 && w->proc.pidfd >= 0) /* its end, whoever holds its pipe */
    rc = evctl(p, EPOLL_CTL_ADD, w->proc.pidfd, EPOLLIN, EVDATA(EV_PID, i));
  if (rc != 0) {
    *call = "epoll_ctl";
    dropworker(L, p, w);
    return rc;
  }
  return 0;
}

/* ---- jobs ---- */

/* Push job j (from the anchors) and its uservalue; returns the index of
   the uservalue. */
static int pushjob(Ctx *c, Job *j) {
  lua_State *L = c->L;
  lua_rawgeti(L, c->uv, PU_ANCHORS);
  lua_rawgetp(L, -1, j);
  lua_remove(L, -2);
  lua_getiuservalue(L, -1, 1);
  return lua_gettop(L);
}

static void freejob(Job *j) {
  lpar_ranges_free(&j->redo);
  lpar_buf_free(&j->call);
}

/* Take finished job j out of the pool's list and anchors. */
static void detach(Ctx *c, Job *j) {
  lua_State *L = c->L;
  Pool *p = c->p;
  Job **pp;
  int i;
  for (pp = &p->jobs; *pp && *pp != j; pp = &(*pp)->nextjob)
    ;
  if (*pp == NULL)
    return;
  *pp = j->nextjob;
  if (p->lastjob == j) {
    Job *k;
    p->lastjob = NULL;
    for (k = p->jobs; k; k = k->nextjob)
      p->lastjob = k;
  }
  j->nextjob = NULL;
  for (i = 0; i < p->n; i++)
    if (p->w[i].job == j)
      p->w[i].job = NULL;
  if (j->state == J_DONE && j->tns > 0) { /* remember for the next job */
    int uv = pushjob(c, j);
    lua_rawgeti(L, c->uv, PU_TNS);
    lua_rawgeti(L, uv, JU_F);
    lua_pushnumber(L, (lua_Number)j->tns);
    lua_rawset(L, -3);
    lua_pop(L, 3);
  }
  lua_rawgeti(L, c->uv, PU_ANCHORS);
  lua_pushnil(L);
  lua_rawsetp(L, -2, j);
  lua_pop(L, 1);
  freejob(j);
}

/*
** Job j ends with the error value at the top of the stack (popped) as its
** failure. Workers still running its chunks are killed and replaced, but
** 'self', which skips the rest of its chunk by itself (unless it holds
** another chunk of the job); what it sends until it is idle is dropped.
*/
static void endjob(Ctx *c, Job *j, int state, PWorker *self) {
  lua_State *L = c->L;
  Pool *p = c->p;
  int i, uv;
  if (j->state != J_RUNNING) {
    lua_pop(L, 1);
    return;
  }
  uv = pushjob(c, j);
  lua_pushvalue(L, uv - 1 - 1);
  lua_rawseti(L, uv, JU_FAILURE);
  lua_pop(L, 3);
  j->state = state;
  for (i = 0; i < p->n; i++) {
    PWorker *w = &p->w[i];
    if (w->job != j)
      continue;
    if (w == self && w->nq == 1) /* it skips the rest and says READY */
      w->job = NULL;
    else
      dropworker(L, p, w);
  }
  detach(c, j);
}

static void failjob(Ctx *c, Job *j, PWorker *self) {
  endjob(c, j, J_FAILED, self);
}

/* Job j is over if all its items are reported. */
static void settle(Ctx *c, Job *j) {
  if (j->state == J_RUNNING && j->done == j->n) {
    j->state = J_DONE;
    detach(c, j);
  }
}

/*
** Item i of job j failed with the error value and traceback at the top of
** the stack (both popped): recorded when collecting, else the job fails
** with "item i: <message>\n<traceback>". 'self' as for endjob.
*/
static void itemfailed(Ctx *c, Job *j, lua_Integer i, PWorker *self) {
  lua_State *L = c->L;
  char prefix[48];
  if (j->retries > 0) {
    int uv = pushjob(c, j);
    lua_Integer tries;
    if (lua_rawgeti(L, uv, JU_ATTEMPTS) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawseti(L, uv, JU_ATTEMPTS);
    }
    lua_rawgeti(L, -1, i);
    tries = lua_tointeger(L, -1);
    if (lpar_policy_retry(tries, j->retries)) {
      lua_pushinteger(L, tries + 1);
      lua_rawseti(L, -3, i);
      lua_pop(L, 6); /* count, attempts, uservalue, job, error, traceback */
      /* it failed before: a suspect, run alone (see run.c) */
      nomem(L, lpar_ranges_push(&j->redo, i, 1, 1));
      return;
    }
    lua_pop(L, 4);
  }
  if (j->collect) {
    int uv;
    lpar_worker_failure(L, NULL);
    uv = pushjob(c, j);
    lua_rawgeti(L, uv, JU_ERRORS);
    lua_pushvalue(L, uv - 2);
    lua_rawseti(L, -2, i);
    lua_pop(L, 4);
    j->done++;
    settle(c, j);
    return;
  }
  snprintf(prefix, sizeof prefix, "item %lld: ", (long long)i);
  lpar_worker_failure(L, prefix);
  failjob(c, j, self);
}

/* ---- workers lost ---- */

/* Make the pool unusable: 'why' on top (popped) fails every job. */
static void breakpool(Ctx *c) {
  lua_State *L = c->L;
  lua_pushvalue(L, -1);
  lua_rawseti(L, c->uv, PU_BROKEN);
  while (c->p->jobs) {
    lua_pushvalue(L, -1);
    failjob(c, c->p->jobs, NULL);
  }
  lua_pop(L, 1);
}

/*
** Worker w is gone or must go: reap it (killing it first if 'force'),
** name the item it was running, and queue the rest of its chunk again.
** 'why' overrides the wait status in the message.
*/
static void lose(Ctx *c, PWorker *w, int force, const char *why) {
  lua_State *L = c->L;
  Pool *p = c->p;
  pid_t pid = w->proc.pid;
  Slot *slot = &p->slots[w - p->w];
  Job *j = w->job;
  int status = 0, rc, starting = w->state == W_STARTING;
  lua_Integer culprit, from, end;
  int suspects;
  char desc[96];
  closeworker(p, w);
  rc = lpar_pool_reap(&w->proc, force, &status);
  lpar_pool_closepid(&w->proc);
  w->proc.pid = 0;
  w->state = W_EMPTY;
  w->job = NULL;
  if (starting && w->timedout == LPAR_SLOTHOOK) { /* stopped in init */
    if (lua_rawgeti(L, c->uv, PU_INITERR) == LUA_TNIL) {
      char secs[32];
      lua_pushfstring(L, "worker init timed out after %s s",
                      lpar_pool_secs(p->timeout, secs, sizeof secs));
      lua_rawseti(L, c->uv, PU_INITERR);
    }
    lua_pop(L, 1);
  }
  if (why == NULL)
    why = rc < 0 ? "vanished (reaped elsewhere)"
                 : lpar_pool_describe(status, desc, sizeof desc);
  if (starting && !force && slot->item == LPAR_SLOTHOOK) { /* died in init */
    if (lua_rawgeti(L, c->uv, PU_INITERR) == LUA_TNIL) {
      lua_pushfstring(L, "worker init failed: worker %d %s", (int)pid, why);
      lua_rawseti(L, c->uv, PU_INITERR);
    }
    lua_pop(L, 1);
  }
  if (starting) {
    if (++p->startfails > 2 * p->n + 2 || p->creating) {
      if (lua_rawgeti(L, c->uv, PU_INITERR) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      }
      breakpool(c);
    }
    return;
  }
  if (j == NULL || j->state != J_RUNNING || w->nq == 0)
    return;
  from = w->q[0].first + w->got;
  end = w->q[0].first + w->q[0].count;
  if (w->nq > 1) /* the chunk waiting its turn goes back as it is */
    nomem(L, lpar_ranges_push(&j->redo, w->q[1].first, w->q[1].count,
                              w->q[1].alone));
  culprit = w->blame ? 0
                     : lpar_policy_culprit(w->q[0].first, w->q[0].count, w->got,
                                           (lua_Integer)slot->item, w->timedout,
                                           w->q[0].alone);
  nomem(L, lpar_ranges_requeue(&j->redo, from, end, culprit, !w->blame));
  suspects = culprit == 0 && !w->blame && from < end;
  if (w->blame) /* it broke the protocol reporting this one */
    culprit = w->blame;
  if (culprit) {
    if (w->timedout)
      lua_pushfstring(L, "timed out after %s s",
                      lpar_pool_secs(j->timeout, desc, sizeof desc));
    else
      lua_pushfstring(L, "worker %d %s", (int)pid, why);
    lua_pushnil(L);
    itemfailed(c, j, culprit, NULL);
  }
  /* a loss that sent items back as suspects is bound to name one of them
     if it happens again: only the others count towards the limit */
  else if (!suspects) {
    if (++j->lost > 2 * p->n + 2) {
      lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      failjob(c, j, NULL);
    }
  }
}

static void protoerror(Ctx *c, PWorker *w, const char *what) {
  char why[256];
  snprintf(why, sizeof why, "broke the protocol (%s)", what);
  lose(c, w, 1, why);
}

/* ---- sending ---- */

/* Send what is pending to w, watching its fd while some is left. 0, or
   -errno if the worker cannot be written. */
static int sendsome(Pool *p, PWorker *w) {
  int rc = lpar_wire_sendsome(w->proc.cmdfd, &w->out, &w->outpos);
  if (rc != 0)
    return rc;
  if (w->outpos < w->out.n && !w->watchout) {
    rc = evctl(p, EPOLL_CTL_ADD, w->proc.cmdfd, EPOLLOUT,
               EVDATA(EV_CMD, w - p->w));
    if (rc != 0)
      return rc;
    w->watchout = 1;
  }
  else if (w->outpos == w->out.n && w->watchout) {
    evctl(p, EPOLL_CTL_DEL, w->proc.cmdfd, 0, 0);
    w->watchout = 0;
  }
  return 0;
}

static int workleft(Job *j) {
  return j->state == J_RUNNING && (j->redo.n > 0 || j->next <= j->n);
}

/* Items of j not handed out yet (fresh or again). */
static lua_Integer itemsleft(Job *j) {
  return j->n - j->next + 1 + j->redo.items;
}

/* Chunk size (see lpar_policy_chunk): at least LPAR_POOLCHUNKNS of work
   once the time per item is known, at most LPAR_POOLPROBE items until
   then. */
static lua_Integer chunksize(Pool *p, Job *j) {
  SchedChunk s = {0};
  s.fixed = j->chunk;
  s.left = itemsleft(j);
  s.places = p->n;
  s.tns = j->tns;
  s.minns = LPAR_POOLCHUNKNS;
  s.probe = LPAR_POOLPROBE;
  s.max = LPAR_POOLMAXCHUNK;
  return (lua_Integer)lpar_policy_chunk(&s);
}

/*
** Hand idle worker w a chunk of job j (uservalue at 'juv'): the job's
** function first if w does not hold it, then the items, encoded.
*/
static void assign(Ctx *c, PWorker *w, Job *j, int juv) {
  int alone;
  lua_State *L = c->L;
  lua_Integer first, count, i;
  Frame f;
  size_t at;
  if (w->outpos == w->out.n) /* all sent: start afresh */
    w->out.n = w->outpos = 0;
  if (w->fnjob != j->id) {
    nomem(L, lpar_buf_add(&w->out, j->call.p, j->call.n));
    w->fnjob = j->id;
  }
  count = chunksize(c->p, j);
  alone = 0;
  if (j->redo.n > 0) {
    long long from;
    count = lpar_ranges_take(&j->redo, count, &from, &alone);
    first = from;
  }
  else {
    first = j->next;
    if (count > j->n - first + 1)
      count = j->n - first + 1;
    j->next += count;
  }
  at = w->out.n;
  {
    nomem(L, lpar_buf_reserve(&w->out, LPAR_HDRSIZE + 8));
    w->out.n += LPAR_HDRSIZE + 8;
    lua_rawgeti(L, juv, JU_ITEMS);
    for (i = first; i < first + count; i++) {
      lua_geti(L, -1, i);
      if (lpar_codec_encode(L, -1, &w->out) != 0) {
        lua_pushfstring(L, "item %I: cannot send item: %s", (LUAI_UACINT)i,
                        lua_tostring(L, -1));
        lua_replace(L, -4);
        lua_pop(L, 2);
        w->out.n = at; /* the frame never leaves */
        failjob(c, j, NULL);
        return;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    f.type = LPAR_FITEMS;
    f.count = (uint32_t)count;
    f.len = w->out.n - at - LPAR_HDRSIZE;
    lpar_wire_putheader(w->out.p + at, &f);
    lpar_wire_put64(w->out.p + at + LPAR_HDRSIZE, (uint64_t)first);
  }
  w->state = W_BUSY;
  w->job = j;
  w->q[w->nq].first = first;
  w->q[w->nq].count = count;
  w->q[w->nq].alone = alone;
  if (w->nq++ == 0) {
    w->got = 0;
    w->busy = 0;
    w->started = lpar_pool_now();
  }
  if (sendsome(c->p, w) != 0)
    lose(c, w, 1, NULL);
}

/* Whether busy worker w should get a second chunk of its job now, to
   start as soon as it is done with the first rather than wait for the
   parent (see lpar_policy_prefetch). */
static int prefetch(Pool *p, PWorker *w, long long now) {
  Job *j = w->job;
  if (w->state != W_BUSY || w->nq != 1 || j == NULL || !workleft(j))
    return 0;
  return lpar_policy_prefetch(j->tns, w->q[0].count, now - w->started,
                              LPAR_POOLCHUNKNS, itemsleft(j), p->n,
                              chunksize(p, j));
}

/*
** Give every idle worker a chunk of the oldest job with work left. Then,
** if there is still work, give busy workers whose items are quick a second
** chunk of their job.
*/
static void dispatch(Ctx *c) {
  Pool *p = c->p;
  Job *j = p->jobs;
  int i, juv = 0;
  lua_State *L = c->L;
  int top = lua_gettop(L);
  for (i = 0; i < p->n && j; i++) {
    PWorker *w = &p->w[i];
    if (w->state != W_IDLE)
      continue;
    while (j && !workleft(j)) {
      j = j->nextjob;
      juv = 0;
      lua_settop(L, top);
    }
    if (j == NULL)
      break;
    if (juv == 0)
      juv = pushjob(c, j);
    assign(c, w, j, juv);
  }
  lua_settop(L, top);
  for (i = 0; i < p->n; i++) {
    PWorker *w = &p->w[i];
    if (prefetch(p, w, lpar_pool_now())) {
      assign(c, w, w->job, pushjob(c, w->job));
      lua_settop(L, top);
    }
  }
}

/* Start workers in the empty places (none while the pool is broken). */
static void refill(Ctx *c) {
  lua_State *L = c->L;
  Pool *p = c->p;
  int i, rc = 0, live = 0;
  const char *call = "fork";
  if (p->closed)
    return;
  lua_rawgeti(L, c->uv, PU_BROKEN);
  if (!lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  for (i = 0; i < p->n; i++)
    live += p->w[i].state != W_EMPTY;
  if (live == p->n)
    return;
  /* the first workers start with the caller's heap: over max_memory,
     they could not run. A replacement checks for itself, and says so as
     its init's failure. */
  if (p->maxmem > 0 && p->creating && lpar_worker_checkheap(L, p->maxmem)) {
    breakpool(c);
    return;
  }
  live = 0;
  for (i = 0; i < p->n; i++) {
    if (p->w[i].state == W_EMPTY) {
      int r = spawn(c, i, &call);
      if (r != 0)
        rc = r;
    }
    if (p->w[i].state != W_EMPTY)
      live++;
  }
  if (live == 0 && rc != 0) {
    lua_pushfstring(L, "cannot start a worker: %s: %s", call, strerror(-rc));
    breakpool(c);
  }
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

/* Results of items first .. first+count-1 at p[pos..len) for worker w.
   0, or -1 with a message pushed. */
/* Move the n values decoded aside (in the table just above 'res', [k + 1]
   for item first + k) into the results table at 'res'. */
static void storeaside(lua_State *L, int res, lua_Integer first, uint32_t n) {
  uint32_t k;
  for (k = 0; k < n; k++)
    if (lua_rawgeti(L, res + 1, (lua_Integer)k + 1) == LUA_TNIL)
      lua_pop(L, 1);
    else
      lua_rawseti(L, res, first + k);
}

static int results(Ctx *c, PWorker *w, const char *p, size_t len,
                   lua_Integer first, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  uint32_t k;
  size_t pos = 16;
  int res;
  if (j == NULL)
    return 0; /* dropped */
  if (first != w->q[0].first + w->got ||
      first - w->q[0].first + (lua_Integer)count > w->q[0].count) {
    lua_pushliteral(L, "result for an item it was not given");
    return -1;
  }
  pushjob(c, j);
  lua_rawgeti(L, -1, JU_RESULTS);
  res = lua_gettop(L);
  /* decoded aside, and stored only once the frame has proved sound */
  lua_createtable(L, count < 1024 ? (int)count : 1024, 0);
  for (k = 0; k < count; k++) {
    if (lpar_codec_decode(L, p, len, &pos) != 0) {
      /* the item whose value this is fails (a worker sends the same
         bytes again if it runs again); the ones after it run again */
      storeaside(L, res, first, k);
      lua_replace(L, res - 2);
      lua_settop(L, res - 2);
      w->got += k + 1;
      j->done += k;
      w->blame = first + k;
      return -1;
    }
    lua_rawseti(L, res + 1, (lua_Integer)k + 1);
  }
  if (pos != len) { /* none is taken: its first item fails, the others
                       run again */
    lua_settop(L, res - 3);
    lua_pushliteral(L, "trailing bytes in a frame");
    w->got += 1;
    w->blame = first;
    return -1;
  }
  storeaside(L, res, first, count);
  lua_pop(L, 4);
  w->got += count;
  j->done += count;
  if (w->got == w->q[0].count) { /* learn from the chunk's timing */
    j->tns = lpar_policy_learn(j->tns, w->busy, w->got);
    j->lost = 0;
  }
  settle(c, j);
  return 0;
}

/* An ERROR frame for item i (0: init or loading the function failed).
   0, or -1 with a message pushed. */
static int errorframe(Ctx *c, PWorker *w, const char *p, size_t len,
                      lua_Integer i) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (geterror(L, p, len) != 0) {
    if (j != NULL && w->state == W_BUSY && i >= w->q[0].first + w->got &&
        i < w->q[0].first + w->q[0].count) { /* that item fails */
      w->got = i - w->q[0].first + 1;
      w->blame = i;
    }
    return -1;
  }
  if (i == 0 && w->state == W_STARTING) {
    lpar_worker_failure(L, "worker init failed: ");
    lua_rawseti(L, c->uv, PU_INITERR);
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
    lua_pop(L, 1); /* the message says it all */
    failjob(c, j, w);
    return 0;
  }
  if (i < w->q[0].first + w->got || i >= w->q[0].first + w->q[0].count) {
    lua_pop(L, 2);
    lua_pushliteral(L, "error for an item it was not given");
    return -1;
  }
  w->got = i - w->q[0].first + 1;
  itemfailed(c, j, i, w);
  return 0;
}

/* A READY frame: started (count 1) or done with its chunk (count 0).
   0, or -1 with a message pushed. */
static int readyframe(Ctx *c, PWorker *w, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (count == 1 && w->state == W_STARTING) {
    w->state = W_IDLE;
    c->p->startfails = 0;
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
  w->started = lpar_pool_now();
  if (--w->nq == 0) {
    w->state = W_IDLE;
    w->job = NULL;
  }
  return 0;
}

/* Handle the whole frames in w->in. Returns 0, or -1 if w was lost. */
/* Handle frame f (payload at p) from worker w: 0, or -1 when w broke the
   protocol with it (it is lost then). */
static int frame(Ctx *c, PWorker *w, const Frame *f, const char *p) {
  lua_State *L = c->L;
  int rc;
  if (f->type == LPAR_FRESULT && f->count == 0) {
    lua_pushliteral(L, "bad frame header"); /* no results: as parallel */
    rc = -1;
  }
  else if (f->type == LPAR_FRESULT && f->len >= 16 && w->state == W_BUSY) {
    w->busy += (long long)lpar_wire_get64(p + 8);
    rc = results(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p),
                 f->count);
  }
  else if (f->type == LPAR_FERROR && f->len >= 8)
    rc = errorframe(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p));
  else if (f->type == LPAR_FREADY)
    rc = readyframe(c, w, f->count);
  else {
    lua_pushliteral(L, "unexpected frame");
    rc = -1;
  }
  if (rc != 0) {
    char what[160];
    snprintf(what, sizeof what, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    protoerror(c, w, what);
  }
  return rc;
}

/* A RING frame: the frame w put in its ring at the place that p names. */
static int ringframe(Ctx *c, PWorker *w, const char *p) {
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
static int frames(Ctx *c, PWorker *w) {
  size_t at = 0;
  while (w->in.n - at >= LPAR_HDRSIZE) {
    Frame f;
    const char *p;
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
    if (w->state == W_EMPTY)
      return -1; /* its job failed and took it along */
    at += LPAR_HDRSIZE + (size_t)f.len;
  }
  lpar_buf_drop(&w->in, at);
  return 0;
}

/* Read what worker w has sent and handle it. */
static void readworker(Ctx *c, PWorker *w) {
  for (;;) {
    long k = lpar_wire_tryread(w->proc.resfd, &w->in);
    if (k == -EAGAIN)
      return;
    if (k == -ENOMEM) {
      char what[96];
      protoerror(c, w, lpar_wire_toolong(&w->in, what, sizeof what));
      return;
    }
    if (k <= 0) { /* end of file (a partial frame is dropped) or error */
      lose(c, w, k < 0, NULL);
      return;
    }
    w->lastread = lpar_pool_now();
    if (frames(c, w) != 0)
      return;
  }
}

/* ---- time ---- */

/*
** A worker that is not running an item and left a frame unfinished for
** the timeout (its job's, else the pool's, else LPAR_STALLNS) broke the
** protocol; what it sent so far is read first. Returns when to look again
** (ns; 0: never, -1: something was handled, the pump goes on).
*/
static long long stalled(Ctx *c, PWorker *w, long long now) {
  Pool *p = c->p;
  double secs = w->job && w->job->timeout > 0 ? w->job->timeout : p->timeout;
  long long limit = secs > 0 ? (long long)(secs * 1e9) : LPAR_STALLNS;
  char what[96];
  if (w->in.n == 0 || p->slots[w - p->w].item != 0)
    return 0;
  if (now < w->lastread + limit)
    return w->lastread + limit;
  readworker(c, w);
  if (w->state == W_EMPTY || w->in.n == 0 || now < w->lastread + limit)
    return -1;
  snprintf(what, sizeof what, "partial frame, nothing more for %.1f s",
           (double)limit / 1e9);
  protoerror(c, w, what);
  return -1;
}

/* Timeouts per item and for init, stalled frames, TERM -> KILL
   escalation; arms the timer for the next deadline. Returns whether a
   worker was lost meanwhile (then do not wait: its place wants filling). */
static int deadlines(Ctx *c) {
  Pool *p = c->p;
  long long now = lpar_pool_now(), next = 0;
  int i, acted = 0;
  for (i = 0; i < p->n; i++) {
    PWorker *w = &p->w[i];
    long long due = 0, stall;
    if (w->state == W_EMPTY)
      continue;
    if (w->killat > 0) {
      if (now >= w->killat) {
        lpar_pool_killproc(&w->proc, SIGKILL);
        w->killat = 0;
      }
      else
        due = w->killat;
    }
    else if (w->state == W_STARTING && p->timeout > 0) {
      long long limit = p->slots[i].since + (long long)(p->timeout * 1e9);
      if (p->slots[i].item == LPAR_SLOTHOOK && now >= limit) {
        w->timedout = LPAR_SLOTHOOK;
        lpar_pool_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else /* not in init yet, or until its limit */
        due = p->slots[i].item == LPAR_SLOTHOOK ? limit : now + 10000000LL;
    }
    else if (w->state == W_BUSY && w->job && w->job->timeout > 0) {
      lua_Integer item = p->slots[i].item;
      long long limit = p->slots[i].since + (long long)(w->job->timeout * 1e9);
      if (item != 0 && now >= limit) {
        w->timedout = item;
        lpar_pool_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else
        due = item != 0 ? limit : now + 10000000LL; /* look again soon */
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
  if (next != p->armed) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (next > 0) {
      its.it_value.tv_sec = next / 1000000000LL;
      its.it_value.tv_nsec = next % 1000000000LL;
    }
    timerfd_settime(p->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    p->armed = next;
  }
  return acted;
}

/* ---- the pump ---- */

/*
** Handle what is ready, waiting up to 'ms' (-1: until something happens;
** the timer wakes it for deadlines): reap, restart lost workers, hand out
** chunks, read results, write pending items.
*/
static void pump(Ctx *c, int ms) {
  Pool *p = c->p;
  lua_State *L = c->L;
  int i, n;
  reapdying(p, 0);
  refill(c);
  if (lua_rawgeti(L, c->uv, PU_BROKEN) != LUA_TNIL) {
    lua_pop(L, 1); /* broken: no worker is left to wait for */
    return;
  }
  lua_pop(L, 1);
  dispatch(c);
  if (deadlines(c)) /* armed for workers just started, too */
    ms = 0;
  do
    n = epoll_pwait(p->epfd, p->evs, 3 * p->n + 1, ms,
                    p->waiting && p->watching ? &p->waitmask : NULL);
  while (n == -1 && errno == EINTR && !interrupted);
  if (n == -1 && errno != EINTR)
    luaL_error(L, "epoll_wait: %s", strerror(errno));
  for (i = 0; i < n; i++) {
    uint32_t kind = (uint32_t)(p->evs[i].data.u64 >> 32);
    uint32_t k = (uint32_t)p->evs[i].data.u64;
    PWorker *w;
    if (kind == EV_TIMER) {
      uint64_t ticks;
      if (read(p->tfd, &ticks, sizeof ticks) < 0) { /* just clearing it */
      }
      p->armed = 0;
      continue;
    }
    if (k >= (uint32_t)p->n)
      continue;
    w = &p->w[k];
    if (w->state == W_EMPTY)
      continue;
    if (kind == EV_RES)
      readworker(c, w);
    else if (kind == EV_PID) { /* it ended, maybe with its pipe held */
      pid_t pid = w->proc.pid;
      readworker(c, w); /* what it sent before it ended counts */
      if (w->state != W_EMPTY && w->proc.pid == pid)
        lose(c, w, 0, NULL);
    }
    else if (sendsome(p, w) != 0)
      lose(c, w, 1, NULL);
  }
  deadlines(c);
  refill(c);
  dispatch(c);
}

/* lua_CFunction: (ctx, ms, pool's uservalue) under lua_pcall, so that an
   error cannot leave the pool marked as pumping. */
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
  if (c->p->inpump)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  c->p->inpump = 1;
  holdchld(c->p);
  lua_pushcfunction(L, pumpcall);
  lua_pushlightuserdata(L, c);
  lua_pushinteger(L, ms);
  lua_pushvalue(L, c->uv);
  status = lua_pcall(L, 3, 0, 0);
  releasechld(c->p);
  c->p->inpump = 0;
  if (status != LUA_OK)
    lua_error(L);
}

/* ---- Lua API: the pool ---- */

static Pool *checkpool(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LPAR_POOLMT);
}

/* Set up a Ctx for the pool at 'idx' (pushes its uservalue). Raises if
   the pool is closed, belongs to another process, or is pumping (a
   finalizer run by the pump's allocations cannot use the pool). */
static void ctxof(lua_State *L, int idx, Ctx *c) {
  c->L = L;
  c->p = checkpool(L, idx);
  if (c->p->owner != getpid())
    luaL_error(L, "pool belongs to another process");
  if (c->p->closed)
    luaL_error(L, "pool is closed");
  if (c->p->inpump)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  lua_getiuservalue(L, idx, 1);
  c->uv = lua_gettop(L);
}

/*
** Close pool p: jobs not finished fail with 'why', busy workers are killed,
** idle ones are told to leave (they run close), and all are reaped. In a
** process that inherited a copy of the pool it does nothing. Never raises
** (but on memory errors).
*/
static void closepool(lua_State *L, int idx, const char *why) {
  Pool *p = lua_touserdata(L, idx);
  Ctx c;
  int i, hasclose, broken;
  long long grace, deadline;
  if (p == NULL || p->closed || p->owner != getpid())
    return;
  holdchld(p);
  c.L = L;
  c.p = p;
  lua_getiuservalue(L, idx, 1);
  c.uv = lua_gettop(L);
  while (p->jobs) {
    lua_pushstring(L, why);
    endjob(&c, p->jobs, J_CANCELLED, NULL);
  }
  p->closed = 1;
  lua_rawgeti(L, c.uv, PU_BROKEN);
  broken = !lua_isnil(L, -1); /* workers still in init are of no use */
  lua_pop(L, 1);
  for (i = 0; p->w && i < p->n; i++) {
    PWorker *w = &p->w[i];
    if (w->state == W_EMPTY)
      continue;
    if (w->state == W_BUSY || (broken && w->state == W_STARTING))
      lpar_pool_killproc(&w->proc, SIGKILL);
    closeworker(p, w); /* end of file: an idle worker leaves */
  }
  /* idle ones run close: the pool's timeout, or a grace period, bounds it;
     one still there is killed and reported, as a failing close is */
  grace = p->timeout > 0 ? (long long)(p->timeout * 1e9) : LPAR_CLOSEGRACENS;
  deadline = lpar_pool_now() + grace;
  lua_rawgeti(L, c.uv, PU_CLOSE);
  hasclose = !lua_isnil(L, -1);
  lua_pop(L, 1);
  for (i = 0; p->w && i < p->n; i++) {
    PWorker *w = &p->w[i];
    /* os.exit(7) in close, or a crash, is reported; not the busy ones
       killed above, whose places are empty by now */
    if (w->state != W_EMPTY)
      lpar_worker_finish(&w->proc, deadline, (double)grace / 1e9, hasclose, 1,
                         "pool worker");
    w->state = W_EMPTY;
    lpar_buf_free(&w->in);
    lpar_buf_free(&w->out);
    lpar_ring_unmap(&w->ring);
  }
  reapdying(p, 1);
  releasechld(p);
  lua_pop(L, 1);
  lpar_pool_closefd(&p->epfd);
  lpar_pool_closefd(&p->tfd);
  lpar_pool_freeslots(p->slots, (size_t)p->n);
  p->slots = NULL;
  free(p->w);
  free(p->evs);
  free(p->dying);
  p->w = NULL;
  p->evs = NULL;
  p->dying = NULL;
  p->ndying = p->capdying = 0;
}

static int pool_close(lua_State *L) {
  if (checkpool(L, 1)->inpump)
    return luaL_error(L, "pool is busy (called from inside its own pump)");
  lua_settop(L, 1);
  closepool(L, 1, "pool closed");
  return 0;
}

static int pool_gc(lua_State *L) {
  lua_settop(L, 1);
  closepool(L, 1, "pool closed");
  return 0;
}

/* Number of online CPUs, at least 1. */
static int ncpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > LPAR_MAXWORKERS ? LPAR_MAXWORKERS : (int)n;
}

static const char *const poolopts[] = {
    "n_workers", "init", "close", "timeout", "max_memory", "sigterm", NULL};

/*
** lpar.pool([n_workers | opts]) -> pool. opts: n_workers (default: the
** number of CPUs), init and close (run once in each worker, first and
** last), timeout (seconds each of init and close may take). Forks the
** workers and waits until each has run init; raises "worker init failed:
** ..." if one fails, "worker init timed out after ..." if one takes too
** long.
*/
static int l_pool(lua_State *L) {
  lua_Integer nw = ncpus();
  double timeout = 0;
  size_t maxmem = 0;
  int sigterm = 0;
  Pool *p;
  Ctx c;
  int i;
  if (lpar_worker_inside(L))
    return luaL_error(L, "cannot make a pool inside a worker");
  if (lua_type(L, 1) == LUA_TTABLE) {
    lpar_opts_checkkeys(L, 1, poolopts);
    if (lua_getfield(L, 1, "n_workers") != LUA_TNIL) {
      int isnum;
      nw = lua_tointegerx(L, -1, &isnum);
      if (!isnum || nw < 1)
        luaL_argerror(L, 1, "n_workers must be a positive integer");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "timeout") != LUA_TNIL) {
      int isnum;
      timeout = (double)lua_tonumberx(L, -1, &isnum);
      if (!isnum || !(timeout > 0) || timeout > 1e9)
        luaL_argerror(L, 1, "timeout must be a positive number of seconds");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "max_memory") != LUA_TNIL)
      maxmem = lpar_opts_size(L, 1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "sigterm");
    sigterm = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  else if (!lua_isnoneornil(L, 1)) {
    nw = luaL_checkinteger(L, 1);
    luaL_argcheck(L, nw >= 1, 1, "n_workers must be a positive integer");
  }
  if (nw > LPAR_MAXWORKERS)
    nw = LPAR_MAXWORKERS;
  lua_settop(L, 1);
  p = lua_newuserdatauv(L, sizeof(Pool), 1); /* 2 */
  memset(p, 0, sizeof *p);
  p->epfd = p->tfd = -1;
  p->owner = getpid();
  p->n = (int)nw;
  p->timeout = timeout;
  p->maxmem = maxmem;
  p->sigterm = sigterm;
  p->closed = 1; /* until it is complete: __gc has nothing to do */
  luaL_setmetatable(L, LPAR_POOLMT);
  lua_createtable(L, PU_N, 0); /* 3: uservalue */
  lpar_opts_hook(L, 1, "init");
  lua_rawseti(L, 3, PU_INIT);
  lpar_opts_hook(L, 1, "close");
  lua_rawseti(L, 3, PU_CLOSE);
  lua_newtable(L);
  lua_rawseti(L, 3, PU_ANCHORS);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawseti(L, 3, PU_TNS);
  lua_pushvalue(L, 3);
  lua_setiuservalue(L, 2, 1);
  p->w = calloc((size_t)p->n, sizeof(PWorker));
  p->evs = calloc((size_t)p->n * 3 + 1, sizeof(struct epoll_event));
  if (p->w == NULL || p->evs == NULL)
    return luaL_error(L, "not enough memory");
  for (i = 0; i < p->n; i++)
    p->w[i].proc.cmdfd = p->w[i].proc.resfd = p->w[i].proc.pidfd = -1;
  p->slots = lpar_pool_slots((size_t)p->n);
  if (p->slots == NULL)
    return luaL_error(L, "cannot map shared memory: %s", strerror(errno));
  p->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (p->epfd >= 0)
    lpar_pool_track(p->epfd);
  p->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (p->tfd >= 0)
    lpar_pool_track(p->tfd);
  p->closed = 0;
  if (p->epfd < 0 || p->tfd < 0 ||
      evctl(p, EPOLL_CTL_ADD, p->tfd, EPOLLIN, EVDATA(EV_TIMER, 0)) != 0) {
    int e = errno;
    closepool(L, 2, "pool closed");
    return luaL_error(L, "cannot make a pool: %s", strerror(e));
  }
  /* start every worker and wait until all have run init */
  c.L = L;
  c.p = p;
  c.uv = 3;
  p->creating = 1;
  holdchld(p);
  for (;;) {
    int starting = 0;
    lua_pushcfunction(L, pumpcall);
    lua_pushlightuserdata(L, &c);
    lua_pushinteger(L, -1);
    lua_pushvalue(L, 3);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK)
      break;
    lua_rawgeti(L, 3, PU_BROKEN);
    if (!lua_isnil(L, -1))
      break;
    lua_pop(L, 1);
    for (i = 0; i < p->n; i++)
      starting += p->w[i].state == W_STARTING;
    if (starting == 0)
      break;
  }
  p->creating = 0;
  releasechld(p);
  if (lua_gettop(L) > 3) { /* an error, or the reason the pool broke */
    lua_insert(L, 1);
    closepool(L, 3, "pool closed");
    lua_settop(L, 1);
    return lua_error(L);
  }
  lua_settop(L, 2);
  return 1;
}

static const char *const jobopts[] = {"chunksize", "on_error", "timeout",
                                      "retries", NULL};

/* Read the job options at 'arg' (nil or a table) into j. */
static void getjobopts(lua_State *L, int arg, Job *j) {
  if (lua_isnoneornil(L, arg))
    return;
  luaL_checktype(L, arg, LUA_TTABLE);
  lpar_opts_checkkeys(L, arg, jobopts);
  lpar_opts_run(L, arg, &j->chunk, &j->collect, &j->timeout, &j->retries);
}

/*
** pool:submit(f, items [, opts]) -> job, at once. Stack: pool, f, items,
** opts. f and its upvalues are encoded here: a function that cannot
** travel is refused before anything is sent. An iterator's items are
** drained into a table first.
*/
static int pool_submit(lua_State *L) {
  Ctx c;
  Job *j;
  Frame f;
  int ju;
  lua_Integer n;
  lua_settop(L, 4);
  ctxof(L, 1, &c); /* 5: pool's uservalue */
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (lua_type(L, 3) == LUA_TFUNCTION) { /* an iterator: drain it */
    lua_Integer i = 0;
    lua_newtable(L);
    for (;;) {
      lua_pushvalue(L, 3);
      lua_call(L, 0, 1);
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        break;
      }
      lua_rawseti(L, -2, ++i);
    }
    lua_replace(L, 3);
    n = i;
  }
  else {
    luaL_argexpected(L, lua_type(L, 3) == LUA_TTABLE, 3,
                     "table or iterator function");
    n = lpar_opts_itemcount(L, 3);
  }
  lua_rawgeti(L, c.uv, PU_BROKEN);
  if (!lua_isnil(L, -1))
    return lua_error(L);
  lua_pop(L, 1);
  j = lua_newuserdatauv(L, sizeof(Job), 1); /* 6 */
  memset(j, 0, sizeof *j);
  luaL_setmetatable(L, LPAR_JOBMT);
  j->pool = c.p;
  j->id = ++c.p->nextid;
  j->n = n;
  j->next = 1;
  j->state = J_RUNNING;
  getjobopts(L, 4, j);
  lua_createtable(L, JU_N, 0); /* 7 */
  lua_createtable(L, n > 0 && n < INT32_MAX ? (int)n : 0, 0);
  lua_rawseti(L, 7, JU_RESULTS);
  lua_newtable(L);
  lua_rawseti(L, 7, JU_ERRORS);
  lua_pushvalue(L, 3);
  lua_rawseti(L, 7, JU_ITEMS);
  lua_pushvalue(L, 1);
  lua_rawseti(L, 7, JU_POOL);
  lua_pushvalue(L, 2);
  lua_rawseti(L, 7, JU_F);
  lua_setiuservalue(L, 6, 1);
  ju = 6;
  /* the function, once, as a CALL frame */
  nomem(L, lpar_buf_reserve(&j->call, LPAR_HDRSIZE));
  j->call.n = LPAR_HDRSIZE;
  if (lpar_xfer_encode(L, 2, &j->call) != 0) {
    freejob(j);
    return luaL_error(L, "cannot send the function: %s", lua_tostring(L, -1));
  }
  f.type = LPAR_FCALL;
  /* with retries, a worker goes on with its chunk after an item fails */
  f.count = (j->collect || j->retries > 0 ? LPAR_CALLCOLLECT : 0) |
            (j->timeout > 0 ? LPAR_CALLTIMED : 0);
  f.len = j->call.n - LPAR_HDRSIZE;
  lpar_wire_putheader(j->call.p, &f);
  /* what was learnt about this function's items last time */
  lua_rawgeti(L, c.uv, PU_TNS);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, -2) == LUA_TNUMBER)
    j->tns = (double)lua_tonumber(L, -1);
  lua_pop(L, 2);
  if (n == 0) {
    j->state = J_DONE;
    freejob(j);
    lua_settop(L, ju);
    return 1;
  }
  /* anchor it and queue it, then start it at once */
  lua_rawgeti(L, c.uv, PU_ANCHORS);
  lua_pushvalue(L, ju);
  lua_rawsetp(L, -2, j);
  lua_pop(L, 1);
  if (c.p->lastjob)
    c.p->lastjob->nextjob = j;
  else
    c.p->jobs = j;
  c.p->lastjob = j;
  safepump(&c, 0);
  lua_settop(L, ju);
  return 1;
}

/* ---- Lua API: jobs ---- */

static Job *checkjob(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LPAR_JOBMT);
}

/* Pump the pool of the job at 1 without waiting (if it still runs). */
static void jobpump(lua_State *L, Job *j) {
  Ctx c;
  if (j->state != J_RUNNING)
    return;
  lua_getiuservalue(L, 1, 1);
  lua_rawgeti(L, -1, JU_POOL);
  ctxof(L, lua_gettop(L), &c);
  safepump(&c, 0);
  lua_pop(L, 3);
}

/* job:done() -> true once the job is finished (failed or cancelled too);
   never blocks: it handles what the workers have sent so far. */
static int job_done(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  jobpump(L, j);
  lua_pushboolean(L, j->state != J_RUNNING);
  return 1;
}

/* job:progress() -> items done, items in all (never blocks). */
static int job_progress(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  jobpump(L, j);
  lua_pushinteger(L, j->done);
  lua_pushinteger(L, j->n);
  return 2;
}

/* job:status() -> "running", "done", "failed" or "cancelled" (no pump). */
static int job_status(lua_State *L) {
  static const char *const names[] = {"running", "done", "failed", "cancelled"};
  Job *j = checkjob(L, 1);
  lua_pushstring(L, names[j->state]);
  return 1;
}

/* Under lua_pcall: (ctx, job, pool's uservalue) pumps until the job is
   finished. */
static int waitloop(lua_State *L) {
  Ctx own = *(Ctx *)lua_touserdata(L, 1);
  Job *j = lua_touserdata(L, 2);
  own.L = L;
  own.uv = 3;
  while (j->state == J_RUNNING) {
    pump(&own, -1);
    if (interrupted && j->state == J_RUNNING) {
      lua_pushstring(L, interrupted == SIGTERM ? "terminated" : "interrupted");
      endjob(&own, j, J_CANCELLED, NULL);
    }
  }
  return 0;
}

/* Pump until job j (at 'jidx') is finished, with SIGINT ending the wait
   ("interrupted"; the job is cancelled), and SIGTERM too ("terminated")
   when the pool takes it. A signal the caller ignores stays ignored. */
static void waitjob(lua_State *L, int jidx, Job *j) {
  static const int sigs[] = {SIGINT, SIGTERM};
  Ctx c;
  Pool *p;
  struct sigaction sa, old[2];
  sigset_t block;
  int status, k, taken[2] = {0, 0};
  if (j->state != J_RUNNING)
    return;
  lua_getiuservalue(L, jidx, 1);
  lua_rawgeti(L, -1, JU_POOL);
  ctxof(L, lua_gettop(L), &c);
  p = c.p;
  if (p->inpump || p->waiting)
    luaL_error(L, "pool is busy (called from inside its own pump)");
  sigemptyset(&block);
  for (k = 0; k < 2; k++)
    if (k == 0 || p->sigterm)
      sigaddset(&block, sigs[k]);
  sigprocmask(SIG_BLOCK, &block, &p->oldmask);
  p->waitmask = p->oldmask;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = onint;
  sigemptyset(&sa.sa_mask);
  for (k = 0; k < 2; k++) {
    if (!sigismember(&block, sigs[k]))
      continue;
    sigaction(sigs[k], NULL, &old[k]);
    taken[k] = old[k].sa_handler != SIG_IGN;
    if (taken[k]) {
      sigaction(sigs[k], &sa, NULL);
      sigdelset(&p->waitmask, sigs[k]);
    }
  }
  p->watching = taken[0] || taken[1];
  interrupted = 0;
  p->waiting = 1;
  p->inpump = 1;
  holdchld(p);
  lua_pushcfunction(L, waitloop);
  lua_pushlightuserdata(L, &c);
  lua_pushlightuserdata(L, j);
  lua_pushvalue(L, c.uv);
  status = lua_pcall(L, 3, 0, 0);
  releasechld(p);
  p->inpump = 0;
  p->waiting = 0;
  for (k = 0; k < 2; k++)
    if (taken[k])
      sigaction(sigs[k], &old[k], NULL);
  sigprocmask(SIG_SETMASK, &p->oldmask, NULL);
  if (status != LUA_OK)
    lua_error(L);
  lua_pop(L, 3);
}

/* Push what the finished job at 'idx' returns: results, n [, errors];
   raises its failure. */
static int jobresults(lua_State *L, int idx, Job *j) {
  lua_getiuservalue(L, idx, 1);
  if (j->state != J_DONE) {
    lua_rawgeti(L, -1, JU_FAILURE);
    return lua_error(L);
  }
  lua_rawgeti(L, -1, JU_RESULTS);
  lua_pushinteger(L, j->n);
  if (!j->collect)
    return 2;
  lua_rawgeti(L, -3, JU_ERRORS);
  return 3;
}

/* job:wait() -> results, n [, errors]: blocks until the job is finished;
   raises as pool:map would. */
static int job_wait(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  waitjob(L, 1, j);
  return jobresults(L, 1, j);
}

/* job:cancel() -> true if it was running: its items are no longer handed
   out and workers running them are killed and replaced. wait() then
   raises "cancelled". */
static int job_cancel(lua_State *L) {
  Job *j = checkjob(L, 1);
  Ctx c;
  lua_settop(L, 1);
  if (j->state != J_RUNNING) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_getiuservalue(L, 1, 1);
  lua_rawgeti(L, -1, JU_POOL);
  ctxof(L, 3, &c);
  if (c.p->inpump)
    return luaL_error(L, "pool is busy (called from inside its own pump)");
  lua_pushliteral(L, "cancelled");
  holdchld(c.p);
  endjob(&c, j, J_CANCELLED, NULL);
  reapdying(c.p, 1); /* killed: no zombie is left for a later pump */
  releasechld(c.p);
  lua_pushboolean(L, 1);
  return 1;
}

/* __close: cancel a job left running when its variable goes out of scope. */
static int job_close(lua_State *L) {
  Job *j = checkjob(L, 1);
  Pool *p = j->pool;
  if (j->state == J_RUNNING && p && !p->closed && !p->inpump &&
      p->owner == getpid())
    job_cancel(L);
  return 0;
}

/* A running job is anchored by its pool, so this runs for it only when
   the state closes; the pool's own __gc ends it. */
static int job_gc(lua_State *L) {
  freejob(lua_touserdata(L, 1));
  return 0;
}

static int job_tostring(lua_State *L) {
  static const char *const names[] = {"running", "done", "failed", "cancelled"};
  Job *j = checkjob(L, 1);
  lua_pushfstring(L, "lpar.Job (%s, %I/%I)", names[j->state],
                  (LUAI_UACINT)j->done, (LUAI_UACINT)j->n);
  return 1;
}

/* pool:map(f, items [, opts]) -> results, n [, errors]: submit and wait. */
static int pool_map(lua_State *L) {
  Job *j;
  lua_settop(L, 4);
  pool_submit(L); /* job at 6 */
  j = lua_touserdata(L, 6);
  lua_settop(L, 6);
  waitjob(L, 6, j);
  return jobresults(L, 6, j);
}

/* pool:pump() -> number of jobs not finished; never blocks. For hosts
   that watch pool:fd(): call it when the fd is readable. */
static int pool_pump(lua_State *L) {
  Ctx c;
  int n = 0;
  Job *j;
  ctxof(L, 1, &c);
  safepump(&c, 0);
  for (j = c.p->jobs; j; j = j->nextjob)
    n++;
  lua_pushinteger(L, n);
  return 1;
}

/*
** pool:fd() -> an fd that is readable whenever the pool has something to
** handle: a worker sent results or ended, a pending write can go on, or a
** timeout is due. Call pool:pump() (or job:done()) when it is. It is an
** epoll fd, owned by the pool: do not close it, and stop watching it
** before pool:close().
*/
static int pool_fd(lua_State *L) {
  Ctx c;
  ctxof(L, 1, &c);
  lua_pushinteger(L, c.p->epfd);
  return 1;
}

/* pool:pids() -> the pids of the workers now running, in place order. */
static int pool_pids(lua_State *L) {
  Ctx c;
  int i, k = 0;
  ctxof(L, 1, &c);
  lua_createtable(L, c.p->n, 0);
  for (i = 0; i < c.p->n; i++)
    if (c.p->w[i].state != W_EMPTY) {
      lua_pushinteger(L, c.p->w[i].proc.pid);
      lua_rawseti(L, -2, ++k);
    }
  return 1;
}

/* pool:size() -> number of workers the pool keeps. */
static int pool_size(lua_State *L) {
  lua_pushinteger(L, checkpool(L, 1)->n);
  return 1;
}

static int pool_tostring(lua_State *L) {
  Pool *p = checkpool(L, 1);
  if (p->closed)
    lua_pushliteral(L, "lpar.Pool (closed)");
  else
    lua_pushfstring(L, "lpar.Pool (%d workers)", p->n);
  return 1;
}

static const luaL_Reg poolmethods[] = {
    {"map", pool_map},     {"submit", pool_submit},
    {"pump", pool_pump},   {"fd", pool_fd},
    {"pids", pool_pids},   {"size", pool_size},
    {"close", pool_close}, {NULL, NULL}};

static const luaL_Reg jobmethods[] = {
    {"done", job_done},     {"progress", job_progress}, {"wait", job_wait},
    {"cancel", job_cancel}, {"status", job_status},     {NULL, NULL}};

int lpar_inworker(lua_State *L) {
  return lpar_worker_inside(L);
}

void lpar_lpool_open(lua_State *L) {
  if (luaL_newmetatable(L, LPAR_POOLMT)) {
    luaL_newlib(L, poolmethods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, pool_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, pool_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, pool_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, LPAR_JOBMT)) {
    luaL_newlib(L, jobmethods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, job_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, job_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, job_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_pool);
  lua_setfield(L, -2, "pool");
}
