/*
** run.c: the parent side of a run. Starts workers as they are needed,
** hands out chunks of items, gathers results, and stops every worker
** before a call returns or raises.
*/
#include "run.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "lauxlib.h"
#include "lpar.h"
#include "policy.h"
#include "pool.h"
#include "ranges.h"
#include "ring.h"
#include "wire.h"
#include "worker.h"

/* items pulled from an iterator but not yet emitted, at most */
#if !defined(LPAR_WINDOW)
#define LPAR_WINDOW 16384
#endif

/* after SIGTERM for a timeout, SIGKILL follows this much later (ns) */
#define KILLGRACE 500000000LL

/* fields of the run's uservalue table */
enum {
  ENV_RESULTS = 1,
  ENV_ERRORS,
  ENV_F,
  ENV_ITEMS,
  ENV_FAILURE,
  ENV_INFLIGHT,
  ENV_INIT,
  ENV_CLOSE,
  ENV_ATTEMPTS
};

/* stack slots of a step function: the run and what it uses most */
enum { S_RUN = 1, S_ENV, S_RESULTS, S_ERRORS, S_INFLIGHT, S_TOP = S_INFLIGHT };

typedef struct Worker {
  Proc proc;            /* proc.pid == 0: nobody in this place */
  lua_Integer first;    /* chunk being run */
  lua_Integer count;    /* items in it; 0 when idle */
  lua_Integer got;      /* items of it reported so far */
  long long sent;       /* when it was sent */
  long long busy;       /* ns the worker reports spending on it so far */
  Buf in;               /* bytes received and not yet handled */
  long long lastread;   /* when bytes last came */
  Buf out;              /* bytes to send */
  size_t outpos;        /* bytes of 'out' already sent */
  lua_Integer timedout; /* item it was killed for, 0 if none */
  int alone;            /* its chunk is one suspect (see lpar_ranges_take) */
  lua_Integer blame;    /* item whose report broke the protocol, 0 if none */
  long long killat;     /* if > 0: SIGKILL due at this time */
  Ring ring;            /* big results frames arrive here */
} Worker;

typedef struct Run {
  RunOpts o;
  int stream;   /* items come from an iterator */
  int emitting; /* results are taken one by one (lpar.imap) */
  int sized;    /* the results table was made at its full size */
  int cap;      /* most workers to run at once */
  int started;  /* signals changed, slots mapped */
  int stopped;
  int live;  /* workers running */
  Worker *w; /* o.nworkers places */
  Slot *slots;
  struct pollfd *pfd;
  int *pfdw;          /* worker of each pollfd */
  int hasclose;       /* workers run a close hook */
  lua_Integer n;      /* items: known count, or pulled so far */
  lua_Integer next;   /* next item never handed out */
  int exhausted;      /* the iterator returned nil */
  Ranges redo;        /* items to hand out again */
  lua_Integer done;   /* items reported */
  lua_Integer emit;   /* next index to emit (imap) */
  unsigned char *fin; /* ring of LPAR_WINDOW flags: item done (imap) */
  lua_Integer *queue; /* ring of done indices (unordered imap) */
  lua_Integer qhead, qtail;
  double tns;         /* estimated ns per item; 0 until measured */
  long long pns;      /* ns the caller has spent reading and decoding results */
  lua_Integer pitems; /* results those ns were spent on */
  int failed;         /* an item failed and the run must stop */
  int lost;           /* workers lost without a culprit */
  int forks;          /* workers started so far */
  SchedWave wave;     /* workers started while none is past its first item */
  Proc *retired;      /* workers told to leave, to reap at the end */
  int nretired, capretired;
  struct sigaction oldint;
  sigset_t oldmask;
  int ignint;
  struct sigaction oldterm;
  struct sigaction oldchld;
  int heldchld;  /* SIGCHLD was ignored: made deliverable for the run */
  int watchterm; /* SIGTERM ends the run too (the CLI) */
  struct sigaction oldhup;
  int watchhup; /* so does SIGHUP, with SIGTERM, unless it was ignored */
  pid_t owner;  /* the process that made it (workers inherit copies) */
} Run;

/* the signal that interrupted the current run; a handler can only reach
   static data */
static volatile sig_atomic_t interrupted;

static void onint(int sig) {
  interrupted = sig;
}

static Run *checkrun(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LPAR_RUNMT);
}

/* Take over SIGINT for the run (and SIGTERM and SIGHUP if it watches
   them): block it outside ppoll, note it inside. */
static void startsignals(Run *r) {
  sigset_t block;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = onint;
  sigemptyset(&sa.sa_mask);
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  if (r->watchterm)
    sigaddset(&block, SIGTERM);
  r->watchhup = r->watchterm && sigaction(SIGHUP, NULL, &r->oldhup) == 0 &&
                r->oldhup.sa_handler != SIG_IGN;
  if (r->watchhup)
    sigaddset(&block, SIGHUP);
  sigprocmask(SIG_BLOCK, &block, &r->oldmask);
  sigaction(SIGINT, NULL, &r->oldint);
  r->ignint = r->oldint.sa_handler == SIG_IGN;
  if (!r->ignint)
    sigaction(SIGINT, &sa, NULL);
  if (r->watchterm)
    sigaction(SIGTERM, &sa, &r->oldterm);
  if (r->watchhup)
    sigaction(SIGHUP, &sa, NULL);
  r->heldchld = lpar_pool_holdchld(&r->oldchld);
  interrupted = 0;
}

static void stopsignals(Run *r) {
  if (!r->ignint)
    sigaction(SIGINT, &r->oldint, NULL);
  if (r->watchterm)
    sigaction(SIGTERM, &r->oldterm, NULL);
  if (r->watchhup)
    sigaction(SIGHUP, &r->oldhup, NULL);
  if (r->heldchld)
    sigaction(SIGCHLD, &r->oldchld, NULL);
  sigprocmask(SIG_SETMASK, &r->oldmask, NULL);
}

void lpar_run_new(lua_State *L, int fidx, int iidx, lua_Integer n,
                  const RunOpts *o) {
  Run *r;
  int i, hooks = lua_gettop(L) - 1; /* init, close on top */
  fidx = lua_absindex(L, fidx);
  iidx = lua_absindex(L, iidx);
  r = lua_newuserdatauv(L, sizeof(Run), 1);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, LPAR_RUNMT);
  r->o = *o;
  r->cap = o->nworkers;
  r->owner = getpid();
  r->watchterm = o->sigterm;
  r->stream = n < 0;
  r->hasclose = !lua_isnil(L, hooks + 1);
  r->n = n < 0 ? 0 : n;
  r->next = 1;
  r->emit = 1;
  lua_createtable(L, 6, 0);
  lua_newtable(L); /* sized when the first result comes, after a fork */
  lua_rawseti(L, -2, ENV_RESULTS);
  lua_newtable(L);
  lua_rawseti(L, -2, ENV_ERRORS);
  lua_pushvalue(L, fidx);
  lua_rawseti(L, -2, ENV_F);
  lua_pushvalue(L, iidx);
  lua_rawseti(L, -2, ENV_ITEMS);
  lua_newtable(L);
  lua_rawseti(L, -2, ENV_INFLIGHT);
  lua_pushvalue(L, hooks);
  lua_rawseti(L, -2, ENV_INIT);
  lua_pushvalue(L, hooks + 1);
  lua_rawseti(L, -2, ENV_CLOSE);
  lua_newtable(L);
  lua_rawseti(L, -2, ENV_ATTEMPTS);
  lua_setiuservalue(L, -2, 1);
  lua_replace(L, hooks); /* the run replaces the hooks */
  lua_settop(L, hooks);
  r->w = calloc((size_t)o->nworkers, sizeof(Worker));
  r->pfd = calloc((size_t)o->nworkers * 3, sizeof(struct pollfd));
  r->pfdw = calloc((size_t)o->nworkers * 3, sizeof(int));
  if (!r->w || !r->pfd || !r->pfdw)
    luaL_error(L, "not enough memory"); /* __gc frees what was made */
  for (i = 0; i < o->nworkers; i++)
    r->w[i].proc.cmdfd = r->w[i].proc.resfd = r->w[i].proc.pidfd = -1;
  r->slots = lpar_pool_slots((size_t)o->nworkers);
  if (r->slots == NULL)
    luaL_error(L, "cannot map shared memory: %s", strerror(errno));
}

/* Push the run's tables into the fixed slots of a step function. */
static Run *stepsetup(lua_State *L) {
  Run *r = checkrun(L, S_RUN);
  lua_settop(L, S_RUN);
  lua_getiuservalue(L, S_RUN, 1);
  lua_rawgeti(L, S_ENV, ENV_RESULTS);
  lua_rawgeti(L, S_ENV, ENV_ERRORS);
  lua_rawgeti(L, S_ENV, ENV_INFLIGHT);
  if (r->stopped)
    luaL_error(L, "run already finished");
  if (!r->started) {
    startsignals(r);
    r->started = 1;
  }
  return r;
}

/* ---- scheduling ---- */

/* Items handed out so far (fresh ones, not counting hand-outs again). */
static lua_Integer handed(Run *r) {
  return r->stream ? r->n : r->next - 1;
}

/* How many more items may be handed out now: results waiting to be
   emitted, or items in flight, stay within LPAR_WINDOW. */
static lua_Integer room(Run *r) {
  if (r->emitting)
    return LPAR_WINDOW - (handed(r) - (r->emit - 1));
  if (r->stream)
    return LPAR_WINDOW - (handed(r) - r->done);
  return r->n - r->next + 1;
}

static int hasroom(Run *r) {
  return room(r) > 0;
}

static int workleft(Run *r) {
  if (r->failed)
    return 0;
  if (r->redo.n > 0)
    return 1;
  if (r->stream)
    return !r->exhausted && hasroom(r);
  return r->next <= r->n && hasroom(r);
}

/* Chunk size for the next hand-out (see lpar_policy_chunk). A stream has
   no tail to balance until it ends: its chunks take longer. */
static lua_Integer chunksize(Run *r) {
  SchedChunk s = {0};
  s.fixed = r->o.chunk;
  s.left = r->stream ? -1 : r->n - r->next + 1;
  s.places = r->o.nworkers;
  s.tns = r->tns;
  s.minns = (r->stream ? 4.0 : 1.0) * LPAR_MINCHUNKNS;
  s.max = r->stream && r->o.chunk <= 0 ? LPAR_MAXSTREAMCHUNK : 0;
  return (lua_Integer)lpar_policy_chunk(&s);
}

/* Start writing the frame in w->out: header then the u64 first index. */
static void beginframe(lua_State *L, Worker *w, lua_Integer first) {
  w->out.n = 0;
  w->outpos = 0;
  if (lpar_buf_reserve(&w->out, LPAR_HDRSIZE + 8) != 0)
    luaL_error(L, "not enough memory");
  w->out.n = LPAR_HDRSIZE + 8;
  lpar_wire_put64(w->out.p + LPAR_HDRSIZE, (uint64_t)first);
}

static void endframe(Worker *w, int type, lua_Integer count) {
  Frame f;
  f.type = (uint32_t)type;
  f.count = (uint32_t)count;
  f.len = w->out.n - LPAR_HDRSIZE;
  lpar_wire_putheader(w->out.p, &f);
}

/* Encode the item at the top of the stack (popped) into w->out. */
static void additem(lua_State *L, Worker *w, lua_Integer i) {
  if (lpar_codec_encode(L, -1, &w->out) != 0)
    luaL_error(L, "item %I: cannot send item: %s", (LUAI_UACINT)i,
               lua_tostring(L, -1));
  lua_pop(L, 1);
}

/* Pull up to 'max' new items from the iterator into w->out and the
   in-flight table; returns how many. */
static lua_Integer pull(lua_State *L, Run *r, Worker *w, lua_Integer max) {
  lua_Integer k = 0;
  while (k < max && !r->exhausted && hasroom(r)) {
    lua_rawgeti(L, S_ENV, ENV_ITEMS);
    lua_call(L, 0, 1);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      r->exhausted = 1;
      break;
    }
    r->n++;
    lua_pushvalue(L, -1);
    lua_rawseti(L, S_INFLIGHT, r->n);
    additem(L, w, r->n);
    k++;
  }
  return k;
}

static int sendsome(Worker *w);

/* Hand worker 'w' its next chunk, if there is one. */
static void assign(lua_State *L, Run *r, Worker *w) {
  lua_Integer first, count;
  long long from;
  w->alone = 0;
  if ((count = lpar_ranges_take(&r->redo, chunksize(r), &from, &w->alone)) >
      0) {
    first = from;
    beginframe(L, w, first);
    if (r->stream) {
      lua_Integer i;
      for (i = first; i < first + count; i++) {
        lua_rawgeti(L, S_INFLIGHT, i);
        additem(L, w, i);
      }
    }
  }
  else if (r->stream) {
    first = r->n + 1;
    beginframe(L, w, first);
    count = pull(L, r, w, chunksize(r));
    if (count == 0) { /* nothing came: drop the frame begun */
      w->out.n = w->outpos = 0;
      return;
    }
  }
  else {
    lua_Integer c = chunksize(r), left = r->n - r->next + 1;
    if (left > room(r))
      left = room(r);
    first = r->next;
    count = c < left ? c : left;
    r->next += count;
    beginframe(L, w, first);
  }
  endframe(w, r->stream ? LPAR_FITEMS : LPAR_FWORK, count);
  w->first = first;
  w->count = count;
  w->got = 0;
  w->sent = lpar_pool_now();
  w->busy = 0;
  sendsome(w);
}

/* Send what is pending; 0, or -errno if the worker cannot be written. */
static int sendsome(Worker *w) {
  return lpar_wire_sendsome(w->proc.cmdfd, &w->out, &w->outpos);
}

/* ---- workers ---- */

static void spawn(lua_State *L, Run *r) {
  int i;
  pid_t pid;
  Worker *w = NULL;
  ChildSetup cs;
  const char *call = "fork";
  for (i = 0; i < r->o.nworkers; i++)
    if (r->w[i].proc.pid == 0) {
      w = &r->w[i];
      break;
    }
  if (w == NULL)
    return;
  /* the first worker inherits the caller's heap as the call found it;
     later ones also its results, which they drop (and say if they still
     cannot run) */
  if (r->o.maxmem > 0 && r->forks == 0 && lpar_worker_checkheap(L, r->o.maxmem))
    lua_error(L);
  cs.mask = &r->oldmask;
  cs.ignint = r->ignint;
  r->slots[i].item = 0;
  lpar_ring_unmap(&w->ring); /* the last worker in this place is gone */
  if (lpar_ring_map(&w->ring, LPAR_RINGSIZE) != 0)
    w->ring.base = NULL; /* no ring: every frame takes the pipe */
  lua_rawgeti(L, S_ENV, ENV_F);
  lua_rawgeti(L, S_ENV, ENV_ITEMS);
  lua_rawgeti(L, S_ENV, ENV_INIT);
  lua_rawgeti(L, S_ENV, ENV_CLOSE);
  pid = lpar_pool_fork(&w->proc, &cs, &call);
  if (pid == 0) {
    WorkerArgs a;
    int top = lua_gettop(L);
    /* the results so far are the caller's: not this worker's heap */
    lua_pushnil(L);
    lua_rawseti(L, S_ENV, ENV_RESULTS);
    lua_pushnil(L);
    lua_rawseti(L, S_ENV, ENV_ERRORS);
    lua_pushnil(L);
    lua_replace(L, S_RESULTS);
    lua_pushnil(L);
    lua_replace(L, S_ERRORS);
    a.cmdfd = w->proc.cmdfd;
    a.resfd = w->proc.resfd;
    a.fidx = top - 3;
    a.itemsidx = r->stream ? 0 : top - 2;
    a.initidx = lua_isnil(L, top - 1) ? 0 : top - 1;
    a.closeidx = lua_isnil(L, top) ? 0 : top;
    /* the run stops at the first failure unless it collects or retries */
    a.stoponerror = !r->o.collect && r->o.retries == 0;
    a.timed = r->o.timeout > 0;
    a.maxmem = r->o.maxmem;
    a.slot = &r->slots[i];
    a.ring = w->ring;
    lpar_worker_reseed(L, i);
    lpar_worker_run(L, &a);
  }
  lua_pop(L, 4);
  lpar_ring_keep(&w->ring);
  if (pid < 0) {
    lpar_ring_unmap(&w->ring);
    if (r->live > 0) { /* go on with the workers there are */
      r->cap = r->live;
      return;
    }
    luaL_error(L, "cannot start a worker: %s: %s", call, strerror(-pid));
  }
  r->live++;
  r->forks++;
  lpar_policy_started(&r->wave, r->live, lpar_pool_now());
  w->count = 0;
  w->in.n = 0;
  w->lastread = lpar_pool_now();
  w->timedout = 0;
  w->blame = 0;
  w->killat = 0;
}

/* Hand out [first, first + count) again. */
static void addredo(lua_State *L, Run *r, lua_Integer first,
                    lua_Integer count) {
  if (lpar_ranges_add(&r->redo, first, count) != 0)
    luaL_error(L, "not enough memory");
}

/* ---- results ---- */

/* The value at the top of the stack is the result of item i (popped). */
static void store(lua_State *L, Run *r, lua_Integer i) {
  if (r->stream) {
    lua_pushnil(L);
    lua_rawseti(L, S_INFLIGHT, i);
  }
  if (r->emitting) {
    r->fin[(i - 1) % LPAR_WINDOW] = 1;
    if (r->o.unordered)
      r->queue[r->qtail++ % LPAR_WINDOW] = i;
  }
  if (!r->sized && !r->stream) {
    /* made now rather than before the first fork, so that filling it
       does not copy pages the parent shares with its workers */
    r->sized = 1;
    lua_createtable(L, r->n < INT32_MAX ? (int)r->n : 0, 0);
    lua_pushvalue(L, -1);
    lua_rawseti(L, S_ENV, ENV_RESULTS);
    lua_replace(L, S_RESULTS);
  }
  if (lua_isnil(L, -1))
    lua_pop(L, 1);
  else
    lua_rawseti(L, S_RESULTS, i);
  r->done++;
}

static void addredo(lua_State *L, Run *r, lua_Integer first, lua_Integer count);

/* Record that item i failed with the error value and traceback at the
   top of the stack (both popped), unless it has retries left: then it is
   handed out again. */
static void itemfailed(lua_State *L, Run *r, lua_Integer i) {
  if (r->o.retries > 0 && !r->failed) {
    lua_Integer tries;
    lua_rawgeti(L, S_ENV, ENV_ATTEMPTS);
    lua_rawgeti(L, -1, i);
    tries = lua_tointeger(L, -1);
    if (lpar_policy_retry(tries, r->o.retries)) {
      lua_pushinteger(L, tries + 1);
      lua_rawseti(L, -3, i);
      lua_pop(L, 4); /* count, attempts, error, traceback */
      /* it failed before: a suspect, run alone, so that losing its
         worker again names it */
      if (lpar_ranges_push(&r->redo, i, 1, 1) != 0)
        luaL_error(L, "not enough memory");
      return;
    }
    lua_pop(L, 2);
  }
  if (r->o.collect) {
    lpar_worker_failure(L, NULL);
    lua_rawseti(L, S_ERRORS, i);
    lua_pushnil(L);
    store(L, r, i);
    return;
  }
  if (!r->failed) {
    char prefix[48];
    snprintf(prefix, sizeof prefix, "item %lld: ", (long long)i);
    lpar_worker_failure(L, prefix);
    lua_rawseti(L, S_ENV, ENV_FAILURE);
    r->failed = 1;
  }
  else
    lua_pop(L, 2);
}

/* The chunk of w is fully reported: learn from its timing. */
static void chunkdone(Run *r, Worker *w) {
  r->tns = lpar_policy_learn(r->tns, w->busy, w->count);
  w->count = 0;
}

static void protoerror(lua_State *L, Run *r, Worker *w, const char *what);
static void dispatch(lua_State *L, Run *r);
static void lose(lua_State *L, Run *r, Worker *w, int force, const char *why);

/* A worker's init function failed: the run fails with its error (and
   traceback), without starting more workers that would fail the same. */
static void initfailed(lua_State *L, Run *r, Worker *w, const char *p,
                       size_t len) {
  size_t pos = 8;
  if (lpar_codec_decode(L, p, len, &pos) != 0 ||
      lpar_codec_decode(L, p, len, &pos) != 0) {
    protoerror(L, r, w, lua_tostring(L, -1));
    return;
  }
  lpar_worker_failure(L, "worker init failed: ");
  if (!r->failed) {
    lua_rawseti(L, S_ENV, ENV_FAILURE);
    r->failed = 1;
  }
  else
    lua_pop(L, 1);
  lose(L, r, w, 1, "failed in init");
}

/* Handle one RESULT or ERROR frame of w: header f, payload p. Returns 0,
   or -1 if the worker broke the protocol (it has been dealt with). */
/* Store the n results decoded aside into the table at 'aside' (its [k +
   1] is item first + k). */
static void storeaside(lua_State *L, Run *r, int aside, lua_Integer first,
                       uint32_t n) {
  uint32_t k;
  for (k = 0; k < n; k++) {
    lua_rawgeti(L, aside, (lua_Integer)k + 1);
    store(L, r, first + k);
  }
}

/* The value of item 'bad' in a frame for [first, first + nrep) of w's
   chunk could not be taken: that item fails (a worker sends the same
   bytes again if it runs again) and the ones after it run again. */
static void badvalue(lua_State *L, Run *r, Worker *w, lua_Integer first,
                     lua_Integer nrep, int complete, lua_Integer bad) {
  if (complete && bad + 1 < first + nrep)
    addredo(L, r, bad + 1, first + nrep - bad - 1);
  else if (!complete)
    w->got = bad - w->first + 1;
  w->blame = bad;
}

static int frame(lua_State *L, Run *r, Worker *w, const Frame *f,
                 const char *p) {
  size_t pos;
  if ((f->type != LPAR_FRESULT && f->type != LPAR_FERROR) ||
      f->len < (f->type == LPAR_FRESULT ? 16u : 8u) ||
      (f->type == LPAR_FRESULT && f->count == 0)) {
    protoerror(L, r, w, "bad frame header");
    return -1;
  }
  lua_Integer first = (lua_Integer)lpar_wire_get64(p);
  int isres = f->type == LPAR_FRESULT;
  lua_Integer nrep = isres ? (lua_Integer)f->count : 1;
  uint32_t k, nvals = isres ? f->count : 2;
  int complete;
  pos = 8;
  if (!isres && first == 0) { /* its init failed */
    initfailed(L, r, w, p, (size_t)f->len);
    return -1;
  }
  if (isres) {
    w->busy += (long long)lpar_wire_get64(p + 8);
    pos = 16;
  }
  if (w->count == 0 || first < w->first + w->got ||
      first - w->first + nrep > w->count) {
    protoerror(L, r, w, "result for an item it was not given");
    return -1;
  }
  complete = first - w->first + nrep == w->count;
  if (!complete) {
    w->got = first - w->first + nrep;
    if (r->tns == 0 && isres) /* a first estimate before the chunk ends */
      r->tns = (double)(w->busy > 0 ? w->busy : 1) / (double)w->got;
  }
  else {
    chunkdone(r, w);
    if (isres) /* keep the worker busy while its results are decoded */
      dispatch(L, r);
  }
  /* results are decoded aside and stored only once the whole frame has
     proved sound: a frame with trailing bytes delivers none of them */
  if (isres)
    lua_createtable(L, nvals < 1024 ? (int)nvals : 1024, 0);
  for (k = 0; k < nvals; k++) {
    if (lpar_codec_decode(L, p, (size_t)f->len, &pos) != 0) {
      lua_Integer bad = isres ? first + (lua_Integer)k : first;
      if (isres) { /* the values before it are sound */
        storeaside(L, r, lua_gettop(L) - 1, first, k);
        lua_remove(L, -2);
      }
      badvalue(L, r, w, first, nrep, complete, bad);
      protoerror(L, r, w, lua_tostring(L, -1));
      return -1;
    }
    if (isres)
      lua_rawseti(L, -2, (lua_Integer)k + 1);
  }
  if (pos != f->len) {
    if (isres) { /* its first item fails; the others run again */
      lua_pop(L, 1);
      badvalue(L, r, w, first, nrep, complete, first);
    }
    else /* the error it reports is not taken */
      w->blame = first;
    protoerror(L, r, w, "trailing bytes in a frame");
    return -1;
  }
  if (isres) {
    storeaside(L, r, lua_gettop(L), first, nvals);
    lua_pop(L, 1);
  }
  else
    itemfailed(L, r, first);
  return 0;
}

/* The RING frame at p says where in w's ring a frame lies: handle that
   one, then hand its space back. */
static int ringframe(lua_State *L, Run *r, Worker *w, const char *p) {
  uint64_t pos = lpar_wire_get64(p), n = lpar_wire_get64(p + 8);
  const char *q = lpar_ring_get(&w->ring, pos, n);
  Frame f;
  if (q == NULL || n < LPAR_HDRSIZE || lpar_wire_getheader(q, &f) != 0 ||
      f.len != n - LPAR_HDRSIZE) {
    protoerror(L, r, w, "bad place in the ring");
    return -1;
  }
  if (frame(L, r, w, &f, q + LPAR_HDRSIZE) != 0)
    return -1;
  lpar_ring_release(&w->ring, pos + n);
  return 0;
}

/* Handle the whole frames in w->in. Returns 0, or -1 if the worker broke
   the protocol (it has been dealt with). */
static int frames(lua_State *L, Run *r, Worker *w) {
  size_t at = 0;
  while (w->in.n - at >= LPAR_HDRSIZE) {
    Frame f;
    const char *p;
    if (lpar_wire_getheader(w->in.p + at, &f) != 0 ||
        (f.type == LPAR_FRING && f.len != 16)) {
      protoerror(L, r, w, "bad frame header");
      return -1;
    }
    if (f.len > w->in.n - at - LPAR_HDRSIZE)
      break; /* not all there yet */
    p = w->in.p + at + LPAR_HDRSIZE;
    if (f.type == LPAR_FRING ? ringframe(L, r, w, p) != 0
                             : frame(L, r, w, &f, p) != 0)
      return -1;
    at += LPAR_HDRSIZE + (size_t)f.len;
  }
  lpar_buf_drop(&w->in, at);
  return 0;
}

/*
** Worker w is gone or must go: reap it (killing it first if 'kill'),
** name the item it was running, and queue the rest of its chunk again.
** 'why' overrides the wait status in the message.
*/
static void lose(lua_State *L, Run *r, Worker *w, int force, const char *why) {
  int status = 0, rc;
  char desc[96];
  pid_t pid = w->proc.pid;
  Slot *slot = &r->slots[w - r->w];
  lua_Integer culprit;
  int suspects = 0;
  if (pid <= 0) /* nobody there: kill(0) would hit the process group */
    return;
  lpar_pool_close(&w->proc);
  rc = lpar_pool_reap(&w->proc, force, &status);
  lpar_pool_closepid(&w->proc);
  w->proc.pid = 0;
  r->live--;
  culprit = w->blame ? 0
                     : lpar_policy_culprit(w->first, w->count, w->got,
                                           (lua_Integer)slot->item, w->timedout,
                                           w->alone);
  if (w->count > 0) {
    lua_Integer from = w->first + w->got, end = w->first + w->count;
    suspects = culprit == 0 && !w->blame && from < end;
    if (lpar_ranges_requeue(&r->redo, from, end, culprit, !w->blame) != 0)
      luaL_error(L, "not enough memory");
    w->count = 0;
  }
  if (w->timedout == LPAR_SLOTHOOK) { /* stopped in its init hook */
    if (!r->failed) {
      lua_pushfstring(L, "worker init timed out after %s s",
                      lpar_pool_secs(r->o.timeout, desc, sizeof desc));
      lua_rawseti(L, S_ENV, ENV_FAILURE);
      r->failed = 1;
    }
    return;
  }
  if (w->blame) /* it broke the protocol reporting this one */
    culprit = w->blame;
  if (why == NULL) {
    if (rc < 0)
      why = "vanished (reaped elsewhere)";
    else
      why = lpar_pool_describe(status, desc, sizeof desc);
  }
  if (!force && slot->item == LPAR_SLOTHOOK) { /* it died in its init */
    if (!r->failed) {
      lua_pushfstring(L, "worker init failed: worker %d %s", (int)pid, why);
      lua_rawseti(L, S_ENV, ENV_FAILURE);
      r->failed = 1;
    }
    return;
  }
  if (culprit) {
    if (w->timedout) {
      char secs[32];
      lua_pushfstring(L, "timed out after %s s",
                      lpar_pool_secs(r->o.timeout, secs, sizeof secs));
    }
    else
      lua_pushfstring(L, "worker %d %s", (int)pid, why);
    lua_pushnil(L);
    itemfailed(L, r, culprit);
  }
  /* a loss that sent items back as suspects is bound to name one of
     them if it happens again: only the others count towards the limit */
  else if (!suspects && ++r->lost > 2 * r->o.nworkers + 2 && !r->failed) {
    lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
    lua_rawseti(L, S_ENV, ENV_FAILURE);
    r->failed = 1;
  }
}

static void protoerror(lua_State *L, Run *r, Worker *w, const char *what) {
  char why[256];
  snprintf(why, sizeof why, "broke the protocol (%s)", what);
  lose(L, r, w, 1, why);
}

/* Read what worker w has sent and handle it. */
static void readworker(lua_State *L, Run *r, Worker *w) {
  long long t0 = lpar_pool_now();
  lua_Integer done0 = r->done;
  for (;;) {
    long k = lpar_wire_tryread(w->proc.resfd, &w->in);
    if (k == -EAGAIN)
      break;
    if (k == -ENOMEM) {
      char what[96];
      protoerror(L, r, w, lpar_wire_toolong(&w->in, what, sizeof what));
      return;
    }
    if (k <= 0) { /* end of file (a partial frame is dropped) or error */
      lose(L, r, w, k < 0, NULL);
      return;
    }
    w->lastread = lpar_pool_now();
    if (frames(L, r, w) != 0 || w->proc.pid == 0)
      return; /* it broke the protocol, or was let go meanwhile */
  }
  r->pns += lpar_pool_now() - t0;
  r->pitems += r->done - done0;
}

/* ---- the loop ---- */

static int anyidle(Run *r) {
  int i;
  for (i = 0; i < r->o.nworkers; i++)
    if (r->w[i].proc.pid != 0 && r->w[i].count == 0)
      return 1;
  return 0;
}

/* Whether every item has been handed out (none left to send again). */
static int drained(Run *r) {
  return r->redo.n == 0 && (r->stream ? r->exhausted : r->next > r->n);
}

/* Let an idle worker go: end of file on its channel makes it leave, and
   it exits while the others finish. It is reaped when the run stops. */
static void retire(lua_State *L, Run *r, Worker *w) {
  if (r->nretired == r->capretired) {
    int cap = r->capretired ? 2 * r->capretired : 8;
    Proc *p = realloc(r->retired, (size_t)cap * sizeof(Proc));
    if (p == NULL)
      luaL_error(L, "not enough memory");
    r->retired = p;
    r->capretired = cap;
  }
  lpar_pool_close(&w->proc);
  r->retired[r->nretired++] = w->proc; /* keeps the pid and pidfd */
  w->proc.pidfd = -1;
  w->proc.pid = 0;
  r->live--;
}

static void dispatch(lua_State *L, Run *r) {
  int i;
  for (i = 0; i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    if (w->proc.pid == 0 || w->count != 0)
      continue;
    if (workleft(r))
      assign(L, r, w); /* the iterator may end here: nothing assigned */
    if (w->count == 0 && drained(r) && !r->failed)
      retire(L, r, w);
  }
}

/*
** A worker that is not running an item and left a frame unfinished for
** the timeout (or LPAR_STALLNS without one) broke the protocol: what it
** sent so far is read first, so only a frame that truly stopped counts.
** Returns when to look again (ns, -1: never; 0: at once, something was
** handled).
*/
static long long stalled(lua_State *L, Run *r, Worker *w, long long now) {
  long long limit =
      r->o.timeout > 0 ? (long long)(r->o.timeout * 1e9) : LPAR_STALLNS;
  char what[96];
  if (w->in.n == 0 || r->slots[w - r->w].item != 0)
    return -1;
  if (now < w->lastread + limit)
    return w->lastread + limit;
  readworker(L, r, w);
  if (w->proc.pid == 0 || w->in.n == 0 || now < w->lastread + limit)
    return 0; /* handled, or it moved on: the next turn sees it */
  snprintf(what, sizeof what, "partial frame, nothing more for %.1f s",
           (double)limit / 1e9);
  protoerror(L, r, w, what);
  return 0;
}

/* Deadline handling: timeouts per item and for the init hook, stalled
   frames, TERM -> KILL escalation. Returns the poll timeout in ms (-1:
   none). */
static int deadlines(lua_State *L, Run *r) {
  long long now = lpar_pool_now(), next = -1;
  int i;
  for (i = 0; i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    long long due = -1, stall;
    if (w->proc.pid == 0)
      continue;
    if (w->killat > 0) {
      if (now >= w->killat) {
        lpar_pool_killproc(&w->proc, SIGKILL);
        w->killat = 0;
      }
      else
        due = w->killat;
    }
    else if (r->o.timeout > 0 &&
             (w->count > 0 || r->slots[i].item == LPAR_SLOTHOOK)) {
      lua_Integer item = r->slots[i].item;
      long long since = r->slots[i].since;
      long long limit = since + (long long)(r->o.timeout * 1e9);
      if (item != 0 && now >= limit) {
        w->timedout = item; /* LPAR_SLOTHOOK: its init */
        lpar_pool_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else
        due = item != 0 ? limit : now + 10000000LL; /* look again soon */
    }
    if (w->killat == 0 && (stall = stalled(L, r, w, now)) >= 0 &&
        (due < 0 || stall < due))
      due = stall;
    if (due >= 0 && (next < 0 || due < next))
      next = due;
  }
  if (next < 0)
    return -1;
  return next <= now ? 0 : (int)((next - now) / 1000000 + 1);
}

/* Wait for events (up to 'ms', -1 forever) and handle them. Returns the
   number of workers that had something. */
static int events(lua_State *L, Run *r, int ms) {
  int i, n = 0, rc, handled = 0;
  struct timespec ts, *tsp = NULL;
  sigset_t mask = r->oldmask;
  for (i = 0; i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    if (w->proc.pid == 0)
      continue;
    r->pfd[n].fd = w->proc.resfd;
    r->pfd[n].events = POLLIN;
    r->pfdw[n++] = i;
    if (w->proc.pidfd >= 0) { /* its end, even if others hold its pipe */
      r->pfd[n].fd = w->proc.pidfd;
      r->pfd[n].events = POLLIN;
      r->pfdw[n++] = i;
    }
    if (w->outpos < w->out.n) {
      r->pfd[n].fd = w->proc.cmdfd;
      r->pfd[n].events = POLLOUT;
      r->pfdw[n++] = i;
    }
  }
  if (ms >= 0) {
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    tsp = &ts;
  }
  sigdelset(&mask, SIGINT);
  if (r->watchterm)
    sigdelset(&mask, SIGTERM);
  if (r->watchhup)
    sigdelset(&mask, SIGHUP);
  rc = ppoll(r->pfd, (nfds_t)n, tsp, &mask);
  if (interrupted) {
    lua_pushstring(L, interrupted == SIGTERM  ? "terminated"
                      : interrupted == SIGHUP ? "hangup"
                                              : "interrupted");
    lua_rawseti(L, S_ENV, ENV_FAILURE);
    r->failed = 1;
    return 0;
  }
  if (rc <= 0) {
    if (rc == -1 && errno != EINTR)
      luaL_error(L, "poll: %s", strerror(errno));
    return 0;
  }
  for (i = 0; i < n; i++) {
    Worker *w = &r->w[r->pfdw[i]];
    if (r->pfd[i].revents == 0 || w->proc.pid == 0)
      continue;
    handled++;
    if (r->pfd[i].fd == w->proc.resfd)
      readworker(L, r, w);
    else if (r->pfd[i].fd == w->proc.pidfd) {
      readworker(L, r, w); /* what it sent before it ended counts */
      if (w->proc.pid != 0)
        lose(L, r, w, 0, NULL);
    }
    else if (sendsome(w) != 0 && w->proc.pid != 0)
      lose(L, r, w, 1, NULL);
  }
  return handled;
}

static int finished(Run *r) {
  if (r->failed)
    return 1;
  if (r->stream)
    return r->exhausted && r->redo.n == 0 && r->done == r->n;
  return r->done == r->n;
}

/* Time per item as the shared slots show it before any results came
   back: from a worker past the first item of its chunk; 0 if none is. */
static double slotestimate(Run *r, long long now) {
  double est = 0;
  int i;
  for (i = 0; i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    if (w->proc.pid != 0 && w->count > 0) {
      double per = lpar_policy_slotrate(now - w->sent, w->first,
                                        (lua_Integer)r->slots[i].item);
      if (per > est)
        est = per;
    }
  }
  return est;
}

/* Whether to start another worker now that all are busy: 0 yes, -1 no,
   else ask again in this many ms (see lpar_policy_spawn). The time per item
   comes from results, or from the shared slots while the first chunks
   run. */
static int spawndelay(Run *r) {
  SchedSpawn s;
  s.now = lpar_pool_now();
  s.tns = r->tns > 0 ? r->tns : slotestimate(r, s.now);
  s.left = r->stream && !r->exhausted
               ? -1
               : (r->stream ? 0 : r->n - r->next + 1) + r->redo.items;
  s.live = r->live;
  s.pns = r->pns;
  s.pitems = r->pitems;
  s.worthns = LPAR_FORKWORTHNS;
  s.wavegap = LPAR_SPAWNWAITNS;
  return lpar_policy_spawn(&s, &r->wave);
}

/* One turn of the loop: hand out work, start a worker if all are busy
   and it is worth it, wait for and handle events. */
static void turn(lua_State *L, Run *r) {
  dispatch(L, r);
  if (r->failed)
    return;
  if (workleft(r) && r->live < r->cap && !anyidle(r)) {
    int wait = -1;
    if (r->live == 0 ||
        (events(L, r, 0) == 0 && !r->failed && (wait = spawndelay(r)) == 0)) {
      spawn(L, r);
      return;
    }
    if (r->failed || anyidle(r))
      return;
    if (wait > 0) {
      int d = deadlines(L, r);
      events(L, r, d >= 0 && d < wait ? d : wait);
      return;
    }
  }
  if (r->live == 0) {
    if (!finished(r))
      spawn(L, r);
    return;
  }
  events(L, r, deadlines(L, r));
}

static void raisefailure(lua_State *L) {
  lua_rawgeti(L, S_ENV, ENV_FAILURE);
  lua_error(L);
}

int lpar_run_finish(lua_State *L) {
  Run *r = stepsetup(L);
  while (!finished(r))
    turn(L, r);
  if (r->failed)
    raisefailure(L);
  lua_pushvalue(L, S_RESULTS);
  lua_pushinteger(L, r->n);
  if (!r->o.collect)
    return 2;
  lua_pushvalue(L, S_ERRORS);
  return 3;
}

/* Push index, value, error of item i and forget them. */
static int emit(lua_State *L, Run *r, lua_Integer i) {
  r->fin[(i - 1) % LPAR_WINDOW] = 0;
  lua_pushinteger(L, i);
  lua_rawgeti(L, S_RESULTS, i);
  lua_rawgeti(L, S_ERRORS, i);
  lua_pushnil(L);
  lua_rawseti(L, S_RESULTS, i);
  lua_pushnil(L);
  lua_rawseti(L, S_ERRORS, i);
  return 3;
}

int lpar_run_next(lua_State *L) {
  Run *r = stepsetup(L);
  if (!r->emitting) {
    r->fin = calloc(LPAR_WINDOW, 1);
    r->queue = calloc(LPAR_WINDOW, sizeof(lua_Integer));
    if (!r->fin || !r->queue)
      luaL_error(L, "not enough memory");
    r->emitting = 1;
  }
  for (;;) {
    if (r->o.unordered) {
      if (r->qhead < r->qtail) {
        lua_Integer i = r->queue[r->qhead++ % LPAR_WINDOW];
        r->emit++;
        return emit(L, r, i);
      }
    }
    else if (r->emit <= r->n && r->fin[(r->emit - 1) % LPAR_WINDOW]) {
      r->emit++;
      return emit(L, r, r->emit - 1);
    }
    if (finished(r))
      break;
    turn(L, r);
  }
  if (r->failed)
    raisefailure(L);
  return 0;
}

void lpar_run_stop(lua_State *L, int idx) {
  Run *r = lua_touserdata(L, idx);
  int i, hard;
  long long grace, deadline;
  /* a worker collecting a copy of a run it inherited leaves it alone:
     the workers and rings are the owner's */
  if (r == NULL || r->stopped || r->owner != getpid())
    return;
  r->stopped = 1;
  hard = r->failed || !finished(r);
  for (i = 0; r->w && i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    if (w->proc.pid == 0)
      continue;
    if (hard)
      lpar_pool_killproc(&w->proc, SIGKILL);
    lpar_pool_close(&w->proc); /* end of file: an idle worker leaves */
  }
  /* they run their close hooks: the timeout, or a grace period, bounds it */
  grace =
      r->o.timeout > 0 ? (long long)(r->o.timeout * 1e9) : LPAR_CLOSEGRACENS;
  deadline = lpar_pool_now() + grace;
  for (i = 0; r->w && i < r->o.nworkers; i++) {
    Worker *w = &r->w[i];
    if (w->proc.pid != 0)
      lpar_worker_finish(&w->proc, deadline, (double)grace / 1e9, r->hasclose,
                         !hard && !r->failed, "worker");
    lpar_buf_free(&w->in);
    lpar_buf_free(&w->out);
    lpar_ring_unmap(&w->ring);
  }
  for (i = 0; i < r->nretired; i++) {
    if (hard && interrupted) /* Ctrl-C: no close hook is waited for */
      lpar_pool_killproc(&r->retired[i], SIGKILL);
    lpar_worker_finish(&r->retired[i], deadline, (double)grace / 1e9,
                       r->hasclose, !(hard && interrupted) && !r->failed,
                       "worker");
  }
  r->nretired = 0;
  r->live = 0;
  if (r->started)
    stopsignals(r);
  lpar_pool_freeslots(r->slots, (size_t)r->o.nworkers);
  r->slots = NULL;
  free(r->w);
  free(r->pfd);
  free(r->pfdw);
  lpar_ranges_free(&r->redo);
  free(r->retired);
  free(r->fin);
  free(r->queue);
  r->w = NULL;
  r->pfd = NULL;
  r->pfdw = NULL;
  r->retired = NULL;
  r->fin = NULL;
  r->queue = NULL;
}

static int run_gc(lua_State *L) {
  lpar_run_stop(L, 1);
  return 0;
}

void lpar_run_open(lua_State *L) {
  if (luaL_newmetatable(L, LPAR_RUNMT)) {
    lua_pushcfunction(L, run_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, run_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
}
