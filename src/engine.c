/*
** engine.c: the public face of the engine (engine.h): making, pumping,
** waiting with a wait's signals, results and progress, closing.
*/
#include "engine.h"

#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engstate.h"
#include "hosts.h"
#include "kind.h"
#include "lcompat.h"
#include "worker.h"
#include "xfer.h"

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
** Every fd the parent watches is a watcher of the engine's loop (loop.h),
** whose callbacks below read, write and notice ends; the loop's timer
** wakes it for deadlines, and pool:fd() hands its epoll fd to a host's
** own loop. All work is done by pump(), which never blocks unless asked
** to. The work itself lives in files that each do one job: places
** (place.c: local workers, their deadlines and losses), hosts (host.c),
** jobs and their items (job.c), handing out chunks and starting workers
** (deal.c), and what workers send (frame.c); engstate.h is what they
** share.
*/

/* the signals a wait takes: SIGINT; SIGTERM and SIGHUP with 'sigterm' */
static const int stopsigs[] = {SIGINT, SIGTERM, SIGHUP};
#define NSTOPSIGS(e) ((e)->o.sigterm ? 3 : 1)

/* ---- the pump ---- */

/* A worker's results fd is readable. */
static void onresults(Loop *l, Watcher *rw, uint32_t events, void *arg) {
  EWorker *w = LPAR_OWNER(rw, EWorker, resw);
  (void)l, (void)events;
  if (w->state != W_EMPTY)
    lpar_frame_read(arg, w);
}

/* A worker's pidfd: it ended, maybe with its pipe held. */
static void onend(Loop *l, Watcher *pw, uint32_t events, void *arg) {
  EWorker *w = LPAR_OWNER(pw, EWorker, pidw);
  pid_t pid = w->proc.pid;
  (void)l, (void)events;
  if (w->state == W_EMPTY)
    return;
  lpar_frame_read(arg, w); /* what it sent before it ended counts */
  if (w->state != W_EMPTY && w->proc.pid == pid)
    lpar_place_lose(arg, w, 0, NULL, 0);
}

/* A worker's command fd takes more bytes. */
static void oncommand(Loop *l, Watcher *cw, uint32_t events, void *arg) {
  Ctx *c = arg;
  EWorker *w = LPAR_OWNER(cw, EWorker, cmdw);
  (void)l, (void)events;
  if (w->state != W_EMPTY && lpar_place_sendsome(c->e, w) != 0)
    lpar_place_lose(c, w, 0, NULL, 0);
}

/* A stream's input may have an item now. */
static void onwake(Loop *l, Watcher *ww, uint32_t events, void *arg) {
  Job *j = LPAR_OWNER(ww, Job, wakew);
  (void)l, (void)events, (void)arg;
  if (j->pending) {
    j->pending = 0;
    lpar_job_unwatchwake(j->e, j);
  }
}

/* Wait up to 'ms' for events and handle them; returns how many came. A
   job halted now by an on_event they called has its workers stopped
   here, once no frame is being read. */
static int events(Ctx *c, int ms) {
  int n = lpar_loop_run(&c->e->loop, ms, c);
  if (n < 0)
    luaL_error(c->L, "epoll_wait: %s", strerror(-n));
  if (c->e->haltnow)
    lpar_job_stopnow(c);
  return n;
}

/* Before anything asks an iterator that may block (see mayblock): read
   what the workers sent, without waiting, so that results that are ready
   go back first. */
static void pollfirst(Ctx *c) {
  Job *j;
  for (j = c->e->jobs; j; j = j->nextjob)
    if (j->state == J_RUNNING && lpar_job_mayblock(j) &&
        !lpar_job_emittable(j)) {
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
  lpar_place_reapdying(e, 0);
  pollfirst(c);
  if (e->haltnow) /* halted now from a start event, in the last dispatch */
    lpar_job_stopnow(c);
  lpar_deal_refill(c);
  if (lpar_deal_broken(c))
    return; /* no worker is left to wait for */
  lpar_deal_dispatch(c);
  if (lpar_place_deadlines(c)) /* armed for workers just started, too */
    ms = 0;
  if (lpar_deal_canspawn(
          c)) { /* all busy: another worker, unless results are in */
    if (events(c, 0) > 0) {
      lpar_place_deadlines(c);
      lpar_deal_refill(c);
      lpar_deal_dispatch(c);
      return;
    }
    d = lpar_deal_spawnwait(c);
    if (d == 0) {
      const char *call = "fork";
      if (lpar_deal_spawnone(c, &call) < 0)
        e->cap = e->live; /* go on with the workers there are */
      lpar_deal_dispatch(c);
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
  lpar_place_deadlines(c);
  lpar_deal_refill(c);
  lpar_deal_dispatch(c);
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
  lpar_place_holdchld(c->e);
  lua_pushcfunction(L, pumpcall);
  lua_pushlightuserdata(L, c);
  lua_pushinteger(L, ms);
  lua_pushvalue(L, c->uv);
  status = lua_pcall(L, 3, 0, 0);
  lpar_place_releasechld(c->e);
  c->e->inpump = 0;
  if (status != LUA_OK)
    lua_error(L);
}

/* ---- the API ---- */

/* Why e cannot be used now (see lpar_engine_check), NULL if it can. */
static const char *unusable(const Engine *e, int needopen) {
  if (e->owner != getpid())
    return "pool belongs to another process";
  if (needopen && e->closed)
    return "pool is closed";
  if (e->inpump)
    return "pool is busy (called from inside its own pump)";
  return NULL;
}

void lpar_engine_check(lua_State *L, const Engine *e, int needopen) {
  const char *why = unusable(e, needopen);
  if (why != NULL)
    luaL_error(L, "%s", why);
}

/* Set up a Ctx for the engine at 'idx' (pushes its uservalue). Raises as
   lpar_engine_check does. */
static void ctxof(lua_State *L, int idx, Ctx *c) {
  c->L = L;
  c->e = lua_touserdata(L, idx);
  lpar_engine_check(L, c->e, 1);
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
  int i, rc, top = lua_gettop(L);
  const char *call;
  e = lua_newuserdatauv(L, sizeof(Engine), 1);
  memset(e, 0, sizeof *e);
  e->loop.epfd = e->loop.tfd = -1;
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
  e->w = calloc((size_t)o->n, sizeof(EWorker));
  if (e->w == NULL)
    luaL_error(L, "not enough memory"); /* __gc frees what was made */
  for (i = 0; i < o->n; i++) {
    EWorker *w = &e->w[i];
    w->proc.cmdfd = w->proc.resfd = w->proc.pidfd = -1;
    lpar_watcher_init(&w->resw, onresults);
    lpar_watcher_init(&w->pidw, onend);
    lpar_watcher_init(&w->cmdw, oncommand);
  }
  e->slots = lpar_proc_slots((size_t)o->n);
  if (e->slots == NULL)
    luaL_error(L, "cannot map shared memory: %s", strerror(errno));
  e->closed = 0;
  /* room for each worker's three fds, a few jobs' and the agent's */
  rc = lpar_loop_init(&e->loop, 3 * o->n + 8, &call);
  if (rc == -ENOMEM)
    luaL_error(L, "not enough memory");
  if (rc != 0)
    luaL_error(L, "cannot %s: %s: %s",
               o->ondemand ? "start a worker" : "make a pool", call,
               strerror(-rc));
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
  lpar_place_holdchld(e);
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
      break; /* the reason stays on the stack */
    lua_pop(L, 1);
    for (i = 0; i < e->o.n; i++)
      starting += e->w[i].state == W_STARTING;
    if (starting == 0)
      break;
  }
  e->creating = 0;
  lpar_place_releasechld(e);
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
  lpar_watcher_init(&j->wakew, onwake);
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
      j->file = lpar_job_fileiter(L, iidx, &j->o.wakefd);
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
  lpar_engine_nomem(L, lpar_buf_reserve(&j->call, LPAR_HDRSIZE + 8));
  j->call.n = LPAR_HDRSIZE;
  if (o->fnk > 0) {
    lpar_wire_put64(j->call.p + LPAR_HDRSIZE, (uint64_t)o->fnk);
    j->call.n += 8;
  }
  else if (lpar_xfer_encode(L, fidx, &j->call) != 0) {
    lpar_job_free(j);
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
    lpar_job_free(j);
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
  lpar_engine_nomem(L, bad);
  lua_pop(L, 1);
  for (i = 0; i < e->o.nhosts; i++)
    e->w[lpar_host_nlocal(e) + i].host = i + 1;
}

void lpar_engine_pump(lua_State *L, int idx, int ms) {
  Ctx c;
  ctxof(L, idx, &c);
  safepump(&c, ms);
  lua_pop(L, 1);
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
    int code = lpar_kind_code(L, -1);
    if (j->state == J_RUNNING)
      lpar_job_end(c, j, J_FAILED, NULL, code);
    else { /* over: it fails all the same */
      lua_getiuservalue(L, jidx, 1);
      lua_insert(L, -2);
      lua_rawseti(L, -2, JU_FAILURE);
      lua_pop(L, 1);
      j->state = J_FAILED;
      j->failcode = code;
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
    if (j->state != J_RUNNING || (j->fin && lpar_job_emittable(j)))
      break;
    pump(&own, ms);
    int sig = lpar_loop_caught();
    if (sig && j->state == J_RUNNING) {
      own.e->interrupted = sig;
      lua_pushstring(L, sig == SIGTERM  ? "terminated"
                        : sig == SIGHUP ? "hangup"
                                        : "interrupted");
      lpar_job_end(&own, j, J_CANCELLED, NULL,
                   LPAR_KINDCODE(LPAR_KINTERRUPTED, sig));
    }
  }
  return 0;
}

/* Pump until job j (at 'jidx') is finished or has a result to take, with
   SIGINT ending the wait, and SIGTERM and SIGHUP too when the engine
   takes them. A signal the caller ignores stays ignored. */
static void waitjob(lua_State *L, int jidx, Job *j) {
  Ctx c;
  Engine *e;
  int status;
  if ((j->state != J_RUNNING || (j->fin && lpar_job_emittable(j))) &&
      (j->o.progress == 0 || j->e->closed ||
       (j->done == j->toldone && j->failed == j->toldfail)))
    return;
  jobctx(L, jidx, &c);
  e = c.e;
  lpar_loop_takesignals(&e->loop, stopsigs, NSTOPSIGS(e));
  e->waited = j;
  e->inpump = 1;
  lpar_place_holdchld(e);
  lua_pushcfunction(L, waitloop);
  lua_pushlightuserdata(L, &c);
  lua_pushvalue(L, jidx);
  lua_pushvalue(L, c.uv);
  status = lua_pcall(L, 3, 0, 0);
  lpar_place_reapdying(e,
                       1); /* workers killed for a failure: no zombie is left */
  lpar_place_releasechld(e);
  e->inpump = 0;
  e->waited = NULL;
  lpar_loop_givesignals(&e->loop);
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
  if (lua_rawgeti(L, -3, i) != LUA_TNIL) /* its kind */
    code = lpar_job_kind(L, uv, i, 1);
  lua_pushnil(L);
  lua_rawseti(L, -6, i);
  lua_pushnil(L);
  lua_rawseti(L, -5, i);
  if (j->where == NULL || j->where[(i - 1) % LPAR_WINDOW] == 0)
    lua_pushnil(L);
  else {
    lua_rawgeti(L, uv, JU_ENGINE); /* the host's spec */
    lua_getiuservalue(L, -1, 1);
    lpar_host_pushspec(L, lua_gettop(L), j->where[(i - 1) % LPAR_WINDOW]);
    lua_replace(L, -3);
    lua_pop(L, 1);
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
  if (lpar_job_emittable(j)) {
    lua_Integer i =
        j->o.unordered ? j->queue[j->qhead++ % LPAR_WINDOW] : j->emit;
    j->emit++;
    /* a stream that said "not yet" may have held back for room: it is
       asked again */
    if (j->pending) {
      j->pending = 0;
      lpar_job_unwatchwake(j->e, j);
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
      lua_rawgeti(L, top + 2, i) != LUA_TNIL)
    code = lpar_job_kind(L, top + 1, i, 0);
  lua_settop(L, top);
  return code;
}

int lpar_engine_failkind(lua_State *L, int jidx) {
  Job *j = lua_touserdata(L, jidx);
  return j->state == J_FAILED || j->state == J_CANCELLED ? j->failcode : 0;
}

void lpar_engine_halt(lua_State *L, int jidx, int now) {
  Job *j;
  Engine *e;
  int i;
  jidx = lua_absindex(L, jidx);
  j = lua_touserdata(L, jidx);
  e = j->e;
  if (j->state != J_RUNNING || (j->halting && (j->haltnow || !now)))
    return;
  j->halting = 1;
  if (now) { /* from the pump (on_event), in its next step */
    j->haltnow = e->haltnow = 1;
    e->vacated = 1;
  }
  else
    for (i = 0; i < e->o.n; i++) {
      EWorker *w = &e->w[i];
      if (w->job == j && w->nq > 0 && !w->host)
        e->slots[i].cut =
            lpar_place_lastitem(w); /* between records, it stops */
    }
  if (!e->inpump) { /* nothing in flight: it is over now */
    Ctx c;
    jobctx(L, jidx, &c);
    lpar_place_holdchld(e);
    if (e->haltnow)
      lpar_job_stopnow(&c);
    lpar_place_reapdying(e, 1);
    lpar_place_releasechld(e);
    lpar_job_settle(&c, j);
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
  lpar_place_holdchld(c.e);
  lpar_job_end(&c, j, J_CANCELLED, NULL, LPAR_KCANCELLED);
  lpar_place_reapdying(c.e, 1); /* killed: no zombie is left for a later pump */
  lpar_place_releasechld(c.e);
  lua_pop(L, 3);
}

void lpar_engine_close(lua_State *L, int idx, const char *why) {
  Engine *e = lua_touserdata(L, idx);
  Ctx c;
  int i, hasclose, isbroken, hard = 0, report;
  long long grace, deadline;
  double secs;
  const char *who;
  SignalHold hold;
  if (e == NULL || e->closed || e->owner != getpid())
    return;
  idx = lua_absindex(L, idx);
  lpar_place_holdchld(e);
  c.L = L;
  c.e = e;
  lua_getiuservalue(L, idx, 1);
  c.uv = lua_gettop(L);
  while (e->jobs) {
    hard = 1;
    lua_pushstring(L, why);
    lpar_job_end(&c, e->jobs, J_CANCELLED, NULL, LPAR_KCANCELLED);
  }
  e->closed = 1;
  isbroken = lpar_deal_broken(&c); /* workers still in init are of no use */
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
    lpar_place_close(e, w); /* end of file: an idle worker leaves */
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
  /* one of them ends the wait at once (the workers are killed) */
  lpar_loop_holdsignals(&hold, stopsigs, NSTOPSIGS(e));
  for (i = 0; e->w && i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    /* os.exit(7) in close, or a crash, is reported; not the busy ones
       killed above, whose places are empty by now */
    if (w->state != W_EMPTY)
      lpar_worker_finish(&w->proc, deadline, secs, hasclose, report,
                         w->host ? "host command" : who,
                         lpar_loop_caughtflag());
    w->state = W_EMPTY;
    lpar_buf_free(&w->in);
    lpar_buf_free(&w->out);
    lpar_ring_unmap(&w->ring);
  }
  for (i = 0; i < e->nretired; i++) {
    if (e->interrupted) /* Ctrl-C: no close hook is waited for */
      lpar_proc_killproc(&e->retired[i], SIGKILL);
    lpar_worker_finish(&e->retired[i], deadline, secs, hasclose, report, who,
                       lpar_loop_caughtflag());
  }
  e->nretired = 0;
  e->live = 0;
  lpar_loop_releasesignals(&hold);

  lpar_place_reapdying(e, 1);
  lpar_place_releasechld(e);
  lua_pop(L, 1);
  lpar_loop_free(&e->loop);
  lpar_proc_freeslots(e->slots, (size_t)e->o.n);
  e->slots = NULL;
  free(e->w);
  free(e->dying);
  free(e->retired);
  e->w = NULL;
  e->dying = NULL;
  e->retired = NULL;
  e->ndying = e->capdying = e->capretired = 0;
}

Loop *lpar_engine_loop(lua_State *L, int idx) {
  return &((Engine *)lua_touserdata(L, idx))->loop;
}

int lpar_engine_running(const Job *j) {
  return j->state == J_RUNNING;
}

const char *lpar_engine_statename(const Job *j) {
  static const char *const names[] = {"running", "done", "failed", "cancelled"};
  return names[j->state];
}

lua_Integer lpar_engine_jobdone(const Job *j) {
  return j->done;
}

lua_Integer lpar_engine_jobitems(const Job *j) {
  return j->n;
}

int lpar_engine_emitting(const Job *j) {
  return j->o.emitting;
}

double lpar_engine_nsperitem(const Job *j) {
  return j->tns;
}

int lpar_engine_maycancel(const Job *j) {
  return j->state == J_RUNNING && j->e && unusable(j->e, 1) == NULL;
}

int lpar_engine_closed(const Engine *e) {
  return e->closed;
}

int lpar_engine_njobs(const Engine *e) {
  const Job *j;
  int n = 0;
  for (j = e->jobs; j; j = j->nextjob)
    n++;
  return n;
}

int lpar_engine_nplaces(const Engine *e) {
  return e->o.n;
}

pid_t lpar_engine_placepid(const Engine *e, int i) {
  return e->w[i].state == W_EMPTY ? 0 : e->w[i].proc.pid;
}

int lpar_engine_fd(const Engine *e) {
  return e->loop.epfd;
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
  lpar_job_free(j);
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
