/*
** worker.c: child side of a run. Runs the user's function on the items it
** is sent and sends back encoded results (the item runner is shared with
** pool workers).
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
  const WorkerArgs *a;
  Runner r;
  char limitname[32]; /* the memory limit, as "512 MiB" */
  Buf in;             /* last frame received */
} WState;

void lpar_worker_check(int rc) {
  if (rc != 0) /* parent gone or out of memory: nothing more to do */
    _exit(rc == -EPIPE ? 0 : 3);
}

void lpar_worker_initrunner(Runner *r, lua_State *L, int fd, Slot *slot) {
  lpar_worker_mark(L);
  if (lpar_buf_reserve(&r->out, 4096) != 0)
    _exit(3);
  r->L = L;
  r->fd = fd;
  r->slot = slot;
}

void lpar_worker_begin(Runner *r, lua_Integer first) {
  r->out.n = LPAR_RESHDR;
  r->first = first;
  r->count = 0;
  r->mark = lpar_pool_now();
}

int lpar_worker_seal(Runner *r) {
  Frame f;
  if (r->count == 0)
    return 0;
  f.type = LPAR_FRESULT;
  f.count = r->count;
  f.len = r->out.n - LPAR_HDRSIZE;
  lpar_wire_putheader(r->out.p, &f);
  lpar_wire_put64(r->out.p + LPAR_HDRSIZE, (uint64_t)r->first);
  lpar_wire_put64(r->out.p + LPAR_HDRSIZE + 8,
                  (uint64_t)(lpar_pool_now() - r->mark));
  return 1;
}

/* Send the sealed frame through the ring, if it is big enough to gain
   from it and fits; else through the pipe. */
static void sendframe(Runner *r) {
  uint64_t pos;
  char *p = NULL;
  if (r->out.n >= LPAR_RINGMIN)
    p = lpar_ring_put(&r->ring, r->out.n, r->fd, &pos);
  if (p != NULL) {
    char note[LPAR_HDRSIZE + 16];
    Frame f;
    memcpy(p, r->out.p, r->out.n);
    f.type = LPAR_FRING;
    f.count = 0;
    f.len = 16;
    lpar_wire_putheader(note, &f);
    lpar_wire_put64(note + LPAR_HDRSIZE, pos);
    lpar_wire_put64(note + LPAR_HDRSIZE + 8, (uint64_t)r->out.n);
    lpar_worker_check(lpar_wire_write(r->fd, note, sizeof note));
  }
  else
    lpar_worker_check(lpar_wire_write(r->fd, r->out.p, r->out.n));
}

void lpar_worker_flush(Runner *r) {
  if (lpar_worker_seal(r)) {
    sendframe(r);
    lpar_worker_begin(r, r->first + r->count);
  }
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

void lpar_worker_senderror(Runner *r, lua_Integer i) {
  lua_State *L = r->L;
  Buf b = {NULL, 0, 0};
  Frame f;
  char h[LPAR_HDRSIZE + 8];
  lpar_worker_flush(r);
  if (lpar_codec_encode(L, -2, &b) != 0) { /* not encodable: use text */
    lua_pop(L, 1);                         /* the codec's message */
    b.n = 0;
    luaL_tolstring(L, -2, NULL);
    lua_replace(L, -3);
    lpar_worker_check(lpar_codec_encode(L, -2, &b) == 0 ? 0 : -ENOMEM);
  }
  lpar_worker_check(lpar_codec_encode(L, -1, &b) == 0 ? 0 : -ENOMEM);
  lua_pop(L, 2);
  f.type = LPAR_FERROR;
  f.count = 1;
  f.len = 8 + b.n;
  lpar_wire_putheader(h, &f);
  lpar_wire_put64(h + LPAR_HDRSIZE, (uint64_t)i);
  lpar_worker_check(lpar_wire_write(r->fd, h, sizeof h));
  lpar_worker_check(lpar_wire_write(r->fd, b.p, b.n));
  lpar_buf_free(&b);
}

/*
** Results this big are built and dropped item after item: from now on
** keep freed memory for reuse, since fresh pages cost a fault each. (Not
** done at start: it walks the malloc heap, copying pages shared with the
** parent.)
*/
static void keepmemory(Runner *r) {
#if defined(__GLIBC__)
  if (!r->bigresults) {
    r->bigresults = 1;
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
  }
#else
  (void)r;
#endif
}

int lpar_worker_runitem(Runner *r, lua_Integer i) {
  lua_State *L = r->L;
  int status;
  if (r->timed)
    r->slot->since = lpar_pool_now();
  r->slot->item = i;
  status = lua_pcall(L, 1, 1, r->msgh);
  r->slot->item = 0;
  if (status == LUA_OK) {
    size_t mark = r->out.n;
    if (r->count == 0)
      r->first = i;
    if (lpar_codec_encode(L, -1, &r->out) == 0) {
      lua_pop(L, 1);
      r->count++;
      if (r->out.n >= LPAR_FLUSHSIZE) {
        keepmemory(r);
        lpar_worker_flush(r);
      }
      return 0;
    }
    /* the result cannot travel: an error for this item */
    r->out.n = mark;
    lua_pushfstring(L, "cannot serialize result: %s", lua_tostring(L, -1));
    lua_replace(L, -3);
    lua_pop(L, 1);
    lua_pushnil(L); /* no traceback */
  }
  else {
    lpar_worker_unpackerror(L);
    if (status == LUA_ERRMEM && r->limit != NULL) { /* name the limit */
      lua_pushfstring(L, "not enough memory (limit %s)", r->limit);
      lua_replace(L, -3);
    }
  }
  lpar_worker_senderror(r, i);
  return 1;
}

int lpar_worker_hook(Runner *r, int idx) {
  lua_pushvalue(r->L, idx);
  if (lua_pcall(r->L, 0, 0, r->msgh) == LUA_OK)
    return 0;
  lpar_worker_unpackerror(r->L);
  return 1;
}

int lpar_worker_inithook(Runner *r, int idx) {
  int failed;
  r->slot->since = lpar_pool_now(); /* the parent times init too */
  r->slot->item = LPAR_SLOTHOOK;
  failed = lpar_worker_hook(r, idx);
  r->slot->item = 0;
  return failed;
}

void lpar_worker_reportclose(lua_State *L, const char *who) {
  const char *msg = lua_tostring(L, -2);
  fprintf(stderr, "lpar: %s %d: close failed: %s\n%s\n", who, (int)getpid(),
          msg ? msg : luaL_typename(L, -2),
          lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
  fflush(stderr);
}

void lpar_worker_reseed(lua_State *L, lua_Integer place) {
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "math") == LUA_TTABLE &&
      lua_getfield(L, -1, "randomseed") == LUA_TFUNCTION) {
    lua_pushinteger(L, (lua_Integer)getpid() ^ lpar_pool_now());
    lua_pushinteger(L, place);
    lua_pcall(L, 2, 0, 0);
  }
  lua_settop(L, top);
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
  lua_State *L = ws->r.L;
  const WorkerArgs *a = ws->a;
  Frame f;
  for (;;) {
    lua_Integer first, k;
    size_t pos = 8;
    int rc = lpar_wire_recv(a->cmdfd, &f, &ws->in);
    if (rc == 1)
      return; /* parent closed the channel: done */
    lpar_worker_check(rc);
    if (ws->in.n < 8)
      _exit(4);
    first = (lua_Integer)lpar_wire_get64(ws->in.p);
    lpar_worker_begin(&ws->r, first);
    for (k = 0; k < (lua_Integer)f.count; k++) {
      lua_pushvalue(L, a->fidx);
      if (f.type == LPAR_FWORK)
        lua_geti(L, a->itemsidx, first + k);
      else if (lpar_codec_decode(L, ws->in.p, ws->in.n, &pos) != 0)
        _exit(4); /* the parent sent bad bytes */
      if (lpar_worker_runitem(&ws->r, first + k) && a->stoponerror)
        break;
    }
    lpar_worker_flush(&ws->r);
  }
}

static void pushornil(lua_State *L, int idx) {
  if (idx)
    lua_pushvalue(L, idx);
  else
    lua_pushnil(L);
}

/* Stack: f, items, init, close (nil when absent), WState. */
static int workermain(lua_State *L) {
  WState *ws = lua_touserdata(L, 5);
  lpar_worker_pushmsgh(L);
  ws->r.msgh = lua_gettop(L);
  if (!lua_isnil(L, 3) && lpar_worker_inithook(&ws->r, 3)) {
    lpar_worker_senderror(&ws->r, 0); /* index 0: init failed */
    return 0;
  }
  serve(ws);
  if (!lua_isnil(L, 4) && lpar_worker_hook(&ws->r, 4))
    lpar_worker_reportclose(L, "worker");
  return 0;
}

_Noreturn void lpar_worker_run(lua_State *L, const WorkerArgs *a) {
  WState ws;
  WorkerArgs own = *a;
  int status;
  memset(&ws, 0, sizeof ws);
  lpar_worker_initrunner(&ws.r, L, a->resfd, a->slot);
  ws.r.timed = a->timed;
  ws.r.ring = a->ring;
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
    ws.r.limit = ws.limitname;
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
  ws.a = &own;
  status = lua_pcall(L, 5, 0, 0);
  _exit(status == LUA_OK ? 0 : 3);
}
