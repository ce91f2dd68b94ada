/*
** lmodule.c: luaopen_lpar and the Lua-facing functions: parallel, imap,
** encode, decode.
*/
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "engine.h"
#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "lpool.h"
#include "opts.h"
#include "worker.h"

const char *lpar_version(void) {
  return LPAR_VERSION;
}

static void checkcallable(lua_State *L, int arg) {
  if (lua_type(L, arg) != LUA_TFUNCTION) {
    if (luaL_getmetafield(L, arg, "__call") == LUA_TNIL)
      luaL_typeerror(L, arg, "function");
    lua_pop(L, 1); /* pop __call */
  }
}

/* What a call of parallel or imap is asked for. */
typedef struct RunOpts {
  int nworkers;      /* most workers to start */
  lua_Integer chunk; /* fixed chunk size, 0 for adaptive */
  int collect;       /* on_error = "collect" */
  int unordered;     /* emit in completion order (lpar.imap) */
  double timeout;    /* seconds per item (and init, close), 0 for none */
  int sigterm;       /* SIGTERM ends the run like SIGINT (the CLI) */
  int retries;       /* times a failed item is run again */
  size_t maxmem;     /* Lua heap limit per worker in bytes, 0 for none */
} RunOpts;

static const char *const optnames[] = {
    "n_workers", "chunksize", "on_error", "timeout", "unordered",
    "init",      "close",     "sigterm",  "retries", "max_memory",
    "progress",  "on_event",  NULL};

/* Read the options at 'arg': nil, a worker count, or a table. */
static void getopts(lua_State *L, int arg, RunOpts *o) {
  lua_Integer nw = LPAR_DEFWORKERS;
  memset(o, 0, sizeof *o);
  switch (lua_type(L, arg)) {
  case LUA_TNONE:
  case LUA_TNIL:
    break;
  case LUA_TNUMBER:
    lua_pushvalue(L, arg);
    nw = lpar_opts_count(L, arg, "n_workers");
    break;
  case LUA_TTABLE:
    lpar_opts_checkkeys(L, arg, optnames);
    if (lua_getfield(L, arg, "n_workers") != LUA_TNIL)
      nw = lpar_opts_count(L, arg, "n_workers");
    else
      lua_pop(L, 1);
    lpar_opts_run(L, arg, &o->chunk, &o->collect, &o->timeout, &o->retries);
    lua_getfield(L, arg, "unordered");
    o->unordered = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, arg, "sigterm"); /* SIGTERM ends the run like SIGINT */
    o->sigterm = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, arg, "max_memory") != LUA_TNIL)
      o->maxmem = lpar_opts_size(L, arg);
    lua_pop(L, 1);
    break;
  default:
    luaL_typeerror(L, arg, "number or table");
  }
  o->nworkers = nw > LPAR_MAXWORKERS ? LPAR_MAXWORKERS : (int)nw;
}

/* lua_CFunction: f(items[i]) for (f, items, i), f(v) for (f, v): an
   error of the items table's __index is item i's, as in a worker. */
static int callitem(lua_State *L) {
  if (lua_gettop(L) == 3) {
    lua_geti(L, 2, lua_tointeger(L, 3));
    lua_replace(L, 2);
    lua_settop(L, 2);
  }
  lua_call(L, 1, 1);
  return 1;
}

/*
** Run f over the items in this process (n_workers = 0, or inside a
** worker). Values are not copied. Stack: f at 1, items at 2.
*/
static int serial(lua_State *L, lua_Integer n, const RunOpts *o) {
  lua_Integer i;
  int stream = n < 0;
  if (!lua_isnil(L, 3)) {
    lua_pushvalue(L, 3);
    lua_call(L, 0, 0);
  }
  lua_newtable(L);                 /* results */
  lua_newtable(L);                 /* errors */
  lpar_worker_pushtraceback(L, 1); /* callitem's level is not shown */
  for (i = 1; stream || i <= n; i++) {
    if (stream) {
      lpar_engine_nextitem(L, 2);
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        n = i - 1;
        break;
      }
    }
    else {
      lua_pushvalue(L, 2);
      lua_pushinteger(L, i);
    }
    /* callitem(f, item) or callitem(f, items, i) */
    lua_pushcfunction(L, callitem);
    lua_insert(L, stream ? -2 : -3);
    lua_pushvalue(L, 1);
    lua_insert(L, stream ? -2 : -3);
    if (lua_pcall(L, stream ? 2 : 3, 1, stream ? -4 : -5) == LUA_OK) {
      lua_seti(L, -4, i);
      continue;
    }
    if (o->collect) {
      lua_seti(L, -3, i);
      continue;
    }
    if (lua_type(L, -1) == LUA_TSTRING) { /* every byte of it, NULs too */
      lua_pushfstring(L, "item %I: ", (LUAI_UACINT)i);
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    lua_error(L);
  }
  lua_pop(L, 1); /* message handler */
  if (!lua_isnil(L, 4)) {
    lua_pushvalue(L, 4);
    lua_call(L, 0, 0);
  }
  if (!o->collect)
    lua_pop(L, 1); /* errors */
  lua_pushinteger(L, n);
  if (o->collect)
    lua_insert(L, -2); /* results, n, errors */
  return o->collect ? 3 : 2;
}

/* Check f, items and options; leaves f, items, init, close, progress,
   on_event at 1..6 and returns the item count (-1 for an iterator). */
static lua_Integer checkargs(lua_State *L, RunOpts *o) {
  lua_Integer n = -1;
  checkcallable(L, 1);
  if (lua_type(L, 2) == LUA_TTABLE)
    n = lpar_opts_itemcount(L, 2);
  else if (lua_type(L, 2) != LUA_TFUNCTION)
    luaL_typeerror(L, 2, "table or iterator function");
  getopts(L, 3, o);
  lua_settop(L, 3);
  lpar_opts_hook(L, 3, "init");
  lpar_opts_hook(L, 3, "close");
  lpar_opts_progress(L, 3);
  lpar_opts_hook(L, 3, "on_event");
  lua_remove(L, 3);
  if (n >= 0 && o->nworkers > n)
    o->nworkers = (int)n;
  return n;
}

/*
** Replace init, close, progress and on_event at 3..6 with the engine of a
** call over
** f (at 1) and items (at 2; n < 0: an iterator), then push its one job.
** The workers inherit f, and a table of items, at fork.
*/
static void newrun(lua_State *L, lua_Integer n, const RunOpts *o,
                   int emitting) {
  EngineOpts eo;
  JobOpts jo;
  struct sigaction sa;
  memset(&eo, 0, sizeof eo);
  memset(&jo, 0, sizeof jo);
  eo.n = o->nworkers;
  eo.ondemand = 1;
  eo.retire = 1;
  eo.ignint = sigaction(SIGINT, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN;
  eo.sigterm = o->sigterm;
  eo.timeout = o->timeout;
  eo.maxmem = o->maxmem;
  jo.chunk = o->chunk;
  jo.collect = o->collect;
  jo.retries = o->retries;
  jo.timeout = o->timeout;
  jo.emitting = emitting;
  jo.unordered = o->unordered;
  jo.fnk = 1;
  jo.inherit = n >= 0;
  jo.wakefd = -1;
  lua_settop(L, 6);
  lua_rotate(L, 3, 2); /* progress, on_event at 3, 4; init, close at 5, 6 */
  lua_createtable(L, 1, 0); /* 7: the functions the workers inherit */
  lua_pushvalue(L, 1);
  lua_rawseti(L, 7, 1);
  if (n >= 0)
    lua_pushvalue(L, 2);
  else
    lua_pushnil(L);
  lpar_engine_new(L, &eo, LPAR_ENGINEMT); /* 5 */
  jo.progress = lua_isnil(L, 3) ? 0 : 3;
  jo.onevent = lua_isnil(L, 4) ? 0 : 4;
  lpar_engine_submit(L, 5, 1, 2, n, &jo); /* 6 */
  lua_remove(L, 3);
  lua_remove(L, 3); /* engine at 3, job at 4 */
}

/* lua_CFunction: (job) -> what it returns once finished. */
static int finish(lua_State *L) {
  lpar_engine_wait(L, 1);
  return lpar_engine_results(L, 1);
}

/*
** parallel(f, items [, n_workers | opts]) -> results, n [, errors]
** Forks workers that inherit the whole state, hands out index ranges and
** gathers the results in item order.
*/
static int l_parallel(lua_State *L) {
  RunOpts o;
  lua_Integer n = checkargs(L, &o);
  int status;
  if (o.unordered)
    luaL_argerror(L, 3, "option 'unordered' is for lpar.imap");
  if (n == 0) {
    lua_newtable(L);
    lua_pushinteger(L, 0);
    if (o.collect)
      lua_newtable(L);
    return o.collect ? 3 : 2;
  }
  if (o.nworkers == 0 || lpar_worker_inside(L))
    return serial(L, n, &o);
  newrun(L, n, &o, 0); /* engine at 3, job at 4 */
  lua_pushcfunction(L, finish);
  lua_pushvalue(L, 4);
  status = lua_pcall(L, 1, LUA_MULTRET, 0);
  lpar_engine_close(L, 3, "cancelled");
  if (status != LUA_OK)
    lua_error(L);
  return lua_gettop(L) - 4;
}

/* lua_CFunction: (job) -> index, value, error, host, kind, detail, or
   nothing. */
static int nextcall(lua_State *L) {
  return lpar_engine_next(L, 1);
}

/* Iterator of lpar.imap: (engine) -> index, value, error, host, kind,
   detail (see lpar_engine_next); upvalue: the
   job. The engine closes when the items run out or on an error. */
static int imapnext(lua_State *L) {
  int status;
  lua_settop(L, 1);
  lua_pushcfunction(L, nextcall);
  lua_pushvalue(L, lua_upvalueindex(1));
  status = lua_pcall(L, 1, LUA_MULTRET, 0);
  if (status != LUA_OK) {
    lpar_engine_close(L, 1, "cancelled");
    lua_error(L);
  }
  if (lua_gettop(L) == 1) /* all done */
    lpar_engine_close(L, 1, "cancelled");
  return lua_gettop(L) - 1;
}

/* The serial imap is done: run its close hook (upvalue 5) once. */
static int imapdone(lua_State *L) {
  if (!lua_isnil(L, lua_upvalueindex(5))) {
    lua_pushvalue(L, lua_upvalueindex(5));
    lua_pushnil(L);
    lua_replace(L, lua_upvalueindex(5));
    lua_call(L, 0, 0);
  }
  return 0;
}

/* Serial imap: (state) -> index, value, error, host (nil), kind, detail,
   for n_workers = 0.
   Upvalues: f, items, collect, n, close. */
static int imapserial(lua_State *L) {
  lua_Integer i = luaL_optinteger(L, 2, 0) + 1;
  int collect = lua_toboolean(L, lua_upvalueindex(3));
  lua_settop(L, 0);
  if (lua_type(L, lua_upvalueindex(2)) == LUA_TTABLE) {
    if (i > (lua_Integer)lua_tointeger(L, lua_upvalueindex(4)))
      return imapdone(L);
    lua_geti(L, lua_upvalueindex(2), i);
  }
  else {
    lpar_engine_nextitem(L, lua_upvalueindex(2));
    if (lua_isnil(L, -1))
      return imapdone(L);
  }
  lpar_worker_pushtraceback(L, 0);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  if (lua_pcall(L, 1, 1, 2) == LUA_OK) {
    lua_pushinteger(L, i);
    lua_insert(L, -2);
    return 2;
  }
  if (!collect) {
    if (lua_type(L, -1) == LUA_TSTRING)
      lua_pushfstring(L, "item %I: %s", (LUAI_UACINT)i, lua_tostring(L, -1));
    lua_error(L);
  }
  lua_pushinteger(L, i);
  lua_pushnil(L);
  lua_pushvalue(L, -3);
  lua_pushnil(L); /* no host */
  lpar_kind_push(L, LPAR_KERROR);
  return 6;
}

/*
** imap(f, items [, n_workers | opts]) -> iterator for a generic for:
**   for i, v, err in lpar.imap(f, io.lines(path)) do ... end
** Items may come from an iterator; results come in item order (or in
** completion order with opts.unordered), a bounded number at a time.
*/
static int l_imap(lua_State *L) {
  RunOpts o;
  lua_Integer n = checkargs(L, &o);
  if (n == 0 || o.nworkers == 0 || lpar_worker_inside(L)) {
    if (!lua_isnil(L, 3) && n != 0) { /* init runs once, here */
      lua_pushvalue(L, 3);
      lua_call(L, 0, 0);
    }
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_pushboolean(L, o.collect);
    lua_pushinteger(L, n);
    lua_pushvalue(L, 4); /* close, run when the items run out */
    lua_pushcclosure(L, imapserial, 5);
    return 1;
  }
  newrun(L, n, &o, 1); /* engine at 3, job at 4 */
  lua_pushcclosure(L, imapnext, 1);
  lua_insert(L, 3);
  lua_pushnil(L);
  lua_pushvalue(L, 4); /* to-be-closed: stops workers on break */
  return 4;
}

/* encode(v) -> string: the codec's bytes for v (tests, tools). */
static int l_encode(lua_State *L) {
  Buf *b;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  b = lpar_codec_newbuf(L); /* 2: freed by its __gc */
  if (lpar_codec_encode(L, 1, b) != 0)
    return luaL_error(L, "cannot serialize: %s", lua_tostring(L, -1));
  lua_pushlstring(L, b->p, b->n);
  return 1;
}

/* decode(s) -> v: one value; raises on bad or trailing bytes. */
static int l_decode(lua_State *L) {
  size_t len, pos = 0;
  const char *s = luaL_checklstring(L, 1, &len);
  if (lpar_codec_decode(L, s, len, &pos) != 0)
    return luaL_error(L, "bad encoding (%s)", lua_tostring(L, -1));
  if (pos != len)
    return luaL_error(L, "bad encoding (trailing bytes at byte %I)",
                      (LUAI_UACINT)pos);
  return 1;
}

static const luaL_Reg funcs[] = {
    {"parallel", l_parallel},       {"imap", l_imap},
    {"encode", l_encode},           {"decode", l_decode},
    {"errkind", lpar_kind_errkind}, {NULL, NULL}};

int luaopen_lpar(lua_State *L) {
  luaL_newlib(L, funcs);
  lua_pushliteral(L, LPAR_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_pushliteral(L, LPAR_LUANAME); /* the Lua it was built for */
  lua_setfield(L, -2, "_LUA");
  lua_pushinteger(L, LPAR_DEFWORKERS);
  lua_setfield(L, -2, "default_workers");
  lpar_lpool_open(L);
  return 1;
}

void lpar_openlib(lua_State *L) {
  luaL_requiref(L, "lpar", luaopen_lpar, 1);
  lua_pop(L, 1);
}
