/*
** worker.c: child side of a run. Runs the user's function on the items it
** is sent, in a coroutine of its own, and sends back encoded results.
*/
#include "worker.h"

#include <errno.h>
#include <stdio.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "lauxlib.h"
#include "lpar.h"
#include "wire.h"

#define WORKERKEY "lpar.inworker"

void lpar_worker_mark(lua_State *L) {
  lua_pushboolean(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, WORKERKEY);
}

int lpar_worker_inside(lua_State *L) {
  int r = lua_getfield(L, LUA_REGISTRYINDEX, WORKERKEY) != LUA_TNIL;
  lua_pop(L, 1);
  return r;
}

int lpar_worker_traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL && !lua_isnoneornil(L, 1))
    return 1; /* keep a non-string error value as it is */
  luaL_traceback(L, L, msg, 1);
  return 1;
}

typedef struct WState {
  lua_State *L;
  const WorkerArgs *a;
  int msgh;           /* stack index of the message handler */
  Buf out;            /* results frame being built: header, first, values */
  lua_Integer first;  /* index of the first result in 'out' */
  uint32_t count;     /* results in 'out' */
  long long mark;     /* when the items of 'out' began to run */
  char limitname[32]; /* the memory limit, as "512 MiB" */
  int bigresults;     /* malloc was told to keep freed memory */
  Buf in;             /* last frame received */
} WState;

/* a results frame: header, u64 first index, u64 ns spent, values */
#define RESHDR (LPAR_HDRSIZE + 16)

static void check(int rc) {
  if (rc != 0) /* parent gone or out of memory: nothing more to do */
    _exit(rc == -EPIPE ? 0 : 3);
}

static void startresults(WState *ws, lua_Integer first) {
  ws->out.n = RESHDR;
  ws->first = first;
  ws->count = 0;
}

static void flush(WState *ws) {
  Frame f;
  long long now;
  if (ws->count == 0)
    return;
  f.type = LPAR_FRESULT;
  f.count = ws->count;
  f.len = ws->out.n - LPAR_HDRSIZE;
  lpar_wire_putheader(ws->out.p, &f);
  lpar_wire_put64(ws->out.p + LPAR_HDRSIZE, (uint64_t)ws->first);
  now = lpar_pool_now();
  lpar_wire_put64(ws->out.p + LPAR_HDRSIZE + 8, (uint64_t)(now - ws->mark));
  ws->mark = now;
  check(lpar_wire_write(ws->a->resfd, ws->out.p, ws->out.n));
  startresults(ws, ws->first + ws->count);
}

/*
** Push the traceback of L's levels 'from' .. 'to'-1 (the levels of the
** user's code only, not those of the caller the worker was forked from).
*/
static void traceback(lua_State *L, int from, int to) {
  luaL_Buffer B;
  lua_Debug ar;
  int level;
  luaL_buffinit(L, &B);
  luaL_addstring(&B, "stack traceback:");
  for (level = from; level < to && lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Slnt", &ar);
    if (ar.currentline > 0)
      lua_pushfstring(L, "\n\t%s:%d: in ", ar.short_src, ar.currentline);
    else
      lua_pushfstring(L, "\n\t%s: in ", ar.short_src);
    luaL_addvalue(&B);
    if (*ar.namewhat != '\0')
      lua_pushfstring(L, "%s '%s'", ar.namewhat, ar.name);
    else if (*ar.what == 'm')
      lua_pushliteral(L, "main chunk");
    else if (*ar.what != 'C')
      lua_pushfstring(L, "function <%s:%d>", ar.short_src, ar.linedefined);
    else
      lua_pushliteral(L, "?");
    luaL_addvalue(&B);
    if (ar.istailcall)
      luaL_addstring(&B, "\n\t(...tail calls...)");
  }
  luaL_pushresult(&B);
}

/*
** Message handler of the worker: error -> {error, traceback}. Upvalue 1
** is the stack depth of the worker loop, whose levels are left out.
*/
static int msghandler(lua_State *L) {
  lua_Debug ar;
  int depth = 0, base = (int)lua_tointeger(L, lua_upvalueindex(1));
  while (lua_getstack(L, depth, &ar))
    depth++;
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  traceback(L, 1, depth - base);
  lua_rawseti(L, -2, 2);
  return 1;
}

void lpar_worker_pushmsgh(lua_State *L) {
  lua_Debug ar;
  int depth = 0;
  while (lua_getstack(L, depth, &ar))
    depth++;
  lua_pushinteger(L, depth);
  lua_pushcclosure(L, msghandler, 1);
}

void lpar_worker_unpackerror(lua_State *L) {
  if (lua_type(L, -1) == LUA_TTABLE && lua_rawlen(L, -1) == 2) {
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    lua_remove(L, -3);
  }
  else
    lua_pushnil(L); /* an error in the handler itself */
}

/* Send an error frame for item 'i': error value and traceback at the
   top of the stack (pops both). */
static void senderror(WState *ws, lua_Integer i) {
  lua_State *L = ws->L;
  Buf b = {NULL, 0, 0};
  Frame f;
  char h[LPAR_HDRSIZE + 8];
  flush(ws);
  if (lpar_codec_encode(L, -2, &b) != 0) { /* not encodable: use text */
    lua_pop(L, 1);
    b.n = 0;
    lua_pushstring(L, luaL_tolstring(L, -2, NULL));
    lua_remove(L, -2);
    lpar_codec_encode(L, -1, &b);
    lua_pop(L, 1);
  }
  check(lpar_codec_encode(L, -1, &b) == 0 ? 0 : -ENOMEM);
  lua_pop(L, 2);
  f.type = LPAR_FERROR;
  f.count = 1;
  f.len = 8 + b.n;
  lpar_wire_putheader(h, &f);
  lpar_wire_put64(h + LPAR_HDRSIZE, (uint64_t)i);
  check(lpar_wire_write(ws->a->resfd, h, sizeof h));
  check(lpar_wire_write(ws->a->resfd, b.p, b.n));
  lpar_buf_free(&b);
}

/*
** Results this big are built and dropped item after item: from now on
** keep freed memory for reuse, since fresh pages cost a fault each. (Not
** done at start: it walks the malloc heap, copying pages shared with the
** parent.)
*/
static void keepmemory(WState *ws) {
#if defined(__GLIBC__)
  if (!ws->bigresults) {
    ws->bigresults = 1;
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
  }
#else
  (void)ws;
#endif
}

/*
** Call the function and item pushed on the stack (both popped) for item
** 'i'. Returns 0, or 1 if the item failed.
*/
static int runitem(WState *ws, lua_Integer i) {
  lua_State *L = ws->L;
  Slot *slot = ws->a->slot;
  int status;
  if (ws->a->timed)
    slot->since = lpar_pool_now();
  slot->item = i;
  status = lua_pcall(L, 1, 1, ws->msgh);
  slot->item = 0;
  if (status == LUA_OK) {
    size_t mark = ws->out.n;
    if (ws->count == 0)
      ws->first = i;
    if (lpar_codec_encode(L, -1, &ws->out) == 0) {
      lua_pop(L, 1);
      ws->count++;
      if (ws->out.n >= LPAR_FLUSHSIZE) {
        keepmemory(ws);
        flush(ws);
      }
      return 0;
    }
    /* the result cannot travel: an error for this item */
    ws->out.n = mark;
    lua_pushfstring(L, "cannot serialize result: %s", lua_tostring(L, -1));
    lua_replace(L, -3);
    lua_pop(L, 1);
    lua_pushnil(L); /* no traceback */
  }
  else {
    lpar_worker_unpackerror(L);
    if (status == LUA_ERRMEM && ws->a->maxmem > 0) { /* name the limit */
      lua_pushfstring(L, "not enough memory (limit %s)", ws->limitname);
      lua_replace(L, -3);
    }
  }
  senderror(ws, i);
  return 1;
}

/* The allocator of a worker with a memory limit: counts the bytes of the
   Lua heap and refuses to grow it past the limit. */
typedef struct Limit {
  lua_Alloc f;
  void *ud;
  size_t used, max;
} Limit;

static void *limitalloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  Limit *lim = ud;
  size_t old = ptr ? osize : 0;
  void *p;
  if (nsize > old &&
      (lim->used > lim->max || nsize - old > lim->max - lim->used))
    return NULL; /* Lua collects garbage and tries once more */
  p = lim->f(lim->ud, ptr, osize, nsize);
  if (p != NULL || nsize == 0)
    lim->used = (lim->used > old ? lim->used - old : 0) + nsize;
  return p;
}

static void serve(WState *ws) {
  lua_State *L = ws->L;
  const WorkerArgs *a = ws->a;
  Frame f;
  for (;;) {
    lua_Integer first, k;
    size_t pos = 8;
    int rc = lpar_wire_recv(a->cmdfd, &f, &ws->in);
    if (rc == 1)
      return; /* parent closed the channel: done */
    check(rc);
    if (ws->in.n < 8)
      _exit(4);
    first = (lua_Integer)lpar_wire_get64(ws->in.p);
    startresults(ws, first);
    ws->mark = lpar_pool_now();
    for (k = 0; k < (lua_Integer)f.count; k++) {
      lua_pushvalue(L, a->fidx);
      if (f.type == LPAR_FWORK)
        lua_geti(L, a->itemsidx, first + k);
      else if (lpar_codec_decode(L, ws->in.p, ws->in.n, &pos) != 0)
        _exit(4); /* the parent sent bad bytes */
      if (runitem(ws, first + k) && a->stoponerror)
        break;
    }
    flush(ws);
  }
}

static void pushornil(lua_State *L, int idx) {
  if (idx)
    lua_pushvalue(L, idx);
  else
    lua_pushnil(L);
}

/* Write the error value and traceback on top of the stack to stderr
   (a failed close hook has nobody else to tell). */
static void report(lua_State *L) {
  const char *msg = lua_tostring(L, -2);
  fprintf(stderr, "lpar: worker %d: close failed: %s\n%s\n", (int)getpid(),
          msg ? msg : luaL_typename(L, -2),
          lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
  fflush(stderr);
}

/* Run the hook at 'idx' (init or close); 0, or 1 with the error value
   and traceback pushed. */
static int hook(WState *ws, int idx) {
  lua_State *L = ws->L;
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 0, 0, ws->msgh) == LUA_OK)
    return 0;
  lpar_worker_unpackerror(L);
  return 1;
}

/* Stack: f, items, init, close (nil when absent), WState. */
static int workermain(lua_State *L) {
  WState *ws = lua_touserdata(L, 5);
  lpar_worker_pushmsgh(L);
  ws->msgh = lua_gettop(L);
  if (!lua_isnil(L, 3) && hook(ws, 3)) {
    senderror(ws, 0); /* index 0: init failed */
    return 0;
  }
  serve(ws);
  if (!lua_isnil(L, 4) && hook(ws, 4)) /* close: report, then leave */
    report(L);
  return 0;
}

_Noreturn void lpar_worker_run(lua_State *L, const WorkerArgs *a) {
  WState ws;
  WorkerArgs own = *a;
  int status;
  memset(&ws, 0, sizeof ws);
  lpar_worker_mark(L);
  if (lpar_buf_reserve(&ws.out, 4096) != 0)
    _exit(3);
  if (a->maxmem > 0) { /* lives as long as the process: run never returns */
    static Limit lim;
    double mib = (double)a->maxmem / (1024.0 * 1024.0);
    lim.f = lua_getallocf(L, &lim.ud);
    lim.used =
        (size_t)lua_gc(L, LUA_GCCOUNT) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB);
    lim.max = a->maxmem;
    lua_setallocf(L, limitalloc, &lim);
    if (mib >= 1024 && (a->maxmem & ((1 << 30) - 1)) == 0)
      snprintf(ws.limitname, sizeof ws.limitname, "%.0f GiB", mib / 1024);
    else
      snprintf(ws.limitname, sizeof ws.limitname, "%.0f MiB", mib);
  }
  lua_pushcfunction(L, workermain);
  lua_pushvalue(L, a->fidx);
  pushornil(L, a->itemsidx);
  pushornil(L, a->initidx);
  pushornil(L, a->closeidx);
  lua_pushlightuserdata(L, &ws);
  own.fidx = 1; /* as workermain sees them */
  own.itemsidx = a->itemsidx ? 2 : 0;
  own.initidx = a->initidx ? 3 : 0;
  own.closeidx = a->closeidx ? 4 : 0;
  ws.L = L;
  ws.a = &own;
  status = lua_pcall(L, 5, 0, 0);
  _exit(status == LUA_OK ? 0 : 3);
}
