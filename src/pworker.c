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
  const PWorkerArgs *a;
  Runner r;  /* runs items; its frame is RESULT, then maybe READY */
  int fidx;  /* stack index of the job's function (nil if none) */
  int flags; /* LPAR_CALL* of the current function */
  Buf in;    /* last frame received */
} PState;

/* Send the results gathered, followed by READY if 'ready' (one write). */
static void flush(PState *ps, int ready) {
  Runner *r = &ps->r;
  size_t from = lpar_worker_seal(r) ? 0 : LPAR_RESHDR;
  if (ready) {
    Frame f;
    char h[LPAR_HDRSIZE];
    f.type = LPAR_FREADY;
    f.count = 0;
    f.len = 0;
    lpar_wire_putheader(h, &f);
    lpar_worker_check(lpar_buf_add(&r->out, h, sizeof h));
  }
  if (r->out.n > from)
    lpar_worker_check(lpar_wire_write(r->fd, r->out.p + from, r->out.n - from));
  lpar_worker_begin(r, r->first + r->count);
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
  lua_State *L = ps->r.L;
  ps->flags = (int)f->count;
  lua_pushcfunction(L, loadfunc);
  lua_pushlstring(L, ps->in.p, ps->in.n);
  if (lua_pcall(L, 1, 1, ps->r.msgh) == LUA_OK) {
    lua_replace(L, ps->fidx);
    return;
  }
  lpar_worker_unpackerror(L);
  lua_pushfstring(L, "cannot load the function: %s",
                  lua_isstring(L, -2) ? lua_tostring(L, -2) : "?");
  lua_replace(L, -3);
  lpar_worker_senderror(&ps->r, 0);
  lua_pushnil(L);
  lua_replace(L, ps->fidx);
}

/* An ITEMS frame: run them, send the results, then READY. */
static void items(PState *ps, const Frame *f) {
  lua_State *L = ps->r.L;
  lua_Integer first, k;
  size_t pos = 8;
  if (ps->in.n < 8)
    _exit(4); /* the parent sent bad bytes */
  first = (lua_Integer)lpar_wire_get64(ps->in.p);
  ps->r.timed = (ps->flags & LPAR_CALLTIMED) != 0;
  lpar_worker_begin(&ps->r, first);
  for (k = 0; k < (lua_Integer)f->count && !lua_isnil(L, ps->fidx); k++) {
    lua_pushvalue(L, ps->fidx);
    if (lpar_codec_decode(L, ps->in.p, ps->in.n, &pos) != 0)
      _exit(4);
    if (lpar_worker_runitem(&ps->r, first + k) &&
        !(ps->flags & LPAR_CALLCOLLECT))
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
    lpar_worker_check(rc);
    if (f.type == LPAR_FCALL)
      call(ps, &f);
    else if (f.type == LPAR_FITEMS)
      items(ps, &f);
    else
      _exit(4);
  }
}

/* Stack: init, close (nil when absent), PState. */
static int workermain(lua_State *L) {
  PState *ps = lua_touserdata(L, 3);
  Frame f;
  char h[LPAR_HDRSIZE];
  lpar_worker_pushmsgh(L);
  ps->r.msgh = lua_gettop(L);
  lua_pushnil(L);
  ps->fidx = lua_gettop(L);
  if (!lua_isnil(L, 1) && lpar_worker_inithook(&ps->r, 1)) {
    lpar_worker_senderror(&ps->r, 0); /* init failed: say so and leave */
    return 0;
  }
  f.type = LPAR_FREADY;
  f.count = 1;
  f.len = 0;
  lpar_wire_putheader(h, &f);
  lpar_worker_check(lpar_wire_write(ps->r.fd, h, sizeof h));
  serve(ps);
  if (!lua_isnil(L, 2) && lpar_worker_hook(&ps->r, 2))
    lpar_worker_reportclose(L, "pool worker");
  return 0;
}

_Noreturn void lpar_pworker_run(lua_State *L, const PWorkerArgs *a) {
  PState ps;
  int status;
  memset(&ps, 0, sizeof ps);
  lpar_worker_initrunner(&ps.r, L, a->resfd, a->slot);
  lpar_worker_reseed(L, a->place);
  if (lpar_worker_setlimit(&ps.r, a->maxmem)) { /* said as init's failure */
    lua_pushnil(L);
    lpar_worker_senderror(&ps.r, 0);
    _exit(0);
  }
  ps.r.ring = a->ring;
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
  ps.a = a;
  status = lua_pcall(L, 3, 0, 0);
  _exit(status == LUA_OK ? 0 : 3);
}
