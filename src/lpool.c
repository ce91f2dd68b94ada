/*
** lpool.c: the Lua face of pools: lpar.pool, pool:map and pool:submit,
** and jobs that a host polls from its frame loop without blocking. The
** engine (engine.c) does the work.
*/
#include "lpool.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "engine.h"
#include "hosts.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "opts.h"
#include "wire.h"
#include "worker.h"
#include "xfer.h"

static Engine *checkpool(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LPAR_POOLMT);
}

/* Raise unless the pool at 'idx' can be used now. */
static Engine *usable(lua_State *L, int idx) {
  Engine *e = checkpool(L, idx);
  lpar_engine_check(L, e, 1);
  return e;
}

static int pool_close(lua_State *L) {
  lpar_engine_check(L, checkpool(L, 1), 0);
  lua_settop(L, 1);
  lpar_engine_close(L, 1, "pool closed");
  return 0;
}

static int pool_gc(lua_State *L) {
  lua_settop(L, 1);
  lpar_engine_close(L, 1, "pool closed");
  return 0;
}

/* Number of online CPUs, at least 1. */
static int ncpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > LPAR_MAXWORKERS ? LPAR_MAXWORKERS : (int)n;
}

static const char *const poolopts[] = {
    "n_workers", "init",      "close", "timeout",     "max_memory",  "sigterm",
    "functions", "on_demand", "hosts", "remote_lpar", "agent_setup", NULL};

/*
** Read opts.hosts (at 'opts', a table) into the table pushed: the hosts'
** descriptions (lpar_hosts_parse), in order; returns how many local
** workers ":" entries ask for ('nw' each when they give no count).
*/
static int gethosts(lua_State *L, int opts, lua_Integer nw) {
  const char *remote = "lpar";
  lua_Integer k, n, local = 0, nh = 0;
  if (lua_getfield(L, opts, "remote_lpar") != LUA_TNIL) {
    if (!lua_isstring(L, -1))
      luaL_argerror(L, 1, "remote_lpar must be a command (a string)");
    remote = lua_tostring(L, -1);
  }
  lua_getfield(L, opts, "hosts");
  if (!lua_istable(L, -1))
    luaL_argerror(L, 1, "hosts must be a sequence of host specs (strings)");
  n = (lua_Integer)lua_rawlen(L, -1);
  lua_newtable(L);
  for (k = 1; k <= n; k++) {
    if (lua_rawgeti(L, -2, k) != LUA_TSTRING)
      luaL_argerror(L, 1, "hosts must be a sequence of host specs (strings)");
    lpar_hosts_parse(L, -1, remote);
    if (lua_getfield(L, -1, "here") != LUA_TNIL) {
      lua_Integer m;
      lua_getfield(L, -2, "n");
      m = lua_tointeger(L, -1);
      local += m > 0 ? m : nw;
      lua_pop(L, 4);
      continue;
    }
    lua_pop(L, 1);
    lua_rawseti(L, -3, ++nh);
    lua_pop(L, 1);
  }
  if (n == 0)
    luaL_argerror(L, 1, "hosts is empty");
  lua_replace(L, -3);
  lua_pop(L, 1);
  return (int)(local > LPAR_MAXWORKERS ? LPAR_MAXWORKERS : local);
}

/* Append u32 v to b (little-endian). */
static int add32(Buf *b, uint32_t v) {
  char p[4];
  lpar_wire_put32(p, v);
  return lpar_buf_add(b, p, 4);
}

/* Encode the function at 'idx' for the hosts into b (owned by a
   userdata), or raise naming 'what'. */
static void sendfn(lua_State *L, int idx, Buf *b, const char *what) {
  if (lpar_xfer_encode(L, idx, b) != 0)
    luaL_error(L, "cannot send %s to the hosts: %s", what, lua_tostring(L, -1));
}

/*
** Push the payload of SETUP after the versions (hosts.h) for a pool with
** options o: the functions init, close (at 'init', 'close'; nil: none)
** and those of the table at 'fns' (or nil), encoded; or, with
** opts.agent_setup (the CLI's), that table through the codec. The
** indexes are absolute. It is built in a buffer a userdata owns, since
** the codec may raise (out of memory).
*/
static void pushsetup(lua_State *L, int opts, const EngineOpts *o, int init,
                      int close, int fns) {
  Buf *bp = lpar_codec_newbuf(L);
  int owner = lua_gettop(L);
  char h[8];
  int bad;
  lpar_wire_put64(h, (uint64_t)o->maxmem);
  bad = lpar_buf_add(bp, h, 8) != 0;
  lpar_wire_put64(h, (uint64_t)(o->timeout * 1e9));
  bad = bad || lpar_buf_add(bp, h, 8) != 0;
  lpar_wire_put64(h, 0); /* the agent's own silence limit */
  bad = bad || lpar_buf_add(bp, h, 8) != 0;
  if (lua_getfield(L, opts, "agent_setup") != LUA_TNIL) {
    bad = bad || add32(bp, LPAR_SETUPCLI) != 0;
    if (!bad && lpar_codec_encode(L, -1, bp) != 0)
      luaL_error(L, "cannot send the setup to the hosts: %s",
                 lua_tostring(L, -1));
  }
  else {
    lua_Integer k,
        nf = lua_istable(L, fns) ? (lua_Integer)lua_rawlen(L, fns) : 0;
    bad = bad || add32(bp, LPAR_SETUPPOOL) != 0 ||
          add32(bp, (lua_isnil(L, init) ? 0 : LPAR_SETUPINIT) |
                        (lua_isnil(L, close) ? 0 : LPAR_SETUPCLOSE)) != 0 ||
          add32(bp, (uint32_t)nf) != 0;
    if (!bad && !lua_isnil(L, init))
      sendfn(L, init, bp, "init");
    if (!bad && !lua_isnil(L, close))
      sendfn(L, close, bp, "close");
    for (k = 1; k <= nf && !bad; k++) {
      lua_rawgeti(L, fns, k);
      sendfn(L, lua_gettop(L), bp, "a function of 'functions'");
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (bad)
    luaL_error(L, "not enough memory");
  lua_pushlstring(L, bp->p, bp->n);
  lpar_buf_free(bp);
  lua_remove(L, owner);
}

/*
** lpar.pool([n_workers | opts]) -> pool. opts: n_workers (default: the
** number of CPUs), init and close (run once in each worker, first and
** last), timeout (seconds each of init and close may take), max_memory,
** sigterm, functions (a sequence of functions the workers inherit at
** fork: jobs of those are not sent, so any closure works), on_demand
** (workers start as jobs need them, as lpar.parallel's do). Forks the
** workers and waits until each has run init (unless on_demand); raises
** "worker init failed: ..." if one fails, "worker init timed out after
** ..." if one takes too long.
*/
static int l_pool(lua_State *L) {
  EngineOpts o;
  lua_Integer nw = ncpus();
  memset(&o, 0, sizeof o);
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
      o.timeout = (double)lua_tonumberx(L, -1, &isnum);
      if (!isnum || !(o.timeout > 0) || o.timeout > 1e9)
        luaL_argerror(L, 1, "timeout must be a positive number of seconds");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "max_memory") != LUA_TNIL)
      o.maxmem = lpar_opts_size(L, 1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "sigterm");
    o.sigterm = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "on_demand");
    o.ondemand = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "functions") != LUA_TNIL) {
      lua_Integer k, nf;
      if (!lua_istable(L, -1))
        luaL_argerror(L, 1, "functions must be a sequence of functions");
      nf = (lua_Integer)lua_rawlen(L, -1);
      for (k = 1; k <= nf; k++)
        if (lua_rawgeti(L, -1, k) != LUA_TFUNCTION)
          luaL_argerror(L, 1, "functions must be a sequence of functions");
        else
          lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  else if (!lua_isnoneornil(L, 1)) {
    nw = luaL_checkinteger(L, 1);
    luaL_argcheck(L, nw >= 1, 1, "n_workers must be a positive integer");
  }
  o.n = nw > LPAR_MAXWORKERS ? LPAR_MAXWORKERS : (int)nw;
  o.ignint = 1; /* a pool's workers outlive Ctrl-C; they die with it */
  lua_settop(L, 1);
  if (lua_istable(L, 1) && lua_getfield(L, 1, "hosts") != LUA_TNIL) {
    lua_pop(L, 1);
    o.n = gethosts(L, 1, o.n); /* 2: the hosts */
    o.nhosts = (int)lua_rawlen(L, 2);
    o.n += o.nhosts;
  }
  else {
    lua_settop(L, 1);
    lua_pushnil(L);
  }
  lpar_opts_hook(L, 1, "init");  /* 3 */
  lpar_opts_hook(L, 1, "close"); /* 4 */
  if (lua_istable(L, 1)) /* functions the workers inherit; others are sent */
    lua_getfield(L, 1, "functions");
  else
    lua_pushnil(L);
  if (o.nhosts > 0)
    pushsetup(L, 1, &o, 3, 4, 5); /* 6 */
  else
    lua_pushnil(L);
  lua_insert(L, 3);
  lua_pushnil(L);                      /* items are always sent */
  lpar_engine_new(L, &o, LPAR_POOLMT); /* 4 */
  if (o.nhosts > 0)
    lpar_engine_sethosts(L, 4, 2, 3);
  if (!o.ondemand)
    lpar_engine_start(L, 4);
  return 1;
}

static const char *const jobopts[] = {"chunksize", "on_error", "timeout",
                                      "retries",   "progress", "on_event",
                                      NULL};
static const char *const imapopts[] = {
    "chunksize", "on_error", "timeout",  "retries",     "unordered", "wakefd",
    "batched",   "slice",    "progress", "nonblocking", "on_event",  NULL};

/* Read the job options at 'arg' (nil or a table) into o: those of
   pool:imap if 'imap'. */
static void getjobopts(lua_State *L, int arg, JobOpts *o, int imap) {
  memset(o, 0, sizeof *o);
  o->wakefd = -1;
  if (lua_isnoneornil(L, arg))
    return;
  luaL_checktype(L, arg, LUA_TTABLE);
  lpar_opts_checkkeys(L, arg, imap ? imapopts : jobopts);
  lpar_opts_run(L, arg, &o->chunk, &o->collect, &o->timeout, &o->retries);
  if (!imap)
    return;
  lua_getfield(L, arg, "unordered");
  o->unordered = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, arg, "batched");
  o->batched = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, arg, "nonblocking");
  o->nonblocking = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (lua_getfield(L, arg, "wakefd") != LUA_TNIL) {
    int isnum;
    lua_Integer fd = lua_tointegerx(L, -1, &isnum);
    if (!isnum || fd < 0 || fd > INT32_MAX)
      luaL_argerror(L, arg, "wakefd must be a file descriptor");
    o->wakefd = (int)fd;
  }
  lua_pop(L, 1);
}

/*
** pool:submit(f, items [, opts]) -> job, at once. Stack: pool, f, items,
** opts. f and its upvalues are encoded here: a function that cannot
** travel is refused before anything is sent. An iterator's items are
** drained into a table first.
*/
static int pool_submit(lua_State *L) {
  JobOpts o;
  lua_Integer n;
  lua_settop(L, 4);
  usable(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (lua_type(L, 3) == LUA_TFUNCTION) { /* an iterator: drain it */
    lua_Integer i = 0;
    lua_newtable(L);
    for (;;) {
      lpar_engine_nextitem(L, 3);
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
  getjobopts(L, 4, &o, 0);
  lpar_opts_progress(L, 4); /* 5 */
  o.progress = lua_isnil(L, 5) ? 0 : 5;
  lpar_opts_hook(L, 4, "on_event"); /* 6 */
  o.onevent = lua_isnil(L, 6) ? 0 : 6;
  lpar_engine_submit(L, 1, 2, 3, n, &o);
  return 1;
}

/* Iterator of pool:imap: () -> index, value, error; upvalue: the job. */
static int poolimapnext(lua_State *L) {
  lua_settop(L, 0);
  lua_pushvalue(L, lua_upvalueindex(1));
  return lpar_engine_next(L, 1);
}

/*
** pool:imap(f, items [, opts]) -> iterator, nil, nil, job (for a generic
** for; the job is to-be-closed, so a 'break' cancels it). As lpar.imap:
** results in item order (or as they finish, with opts.unordered), items
** from an iterator pulled as workers need them, a bounded number at a
** time. An iterator may return lpar.pending for "no item yet": with
** opts.wakefd, pulling waits until that fd is readable (or a result is
** taken). With opts.batched each item is a batch of records: the
** iterator is called with the number of records the policy wants next
** and returns the batch and how many it holds (see JobOpts).
*/
static int pool_imap(lua_State *L) {
  JobOpts o;
  lua_Integer n = -1;
  lua_settop(L, 4);
  usable(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (lua_type(L, 3) == LUA_TTABLE)
    n = lpar_opts_itemcount(L, 3);
  else
    luaL_argexpected(L, lua_type(L, 3) == LUA_TFUNCTION, 3,
                     "table or iterator function");
  getjobopts(L, 4, &o, 1);
  luaL_argcheck(L, !o.batched || n < 0, 4,
                "batched needs an iterator function of items");
  o.emitting = 1;
  lpar_opts_progress(L, 4); /* 5 */
  o.progress = lua_isnil(L, 5) ? 0 : 5;
  /* slice(batch, from, to): each record of a batch lives on its own */
  if (lua_istable(L, 4))
    lua_getfield(L, 4, "slice"); /* 6 */
  else
    lua_pushnil(L);
  luaL_argcheck(L, lua_isnil(L, 6) || (o.batched && lua_isfunction(L, 6)), 4,
                "slice must be a function, with batched");
  o.slice = lua_isnil(L, 6) ? 0 : 6;
  lpar_opts_hook(L, 4, "on_event"); /* 7 */
  o.onevent = lua_isnil(L, 7) ? 0 : 7;
  lpar_engine_submit(L, 1, 2, 3, n, &o); /* 8 */
  lua_pushvalue(L, 8);
  lua_pushcclosure(L, poolimapnext, 1);
  lua_pushnil(L);
  lua_pushnil(L);
  lua_pushvalue(L, 8);
  return 4;
}

/* ---- Lua API: jobs ---- */

static Job *checkjob(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LPAR_JOBMT);
}

/* Pump the engine of the job at 1 without waiting (if it still runs). */
static void jobpump(lua_State *L, Job *j) {
  if (!lpar_engine_running(j))
    return;
  lpar_engine_pushengine(L, 1);
  usable(L, -1);
  lpar_engine_pump(L, lua_gettop(L), 0);
  lua_pop(L, 1);
}

/* job:done() -> true once the job is finished (failed or cancelled too);
   never blocks: it handles what the workers have sent so far. */
static int job_done(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  jobpump(L, j);
  lua_pushboolean(L, !lpar_engine_running(j));
  return 1;
}

/* job:progress() -> items done, items in all (never blocks). */
static int job_progress(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  jobpump(L, j);
  lua_pushinteger(L, lpar_engine_jobdone(j));
  lua_pushinteger(L, lpar_engine_jobitems(j));
  return 2;
}

/* job:status() -> "running", "done", "failed" or "cancelled" (no pump). */
static int job_status(lua_State *L) {
  lua_pushstring(L, lpar_engine_statename(checkjob(L, 1)));
  return 1;
}

/* job:wait() -> results, n [, errors]: blocks until the job is finished;
   raises as pool:map would. */
static int job_wait(lua_State *L) {
  checkjob(L, 1);
  lua_settop(L, 1);
  lpar_engine_wait(L, 1);
  return lpar_engine_results(L, 1);
}

/*
** job:halt([when]) -> whether it was running: an imap job hands out
** nothing more and ends once what was handed out is reported. 'when' is
** "soon" (its workers stop between the records of their batches) or
** "now" (they are killed, and what they ran comes back as not run).
** Callable from its on_event.
*/
static int job_halt(lua_State *L) {
  static const char *const whens[] = {"soon", "now", NULL};
  Job *j = checkjob(L, 1);
  int now = luaL_checkoption(L, 2, "soon", whens);
  lua_settop(L, 1);
  luaL_argcheck(L, lpar_engine_emitting(j), 1, "only an imap job halts");
  lua_pushboolean(L, lpar_engine_running(j));
  lpar_engine_halt(L, 1, now);
  return 1;
}

/* job:cancel() -> true if it was running: its items are no longer handed
   out and workers running them are killed and replaced. wait() then
   raises "cancelled". */
static int job_cancel(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_settop(L, 1);
  if (!lpar_engine_running(j)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lpar_engine_cancel(L, 1, "cancelled");
  lua_pushboolean(L, 1);
  return 1;
}

/* __close: cancel a job left running when its variable goes out of scope. */
static int job_close(lua_State *L) {
  if (lpar_engine_maycancel(checkjob(L, 1)))
    job_cancel(L);
  return 0;
}

static int job_tostring(lua_State *L) {
  Job *j = checkjob(L, 1);
  lua_pushfstring(L, "lpar.Job (%s, %I/%I)", lpar_engine_statename(j),
                  (LUAI_UACINT)lpar_engine_jobdone(j),
                  (LUAI_UACINT)lpar_engine_jobitems(j));
  return 1;
}

/* lua_CFunction: (job): wait until it is finished. */
static int waitcall(lua_State *L) {
  lpar_engine_wait(L, 1);
  return 0;
}

/* pool:map(f, items [, opts]) -> results, n [, errors]: submit and wait.
   A job whose wait fails is cancelled. */
static int pool_map(lua_State *L) {
  int jidx, status;
  lua_settop(L, 4);
  pool_submit(L); /* the job on top */
  jidx = lua_gettop(L);
  lua_pushcfunction(L, waitcall);
  lua_pushvalue(L, jidx);
  status = lua_pcall(L, 1, 0, 0);
  if (status != LUA_OK) { /* interrupted, or its progress function failed */
    lpar_engine_cancel(L, jidx, "cancelled");
    lua_error(L);
  }
  return lpar_engine_results(L, jidx);
}

/* pool:pump() -> number of jobs not finished; never blocks. For hosts
   that watch pool:fd(): call it when the fd is readable. */
static int pool_pump(lua_State *L) {
  Engine *e = usable(L, 1);
  lpar_engine_pump(L, 1, 0);
  lua_pushinteger(L, lpar_engine_njobs(e));
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
  lua_pushinteger(L, lpar_engine_fd(usable(L, 1)));
  return 1;
}

/* pool:pids() -> the pids of the workers now running, in place order. */
static int pool_pids(lua_State *L) {
  Engine *e = usable(L, 1);
  int i, k = 0, n = lpar_engine_nplaces(e);
  lua_createtable(L, n, 0);
  for (i = 0; i < n; i++) {
    pid_t pid = lpar_engine_placepid(e, i);
    if (pid != 0) {
      lua_pushinteger(L, pid);
      lua_rawseti(L, -2, ++k);
    }
  }
  return 1;
}

/* pool:size() -> number of workers the pool keeps. */
static int pool_size(lua_State *L) {
  lua_pushinteger(L, lpar_engine_nplaces(checkpool(L, 1)));
  return 1;
}

static int pool_tostring(lua_State *L) {
  Engine *e = checkpool(L, 1);
  if (lpar_engine_closed(e))
    lua_pushliteral(L, "lpar.Pool (closed)");
  else
    lua_pushfstring(L, "lpar.Pool (%d workers)", lpar_engine_nplaces(e));
  return 1;
}

/*
** lua_CFunction: a method of pools or jobs as the user calls it.
** Upvalues: its name and the C function that does the work, which runs
** under lua_pcall. A bad argument it reports ("bad argument #k to '?'",
** k counting self as 1) is raised again as the user sees it: "bad
** argument #k-1 to 'map'", or "calling 'map' on bad self" for self, at
** the caller's line. Other errors pass unchanged.
*/
static int methodcall(lua_State *L) {
  static const char bad[] = "bad argument #";
  int n = lua_gettop(L);
  const char *msg, *end;
  long k;
  lua_pushcfunction(L, lua_tocfunction(L, lua_upvalueindex(2)));
  lua_insert(L, 1);
  if (lua_pcall(L, n, LUA_MULTRET, 0) == LUA_OK)
    return lua_gettop(L);
  msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
  if (strncmp(msg, bad, sizeof bad - 1) != 0)
    return lua_error(L);
  k = strtol(msg + sizeof bad - 1, (char **)&end, 10);
  if (k < 1 || strncmp(end, " to '?' (", 9) != 0)
    return lua_error(L);
  luaL_where(L, 1);
  if (k == 1)
    lua_pushfstring(L, "calling '%s' on bad self (%s",
                    lua_tostring(L, lua_upvalueindex(1)), end + 9);
  else
    lua_pushfstring(L, "bad argument #%d to '%s' (%s", (int)k - 1,
                    lua_tostring(L, lua_upvalueindex(1)), end + 9);
  lua_concat(L, 2);
  return lua_error(L);
}

/* Push a table of methods made with methodcall. */
static void newmethods(lua_State *L, const luaL_Reg *l) {
  lua_newtable(L);
  for (; l->name; l++) {
    lua_pushstring(L, l->name);
    lua_pushcfunction(L, l->func);
    lua_pushcclosure(L, methodcall, 2);
    lua_setfield(L, -2, l->name);
  }
}

static const luaL_Reg poolmethods[] = {
    {"map", pool_map},   {"submit", pool_submit}, {"imap", pool_imap},
    {"pump", pool_pump}, {"fd", pool_fd},         {"pids", pool_pids},
    {"size", pool_size}, {"close", pool_close},   {NULL, NULL}};

static const luaL_Reg jobmethods[] = {{"done", job_done},
                                      {"progress", job_progress},
                                      {"wait", job_wait},
                                      {"cancel", job_cancel},
                                      {"status", job_status},
                                      {"halt", job_halt},
                                      {NULL, NULL}};

int lpar_inworker(lua_State *L) {
  return lpar_worker_inside(L);
}

int lpar_overdue(lua_State *L) {
  return lpar_worker_overdue(L);
}

void lpar_lpool_open(lua_State *L) {
  lpar_engine_open(L);
  if (luaL_newmetatable(L, LPAR_POOLMT)) {
    newmethods(L, poolmethods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, pool_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, pool_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, pool_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_getmetatable(L, LPAR_JOBMT);
  if (lua_getfield(L, -1, "__index") == LUA_TNIL) {
    newmethods(L, jobmethods);
    lua_setfield(L, -3, "__index");
    lua_pushcfunction(L, job_close);
    lua_setfield(L, -3, "__close");
    lua_pushcfunction(L, job_tostring);
    lua_setfield(L, -3, "__tostring");
  }
  lua_pop(L, 2);
  lua_pushcfunction(L, l_pool);
  lua_setfield(L, -2, "pool");
  lpar_engine_pushpending(L);
  lua_setfield(L, -2, "pending");
}
