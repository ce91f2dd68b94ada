/*
** pworker.c: child side of a persistent pool. Loads the function of each
** job once, runs the items it is sent, and says when it is idle again.
*/
#include "pworker.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "lauxlib.h"
#include "lpar.h"
#include "wire.h"
#include "worker.h"
#include "xfer.h"

/*
** The conversation with the parent:
**   worker: READY (count 1) once init has run, or ERROR for index 0 with
**           init's error and traceback, then it leaves;
**   parent: CALL (count = LPAR_CALL* flags, payload: a function as xfer.c
**           encodes it): the function for the items that follow. If it
**           cannot be loaded the worker answers ERROR for index 0, and
**           skips the items until the next CALL;
**   parent: ITEMS (u64 first index, count encoded items);
**   worker: RESULT frames (u64 first index, u64 ns spent, values) and
**           ERROR frames (u64 index, error value, traceback or nil) for
**           them, then READY (count 0): idle. Without LPAR_CALLCOLLECT the
**           rest of a chunk is skipped after a failed item;
**   parent: end of file on the command channel: the worker runs close
**           and leaves.
*/

typedef struct PState {
  lua_State *L;
  const PWorkerArgs *a;
  int msgh;          /* stack index of the message handler */
  int fidx;          /* stack index of the job's function (nil if none) */
  int flags;         /* LPAR_CALL* of the current function */
  Buf out;           /* frames being built: RESULT, then maybe READY */
  lua_Integer first; /* index of the first result in 'out' */
  uint32_t count;    /* results in 'out' */
  long long mark;    /* when the items of 'out' began to run */
  Buf in;            /* last frame received */
} PState;

/* a results frame: header, u64 first index, u64 ns spent, values */
#define RESHDR (LPAR_HDRSIZE + 16)

static void check(int rc) {
  if (rc != 0) /* parent gone or out of memory: nothing more to do */
    _exit(rc == -EPIPE ? 0 : 3);
}

static void startresults(PState *ps, lua_Integer first) {
  ps->out.n = RESHDR;
  ps->first = first;
  ps->count = 0;
}

/* Send the results gathered, followed by READY if 'ready' (one write). */
static void flush(PState *ps, int ready) {
  Frame f;
  size_t from = 0;
  if (ps->count > 0) {
    long long now = lpar_pool_now();
    f.type = LPAR_FRESULT;
    f.count = ps->count;
    f.len = ps->out.n - LPAR_HDRSIZE;
    lpar_wire_putheader(ps->out.p, &f);
    lpar_wire_put64(ps->out.p + LPAR_HDRSIZE, (uint64_t)ps->first);
    lpar_wire_put64(ps->out.p + LPAR_HDRSIZE + 8, (uint64_t)(now - ps->mark));
    ps->mark = now;
  }
  else
    from = RESHDR; /* nothing but READY, if that */
  if (ready) {
    char h[LPAR_HDRSIZE];
    f.type = LPAR_FREADY;
    f.count = 0;
    f.len = 0;
    lpar_wire_putheader(h, &f);
    check(lpar_buf_add(&ps->out, h, sizeof h));
  }
  if (ps->out.n > from)
    check(lpar_wire_write(ps->a->resfd, ps->out.p + from, ps->out.n - from));
  startresults(ps, ps->first + ps->count);
}

/* Send ERROR for item 'i' (0: init or the function failed to load):
   error value and traceback at the top of the stack (both popped). */
static void senderror(PState *ps, lua_Integer i) {
  lua_State *L = ps->L;
  Buf b = {NULL, 0, 0};
  Frame f;
  char h[LPAR_HDRSIZE + 8];
  flush(ps, 0);
  if (lpar_codec_encode(L, -2, &b) != 0) { /* not encodable: use text */
    lua_pop(L, 1);                         /* codec's message */
    b.n = 0;
    luaL_tolstring(L, -2, NULL);
    lua_replace(L, -3);
    check(lpar_codec_encode(L, -2, &b) == 0 ? 0 : -ENOMEM);
  }
  check(lpar_codec_encode(L, -1, &b) == 0 ? 0 : -ENOMEM);
  lua_pop(L, 2);
  f.type = LPAR_FERROR;
  f.count = 1;
  f.len = 8 + b.n;
  lpar_wire_putheader(h, &f);
  lpar_wire_put64(h + LPAR_HDRSIZE, (uint64_t)i);
  check(lpar_wire_write(ps->a->resfd, h, sizeof h));
  check(lpar_wire_write(ps->a->resfd, b.p, b.n));
  lpar_buf_free(&b);
}

/* Call the function and item pushed on the stack (both popped) for item
   'i'. Returns 0, or 1 if the item failed. */
static int runitem(PState *ps, lua_Integer i) {
  lua_State *L = ps->L;
  Slot *slot = ps->a->slot;
  int status;
  if (ps->flags & LPAR_CALLTIMED)
    slot->since = lpar_pool_now();
  slot->item = i;
  status = lua_pcall(L, 1, 1, ps->msgh);
  slot->item = 0;
  if (status == LUA_OK) {
    size_t mark = ps->out.n;
    if (ps->count == 0)
      ps->first = i;
    if (lpar_codec_encode(L, -1, &ps->out) == 0) {
      lua_pop(L, 1);
      ps->count++;
      if (ps->out.n >= LPAR_FLUSHSIZE)
        flush(ps, 0);
      return 0;
    }
    ps->out.n = mark; /* the result cannot travel: an error for the item */
    lua_pushfstring(L, "cannot serialize result: %s", lua_tostring(L, -1));
    lua_replace(L, -3);
    lua_pop(L, 1);
    lua_pushnil(L); /* no traceback */
  }
  else
    lpar_worker_unpackerror(L);
  senderror(ps, i);
  return 1;
}

/* lua_CFunction: (bytes) -> the function they encode. */
static int loadfunc(lua_State *L) {
  size_t len, pos = 0;
  const char *p = lua_tolstring(L, 1, &len);
  lpar_xfer_decode(L, p, len, &pos);
  if (pos != len)
    luaL_error(L, "bad function encoding (trailing bytes)");
  return 1;
}

/* A CALL frame: load the function in ps->in into the function slot. */
static void call(PState *ps, const Frame *f) {
  lua_State *L = ps->L;
  ps->flags = (int)f->count;
  lua_pushcfunction(L, loadfunc);
  lua_pushlstring(L, ps->in.p, ps->in.n);
  if (lua_pcall(L, 1, 1, ps->msgh) == LUA_OK) {
    lua_replace(L, ps->fidx);
    return;
  }
  lpar_worker_unpackerror(L);
  lua_pushfstring(L, "cannot load the function: %s",
                  lua_isstring(L, -2) ? lua_tostring(L, -2) : "?");
  lua_replace(L, -3);
  senderror(ps, 0);
  lua_pushnil(L);
  lua_replace(L, ps->fidx);
}

/* An ITEMS frame: run them, send the results, then READY. */
static void items(PState *ps, const Frame *f) {
  lua_State *L = ps->L;
  lua_Integer first, k;
  size_t pos = 8;
  if (ps->in.n < 8)
    _exit(4); /* the parent sent bad bytes */
  first = (lua_Integer)lpar_wire_get64(ps->in.p);
  startresults(ps, first);
  ps->mark = lpar_pool_now();
  for (k = 0; k < (lua_Integer)f->count && !lua_isnil(L, ps->fidx); k++) {
    lua_pushvalue(L, ps->fidx);
    if (lpar_codec_decode(L, ps->in.p, ps->in.n, &pos) != 0)
      _exit(4);
    if (runitem(ps, first + k) && !(ps->flags & LPAR_CALLCOLLECT))
      break;
  }
  flush(ps, 1);
}

static void serve(PState *ps) {
  Frame f;
  for (;;) {
    int rc = lpar_wire_recv(ps->a->cmdfd, &f, &ps->in);
    if (rc == 1)
      return; /* the pool closed the channel: done */
    check(rc);
    if (f.type == LPAR_FCALL)
      call(ps, &f);
    else if (f.type == LPAR_FITEMS)
      items(ps, &f);
    else
      _exit(4);
  }
}

/* Run the hook at 'idx' (init or close); 0, or 1 with the error value
   and traceback pushed. */
static int hook(PState *ps, int idx) {
  lua_State *L = ps->L;
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 0, 0, ps->msgh) == LUA_OK)
    return 0;
  lpar_worker_unpackerror(L);
  return 1;
}

/* Stack: init, close (nil when absent), PState. */
static int workermain(lua_State *L) {
  PState *ps = lua_touserdata(L, 3);
  Frame f;
  char h[LPAR_HDRSIZE];
  lpar_worker_pushmsgh(L);
  ps->msgh = lua_gettop(L);
  lua_pushnil(L);
  ps->fidx = lua_gettop(L);
  if (!lua_isnil(L, 1) && hook(ps, 1)) {
    senderror(ps, 0); /* init failed: say so and leave */
    return 0;
  }
  f.type = LPAR_FREADY;
  f.count = 1;
  f.len = 0;
  lpar_wire_putheader(h, &f);
  check(lpar_wire_write(ps->a->resfd, h, sizeof h));
  serve(ps);
  if (!lua_isnil(L, 2) && hook(ps, 2)) { /* nobody else to tell */
    const char *msg = lua_tostring(L, -2);
    fprintf(stderr, "lpar: pool worker %d: close failed: %s\n%s\n",
            (int)getpid(), msg ? msg : luaL_typename(L, -2),
            lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
    fflush(stderr);
  }
  return 0;
}

_Noreturn void lpar_pworker_run(lua_State *L, const PWorkerArgs *a) {
  PState ps;
  int status, top = lua_gettop(L);
  memset(&ps, 0, sizeof ps);
  lpar_worker_mark(L);
  if (lpar_buf_reserve(&ps.out, LPAR_FLUSHSIZE + RESHDR) != 0)
    _exit(3);
  /* reseed math.random: every worker draws its own numbers */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "math") == LUA_TTABLE &&
      lua_getfield(L, -1, "randomseed") == LUA_TFUNCTION) {
    lua_pushinteger(L, (lua_Integer)getpid() ^ lpar_pool_now());
    lua_pushinteger(L, a->place);
    lua_pcall(L, 2, 0, 0);
  }
  lua_settop(L, top);
  lua_pushcfunction(L, workermain);
  if (a->initidx)
    lua_pushvalue(L, a->initidx);
  else
    lua_pushnil(L);
  if (a->closeidx)
    lua_pushvalue(L, a->closeidx);
  else
    lua_pushnil(L);
  lua_pushlightuserdata(L, &ps);
  ps.L = L;
  ps.a = a;
  status = lua_pcall(L, 3, 0, 0);
  _exit(status == LUA_OK ? 0 : 3);
}
