/*
** worker.c: the child side of every engine. Runs the functions it is
** given on the items it is sent and sends back encoded results.
*/
#include "worker.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "wire.h"
#include "xfer.h"

#define WORKERKEY "lpar.inworker"
/* this process's shared status, if it is a worker: a worker is a process
   of its own, with one state, and the batch loop asks after every record
   whether it is overdue (a lookup in the registry there costs more) */
static Slot *ownslot;
static pid_t ownpid; /* the worker's pid, with ownslot */

/* Set in a process forked from a worker (pthread_atfork): the user's code
   forked, and the copy must not come back into lpar. A flag, so that the
   checks after every item and record cost no system call. */
static volatile sig_atomic_t copied;

static void oncopy(void) {
  copied = 1;
}

/* A process the user's code forked in worker 'worker' came back into lpar:
   it says so on stderr and leaves, touching nothing of the worker's. */
static void leavecopy(pid_t self, pid_t worker) {
  fprintf(stderr,
          "lpar: process %d, forked by worker %d, returned into the "
          "worker's loop: it leaves (end a forked child with os.exit or "
          "_exit)\n",
          (int)self, (int)worker);
  fflush(stderr);
  _exit(1);
}

/*
** os.exit in a worker: flush stdio and leave with _exit, as a worker always
** leaves, so that no atexit handler of the host (nor a sanitizer's exit
** check, which can wait on a lock another thread of the parent held at the
** fork) runs in the worker. 'close' is ignored: finalizers do not run in
** workers either.
*/
static int workerexit(lua_State *L) {
  int status;
  if (lua_isboolean(L, 1))
    status = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else
    status = (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
  fflush(NULL);
  _exit(status);
}

/* Mark L as a worker's state, and give its os library the worker's exit. */
void lpar_worker_mark(lua_State *L) {
  lua_pushboolean(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, WORKERKEY);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "os") == LUA_TTABLE) {
    lua_pushcfunction(L, workerexit);
    lua_setfield(L, -2, "exit");
  }
  lua_pop(L, 2);
}

void lpar_worker_progress(long long done) {
  if (ownslot != NULL) {
    if (copied) /* a copy forked by the record just run */
      leavecopy(getpid(), ownpid);
    ownslot->part = done;
  }
}

int lpar_worker_overdue(lua_State *L) {
  (void)L;
  return ownslot != NULL && ownslot->item != 0 && ownslot->cut >= ownslot->item;
}

int lpar_worker_inside(lua_State *L) {
  int r = lua_getfield(L, LUA_REGISTRYINDEX, WORKERKEY) != LUA_TNIL;
  lua_pop(L, 1);
  return r;
}

/* lua_CFunction: (v) -> what v's __tostring gives, if a string. */
static int callmeta(lua_State *L) {
  if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
    return 1;
  return 0;
}

void lpar_worker_describe(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
    lua_pushvalue(L, idx);
    lua_tostring(L, -1); /* a number becomes its text, in the copy */
    return;
  }
  if (luaL_getmetafield(L, idx, "__tostring") != LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushcfunction(L, callmeta);
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING)
      return;
    lua_pop(L, 1); /* its error, or what it gave */
  }
  lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

/* lua_CFunction: __tostring of a table error value that crossed from a
   worker; upvalue 1 is what it says. */
static int sayfailure(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(1));
  return 1;
}

void lpar_worker_failure(lua_State *L, const char *prefix) {
  int tb = lua_type(L, -1) == LUA_TSTRING;
  if (lua_type(L, -2) == LUA_TTABLE) {
    if (prefix != NULL) { /* it names the failure when printed */
      lua_pushfstring(L, "%s(error object is a table value)%s%s", prefix,
                      tb ? "\n" : "", tb ? lua_tostring(L, -1) : "");
      lua_createtable(L, 0, 1);
      lua_insert(L, -2);
      lua_pushcclosure(L, sayfailure, 1);
      lua_setfield(L, -2, "__tostring");
      lua_setmetatable(L, -3);
    }
    lua_pop(L, 1); /* traceback */
    return;
  }
  lpar_worker_describe(L, -2);             /* error tb desc */
  lua_pushstring(L, prefix ? prefix : ""); /* error tb desc prefix */
  lua_insert(L, -2);                       /* error tb prefix desc */
  if (tb) {
    lua_pushliteral(L, "\n");
    lua_pushvalue(L, -4);
    lua_concat(L, 4); /* error tb msg (lua_concat keeps any NUL) */
  }
  else
    lua_concat(L, 2);
  lua_replace(L, -3);
  lua_pop(L, 1); /* traceback */
}

typedef struct WState {
  const WorkerArgs *a;
  Runner r;
  int fidx;  /* stack index of the current function (nil if none) */
  int flags; /* LPAR_CALL* of the current function */
  Buf in;    /* last frame received */
} WState;

void lpar_worker_check(int rc) {
  if (rc != 0) /* parent gone or out of memory: nothing more to do */
    _exit(rc == -EPIPE ? 0 : LPAR_EXITBROKEN);
}

void lpar_worker_own(void) {
  if (copied)
    leavecopy(getpid(), ownpid);
}

void lpar_worker_initrunner(Runner *r, lua_State *L, int fd, Slot *slot) {
  static int watching; /* oncopy is registered (once per process) */
  if (!watching && pthread_atfork(NULL, NULL, oncopy) == 0)
    watching = 1;
  copied = 0;
  ownpid = getpid();
  lpar_worker_mark(L);
  ownslot = slot;
  if (lpar_buf_reserve(&r->out, 4096) != 0)
    _exit(LPAR_EXITBROKEN);
  r->L = L;
  r->fd = fd;
  r->slot = slot;
}

void lpar_worker_begin(Runner *r, lua_Integer first) {
  r->out.n = LPAR_RESHDR;
  r->first = first;
  r->count = 0;
  r->mark = lpar_proc_now();
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
                  (uint64_t)(lpar_proc_now() - r->mark));
  return 1;
}

/* Send the sealed frame through the ring, if it is big enough to gain
   from it and fits; else through the pipe. */
static void sendframe(Runner *r) {
  uint64_t pos;
  char *p = NULL;
  lpar_worker_own();
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
    /* a long result's frame is let go once sent */
    if (lpar_buf_shed(&r->out) && lpar_buf_reserve(&r->out, 4096) != 0)
      _exit(LPAR_EXITBROKEN);
    lpar_worker_begin(r, r->first + r->count);
  }
}

/* levels a long traceback shows at its start and at its end */
#define LEVELS1 10
#define LEVELS2 11

/*
** Number of levels on L's stack. lua_getstack walks from the top, so
** asking for each level in turn would take time quadratic in the depth:
** double, then bisect, as luaL_traceback does.
*/
static int stackdepth(lua_State *L) {
  lua_Debug ar;
  int lo = 0, hi = 1; /* level lo exists, level hi may not */
  if (!lua_getstack(L, 0, &ar))
    return 0;
  while (lua_getstack(L, hi, &ar)) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    int mid = lo + (hi - lo) / 2;
    if (lua_getstack(L, mid, &ar))
      lo = mid;
    else
      hi = mid;
  }
  return lo + 1;
}

/* Add the line of one level (ar, as lua_getstack gave it) to B. */
static void addlevel(lua_State *L, luaL_Buffer *B, lua_Debug *ar) {
  lua_getinfo(L, "Slnt", ar);
  if (ar->currentline > 0)
    lua_pushfstring(L, "\n\t%s:%d: in ", ar->short_src, ar->currentline);
  else
    lua_pushfstring(L, "\n\t%s: in ", ar->short_src);
  luaL_addvalue(B);
  if (*ar->namewhat != '\0')
    lua_pushfstring(L, "%s '%s'", ar->namewhat, ar->name);
  else if (*ar->what == 'm')
    lua_pushliteral(L, "main chunk");
  else if (*ar->what != 'C')
    lua_pushfstring(L, "function <%s:%d>", ar->short_src, ar->linedefined);
  else
    lua_pushliteral(L, "?");
  luaL_addvalue(B);
  if (LPAR_ISTAILCALL(ar))
    luaL_addstring(B, "\n\t(...tail calls...)");
}

/*
** Push the traceback of L's levels 'from' .. 'to'-1 (the levels of the
** user's code only, not those of the caller the worker was forked from).
** Cut as luaL_traceback cuts: past LEVELS1 + LEVELS2 levels, only the
** first LEVELS1 and the last LEVELS2 are shown, so that it takes time
** linear in the depth (each lua_getstack is).
*/
static void traceback(lua_State *L, int from, int to) {
  luaL_Buffer B;
  lua_Debug ar;
  int level, cut = to - from > LEVELS1 + LEVELS2 + 1;
  luaL_buffinit(L, &B);
  luaL_addstring(&B, "stack traceback:");
  for (level = from; level < to; level++) {
    if (cut && level == from + LEVELS1) {
      lua_pushfstring(L, "\n\t...\t(skipping %d levels)",
                      to - from - LEVELS1 - LEVELS2);
      luaL_addvalue(&B);
      level = to - LEVELS2;
    }
    if (!lua_getstack(L, level, &ar))
      break;
    addlevel(L, &B, &ar);
  }
  luaL_pushresult(&B);
}

/*
** Message handler of the worker: error -> {error, traceback}. Upvalue 1
** is the stack depth of the worker loop, whose levels are left out.
*/
/* registry key of the {error, traceback} the handler noted last */
static const char noted = 0;

static int msghandler(lua_State *L) {
  int base = (int)lua_tointeger(L, lua_upvalueindex(1));
  int depth = stackdepth(L);
  lua_settop(L, 1);
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  traceback(L, 1, depth - base);
  lua_rawseti(L, -2, 2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &noted);
  return 1; /* the error value itself */
}

void lpar_worker_pushmsgh(lua_State *L) {
  lua_pushinteger(L, stackdepth(L));
  lua_pushcclosure(L, msghandler, 1);
}

/* lua_CFunction: the handler of lpar_worker_pushtraceback; upvalue 1 is
   the stack depth of the run's caller, whose levels are left out. */
static int serialhandler(lua_State *L) {
  int base = (int)lua_tointeger(L, lua_upvalueindex(1));
  if (lua_type(L, 1) == LUA_TTABLE)
    return 1; /* a table error value stays itself */
  lua_settop(L, 1);
  lpar_worker_describe(L, 1);
  lua_pushliteral(L, "\n");
  traceback(L, 1, stackdepth(L) - base);
  lua_concat(L, 3);
  return 1;
}

void lpar_worker_pushtraceback(lua_State *L, int extra) {
  lua_pushinteger(L, stackdepth(L) + extra);
  lua_pushcclosure(L, serialhandler, 1);
}

void lpar_worker_unpackerror(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &noted) == LUA_TTABLE) {
    lua_rawgeti(L, -1, 1);
    if (lua_rawequal(L, -1, -3)) /* noted for this error */
      lua_rawgeti(L, -2, 2);
    else /* an error in the handler itself, or one 'load' took */
      lua_pushnil(L);
    lua_replace(L, -3);
    lua_pop(L, 1);
  }
  else {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  lua_pushnil(L); /* what was noted is used up */
  lua_rawsetp(L, LUA_REGISTRYINDEX, &noted);
}

/*
** lua_CFunction: (error value, traceback, runner) -> a userdata holding
** the whole ERROR frame but its header and index. The error value is sent
** as it is if it is a string or a table the codec can carry, else as its
** description (lpar_worker_describe); the traceback if it is a string.
*/
static int errorframe(lua_State *L) {
  Runner *r = lua_touserdata(L, 3);
  Buf *b = lpar_codec_newbuf(L); /* 4 */
  if (r->memerr) {               /* name the limit, as every Lua's */
    lua_pushfstring(L, "not enough memory (limit %s)", r->limit);
    lua_replace(L, 1);
    lua_pushnil(L); /* 5.3's buffers raise with a traceback: not said */
    lua_replace(L, 2);
  }
  else if (lua_type(L, 1) != LUA_TSTRING && lua_type(L, 1) != LUA_TTABLE) {
    lpar_worker_describe(L, 1);
    lua_replace(L, 1);
  }
  if (lua_type(L, 2) != LUA_TSTRING) {
    lua_pushnil(L);
    lua_replace(L, 2);
  }
  if (lpar_buf_reserve(b, LPAR_HDRSIZE + 8) != 0)
    luaL_error(L, "not enough memory");
  b->n = LPAR_HDRSIZE + 8;
  if (lpar_codec_encode(L, 1, b) != 0) { /* a table it cannot carry */
    lua_pop(L, 1);                       /* the codec's message */
    b->n = LPAR_HDRSIZE + 8;
    lpar_worker_describe(L, 1);
    lua_replace(L, 1);
    if (lpar_codec_encode(L, 1, b) != 0)
      lua_error(L);
  }
  if (lpar_codec_encode(L, 2, b) != 0)
    lua_error(L);
  return 1;
}

/*
** The ERROR frame when making it failed (out of memory): the error value
** at 'idx' as a plain description, or the start of it if it is a string,
** built in C memory. 0, or -ENOMEM.
*/
static int plainerror(lua_State *L, int idx, Buf *b) {
  char desc[64];
  const char *s = desc;
  size_t len;
  if (lua_type(L, idx) == LUA_TSTRING) {
    s = lua_tolstring(L, idx, &len);
    if (len > 4096)
      len = 4096;
  }
  else {
    snprintf(desc, sizeof desc, "(error object is a %s value)",
             luaL_typename(L, idx));
    len = strlen(desc);
  }
  b->n = 0;
  if (lpar_buf_reserve(b, LPAR_HDRSIZE + 8 + 16 + len) != 0)
    return -ENOMEM;
  b->n = LPAR_HDRSIZE + 8;
  b->p[b->n++] = LPAR_TSTR;
  if (lpar_codec_putvarint(b, len) != 0 || lpar_buf_add(b, s, len) != 0)
    return -ENOMEM;
  b->p[b->n++] = LPAR_TNIL; /* no traceback */
  return 0;
}

void lpar_worker_senderror(Runner *r, lua_Integer i) {
  lua_State *L = r->L;
  Slot *slot = r->slot;
  Buf own = {NULL, 0, 0}, *b = &own;
  Frame f;
  int status;
  /* the results before it go first, as no item's; then a worker that
     dies before this frame is out is item i's failure */
  slot->item = 0;
  lpar_worker_flush(r);
  if (i > 0) {
    if (r->timed)
      slot->since = lpar_proc_now();
    slot->item = i;
  }
  lua_pushcfunction(L, errorframe);
  lua_pushvalue(L, -3);
  lua_pushvalue(L, -3);
  lua_pushlightuserdata(L, r);
  status = lua_pcall(L, 3, 1, 0); /* may run a __tostring */
  lpar_worker_own();
  if (status == LUA_OK)
    b = lua_touserdata(L, -1);
  else
    lpar_worker_check(plainerror(L, -3, b));
  f.type = LPAR_FERROR;
  f.count = r->memerr ? LPAR_KMEMORY : LPAR_KERROR; /* its kind */
  r->memerr = 0;
  f.len = b->n - LPAR_HDRSIZE;
  lpar_wire_putheader(b->p, &f);
  lpar_wire_put64(b->p + LPAR_HDRSIZE, (uint64_t)i);
  lpar_worker_check(lpar_wire_write(r->fd, b->p, b->n));
  slot->item = 0;
  lpar_buf_free(&own);
  lua_pop(L, 3); /* frame or error, error value, traceback */
}

/* The allocator of a worker with a memory limit: counts the bytes of the
   Lua heap and refuses to grow it past the limit. A refusal is noted
   until the same request succeeds (Lua collected garbage and tried once
   more): an error raised meanwhile is the limit's, whatever its status
   (Lua 5.3's auxiliary buffers raise a plain error when refused). */
typedef struct Limit {
  lua_Alloc f;
  void *ud;
  size_t used, max;
  int refused; /* a refusal not made good since it was cleared */
  void *rptr;  /* the request refused: block, old and new size */
  size_t rosize, rnsize;
} Limit;

/* the worker's limit (a worker never returns: it lives as the process) */
static Limit worklimit;

static void *limitalloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  Limit *lim = ud;
  size_t old = ptr ? osize : 0;
  void *p;
  if (nsize > old &&
      (lim->used > lim->max || nsize - old > lim->max - lim->used)) {
    lim->refused = 1;
    lim->rptr = ptr;
    lim->rosize = osize;
    lim->rnsize = nsize;
    return NULL; /* Lua collects garbage and tries once more */
  }
  p = lim->f(lim->ud, ptr, osize, nsize);
  if (p != NULL || nsize == 0)
    lim->used = (lim->used > old ? lim->used - old : 0) + nsize;
  if (p != NULL && lim->refused && ptr == lim->rptr && osize == lim->rosize &&
      nsize == lim->rnsize)
    lim->refused = 0; /* the try after collecting garbage */
  return p;
}

/* lua_CFunction: a full collection, under lua_pcall (a finalizer may
   raise). */
static int collectall(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}

/* A call stopped by the memory limit left its garbage: 5.1 and LuaJIT
   collect none before they refuse, so what reports the failure would be
   refused too. Collect it, with the limit lifted for the call. */
static void collectleft(lua_State *L) {
  size_t max = worklimit.max;
  worklimit.max = (size_t)-1;
  lua_pushcfunction(L, collectall);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK)
    lua_pop(L, 1);
  worklimit.max = max;
  worklimit.refused = 0;
}

/* what lauxlib raises, as a plain error, when a buffer cannot grow (5.3) */
#define BUFFERMSG "not enough memory for buffer allocation"

/*
** Whether an item's call that ended with 'status' (not LUA_OK), its error
** value on top, failed of r's memory limit; forgets the refusal noted. It
** did if the limit refused a request the call never got, and the call
** ended with a memory error or lauxlib's word for one: an error raised
** after a refusal the code caught is its own.
*/
static int limitfailed(Runner *r, int status) {
  int refused = worklimit.refused;
  size_t len, n = sizeof BUFFERMSG - 1;
  const char *s;
  worklimit.refused = 0;
  if (r->limit == NULL || !refused)
    return 0;
  if (status == LUA_ERRMEM)
    return 1;
  s = lua_type(r->L, -1) == LUA_TSTRING ? lua_tolstring(r->L, -1, &len) : NULL;
  return s != NULL && len >= n && memcmp(s + len - n, BUFFERMSG, n) == 0;
}

/*
** lua_pcall of the user's code (or of what reads the items it is given),
** with 'nargs' and 'nres', under the message handler: the memory limit's
** refusals count from the call on, a forked copy of the worker that comes
** back leaves, and after a failure of the limit's the garbage the call
** left is collected. Returns the status; *memerr, if given, says whether
** the limit failed it.
*/
static int usercall(Runner *r, int nargs, int nres, int *memerr) {
  int status, lim;
  worklimit.refused = 0;
  status = lua_pcall(r->L, nargs, nres, r->msgh);
  lpar_worker_own();
  if (status == LUA_OK)
    return status;
  lim = limitfailed(r, status);
  if (lim)
    collectleft(r->L);
  if (memerr != NULL)
    *memerr = lim;
  return status;
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
    r->slot->since = lpar_proc_now();
  /* the item is this worker's until its result is held or its error sent:
     a death before that is its failure */
  r->slot->part = -1;
  r->slot->item = i;
  status = usercall(r, 1, 1, &r->memerr);
  if (status == LUA_OK) {
    size_t mark = r->out.n;
    if (r->count == 0)
      r->first = i;
    if (lpar_codec_encode(L, -1, &r->out) == 0) {
      lua_pop(L, 1);
      r->count++;
      r->slot->item = 0;
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
  else
    lpar_worker_unpackerror(L);
  lpar_worker_senderror(r, i);
  return 1;
}

int lpar_worker_hook(Runner *r, int idx) {
  int memerr = 0;
  lua_pushvalue(r->L, idx);
  if (usercall(r, 0, 0, &memerr) == LUA_OK)
    return 0;
  lpar_worker_unpackerror(r->L);
  if (memerr) { /* named as an item's is */
    lua_pushfstring(r->L, "not enough memory (limit %s)", r->limit);
    lua_replace(r->L, -3);
    lua_pushnil(r->L);
    lua_replace(r->L, -2);
  }
  return 1;
}

int lpar_worker_inithook(Runner *r, int idx) {
  int failed;
  r->slot->since = lpar_proc_now(); /* the parent times init too */
  r->slot->item = LPAR_SLOTHOOK;
  failed = lpar_worker_hook(r, idx);
  r->slot->item = 0;
  return failed;
}

void lpar_worker_reportclose(lua_State *L, const char *who) {
  lpar_worker_describe(L, -2); /* as every failure reads */
  fprintf(stderr, "lpar: %s %d: close failed: %s\n%s%s", who, (int)getpid(),
          lua_tostring(L, -1), lua_isstring(L, -2) ? lua_tostring(L, -2) : "",
          lua_isstring(L, -2) ? "\n" : "");
  fflush(stderr);
  lua_pop(L, 1);
}

void lpar_worker_finish(Proc *p, long long deadline, double secs, int hasclose,
                        int report, const char *who,
                        volatile sig_atomic_t *stop) {
  int status = 0, rc = lpar_proc_waituntil(p, deadline, stop, &status);
  char desc[96];
  if (rc == 1 && report && lpar_proc_leftbadly(status)) {
    lpar_proc_describe(status, desc, sizeof desc);
    if (hasclose)
      fprintf(stderr, "lpar: %s %d: close failed: %s\n", who, (int)p->pid,
              desc);
    else
      fprintf(stderr, "lpar: %s %d %s after its last item\n", who, (int)p->pid,
              desc);
    fflush(stderr);
  }
  if (rc == 0 && stop != NULL && *stop) /* Ctrl-C: no close is waited for */
    rc = 2;
  else if (rc == 0) {
    lpar_proc_secs(secs, desc, sizeof desc);
    if (hasclose)
      fprintf(stderr, "lpar: %s %d: close timed out after %s s\n", who,
              (int)p->pid, desc);
    else
      fprintf(stderr, "lpar: %s %d: did not leave within %s s\n", who,
              (int)p->pid, desc);
    fflush(stderr);
  }
  if (rc == 0 || rc == 2) {
    lpar_proc_killproc(p, SIGKILL);
    lpar_proc_waitproc(p, &status, 1);
  }
  lpar_proc_closepid(p);
  p->pid = 0;
}

void lpar_worker_reseed(lua_State *L, lua_Integer place) {
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "math") == LUA_TTABLE &&
      lua_getfield(L, -1, "randomseed") == LUA_TFUNCTION) {
    lua_pushinteger(L, (lua_Integer)getpid() ^ lpar_proc_now());
    lua_pushinteger(L, place);
    lua_pcall(L, 2, 0, 0);
  }
  lua_settop(L, top);
}

const char *lpar_worker_memname(size_t bytes, char *buf, size_t size) {
  double mib = (double)bytes / (1024.0 * 1024.0);
  if (mib >= 1024 && bytes % (1 << 30) == 0)
    snprintf(buf, size, "%.0f GiB", mib / 1024);
  else if (bytes % (1 << 20) == 0)
    snprintf(buf, size, "%.0f MiB", mib);
  else if (mib >= 1024)
    snprintf(buf, size, "%.1f GiB", mib / 1024);
  else
    snprintf(buf, size, "%.1f MiB", mib);
  return buf;
}

size_t lpar_worker_heap(lua_State *L) {
  return (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 +
         (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
}

/* Push the message for a max_memory of 'max' with 'used' bytes of heap
   inherited: below it, or without LPAR_MEMROOM to run in above it. */
static void belowheap(lua_State *L, size_t max, size_t used) {
  char lim[32], heap[32];
  if ((double)used < 1.1 * (double)max && used < max + LPAR_MEMROOM) {
    snprintf(lim, sizeof lim, "%zu bytes", max); /* close: in bytes */
    snprintf(heap, sizeof heap, "%zu bytes", used);
  }
  else {
    lpar_worker_memname(max, lim, sizeof lim);
    lpar_worker_memname(used, heap, sizeof heap);
  }
  if (used >= max)
    lua_pushfstring(L,
                    "max_memory %s is below the %s the worker inherited "
                    "from the caller",
                    lim, heap);
  else
    lua_pushfstring(L,
                    "max_memory %s leaves less than %d KiB to run in above "
                    "the %s the worker inherited from the caller",
                    lim, LPAR_MEMROOM / 1024, heap);
}

/* L's heap in bytes but for the caller's records in flight. */
static size_t ownheap(lua_State *L) {
  size_t heap = lpar_worker_heap(L), inflight;
  lua_getfield(L, LUA_REGISTRYINDEX, LPAR_INFLIGHT);
  inflight = (size_t)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return heap > inflight ? heap - inflight : 0;
}

/* Whether L's heap, with garbage collected if that matters, leaves
   LPAR_MEMROOM below 'max'; the bytes in use in *used. */
static int heapfits(lua_State *L, size_t max, size_t *used) {
  *used = ownheap(L);
  if (*used + LPAR_MEMROOM <= max)
    return 1;
  lua_gc(L, LUA_GCCOLLECT, 0);
  *used = ownheap(L);
  return *used + LPAR_MEMROOM <= max;
}

int lpar_worker_setlimit(Runner *r, size_t max) {
  /* lives as long as the process: a worker never returns */
  static char name[32];
  lua_State *L = r->L;
  size_t used;
  if (max == 0)
    return 0;
  if (!heapfits(L, max, &used)) {
    belowheap(L, max, used);
    return 1;
  }
  worklimit.f = lua_getallocf(L, &worklimit.ud);
  worklimit.used = used;
  worklimit.max = max;
  worklimit.refused = 0;
  lua_setallocf(L, limitalloc, &worklimit);
  r->limit = lpar_worker_memname(max, name, sizeof name);
  return 0;
}

int lpar_worker_checkheap(lua_State *L, size_t max) {
  size_t used;
  if (heapfits(L, max, &used))
    return 0;
  belowheap(L, max, used);
  return 1;
}

/*
** The conversation with the parent (one loop for every kind of engine):
**   worker: READY (count 1) once init has run, or ERROR for index 0 with
**           init's error and traceback, then it leaves;
**   parent: CALL (count = LPAR_CALL* flags): the function for the items
**           that follow, either one the worker inherited at fork
**           (LPAR_CALLINHERIT, payload: u64 place in that table) or one
**           sent as xfer.c encodes it. If it cannot be loaded the worker
**           answers ERROR for index 0, and skips items until the next CALL;
**   parent: WORK (u64 first index; count items of the table the worker
**           inherited) or ITEMS (u64 first index, count encoded items);
**   worker: RESULT frames (u64 first index, u64 ns spent, values) and
**           ERROR frames (u64 index, error value, traceback or nil) for
**           them, then READY (count 0): done with that chunk. Without
**           LPAR_CALLCOLLECT the rest of a chunk is skipped after a failed
**           item;
**   parent: end of file on the command channel: the worker runs close
**           and leaves.
*/

/* Send the results gathered and READY (count 0): one write when the
   results take the pipe. */
static void chunkdone(Runner *r) {
  Frame f;
  char h[LPAR_HDRSIZE];
  f.type = LPAR_FREADY;
  f.count = 0;
  f.len = 0;
  lpar_wire_putheader(h, &f);
  lpar_worker_own();
  if (lpar_worker_seal(r) && r->out.n >= LPAR_RINGMIN)
    lpar_worker_flush(r); /* through the ring if it fits there */
  if (r->count > 0) {
    lpar_worker_check(lpar_buf_add(&r->out, h, sizeof h));
    lpar_worker_check(lpar_wire_write(r->fd, r->out.p, r->out.n));
  }
  else
    lpar_worker_check(lpar_wire_write(r->fd, h, sizeof h));
  lpar_worker_begin(r, r->first + r->count);
}

int lpar_worker_loadfn(lua_State *L) {
  size_t len, pos = 0;
  const char *p = lua_tolstring(L, 1, &len);
  lpar_xfer_decode(L, p, len, &pos);
  if (pos != len)
    luaL_error(L, "bad function encoding (trailing bytes)");
  return 1;
}

/* A CALL frame: put the function it names into the function slot. */
static void call(WState *ws, const Frame *f) {
  lua_State *L = ws->r.L;
  int status;
  ws->flags = (int)f->count;
  if (ws->flags & LPAR_CALLINHERIT) {
    if (ws->in.n != 8 || ws->a->fnsidx == 0)
      _exit(LPAR_EXITBADINPUT); /* the parent sent bad bytes */
    lua_geti(L, ws->a->fnsidx, (lua_Integer)lpar_wire_get64(ws->in.p));
    lua_replace(L, ws->fidx);
    return;
  }
  lua_pushcfunction(L, lpar_worker_loadfn);
  lua_pushlstring(L, ws->in.p, ws->in.n);
  status = usercall(&ws->r, 1, 1, NULL);
  if (status == LUA_OK) {
    lua_replace(L, ws->fidx);
    return;
  }
  lpar_worker_unpackerror(L);
  lua_pushfstring(L, "cannot load the function: %s",
                  lua_isstring(L, -2) ? lua_tostring(L, -2) : "?");
  lua_replace(L, -3);
  lpar_worker_senderror(&ws->r, 0);
  lua_pushnil(L);
  lua_replace(L, ws->fidx);
}

/* lua_CFunction: (items, i) -> items[i], which may run __index */
static int getitem(lua_State *L) {
  lua_geti(L, 1, lua_tointeger(L, 2));
  return 1;
}

/*
** Push item i of the items table at 'idx' (read under a protected call
** when it has a metatable): 0; or, when reading it raised (its __index),
** send that error as item i's and pop the function below it: 1.
*/
static int fetchitem(Runner *r, int idx, lua_Integer i) {
  lua_State *L = r->L;
  int status;
  if (lua_type(L, idx) == LUA_TTABLE) {
    if (!lua_getmetatable(L, idx)) {
      lua_rawgeti(L, idx, i); /* a plain table: reading it cannot raise */
      return 0;
    }
    lua_pop(L, 1); /* its metatable: an __index may raise */
  }
  r->slot->item = i; /* a death while reading it is its failure */
  lua_pushcfunction(L, getitem);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, i);
  status = usercall(r, 2, 1, &r->memerr);
  r->slot->item = 0;
  if (status == LUA_OK)
    return 0;
  lpar_worker_unpackerror(L); /* function, error, traceback */
  lua_remove(L, -3);
  lpar_worker_senderror(r, i);
  return 1;
}

/* lua_CFunction: (frame, pos) -> the item encoded at pos in the frame
   (a Buf), and the position after it; or nil, nil for bad bytes. */
static int decodeat(lua_State *L) {
  Buf *b = lua_touserdata(L, 1);
  size_t pos = (size_t)lua_tointeger(L, 2);
  if (lpar_codec_decode(L, b->p, b->n, &pos) != 0) {
    lua_pushnil(L);
    lua_pushnil(L);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)pos);
  return 2;
}

/*
** Push item i of the ITEMS frame at *pos (under the function), decoded
** under a protected call when the heap has a limit: 0; or, when the heap
** cannot hold it (past max_memory), send that error as item i's, pop the
** function and move *pos past it: 1.
*/
static int decodeitem(WState *ws, lua_Integer i, size_t *pos) {
  lua_State *L = ws->r.L;
  int status;
  if (ws->r.limit == NULL) { /* no limit: only a worker out of memory fails */
    if (lpar_codec_decode(L, ws->in.p, ws->in.n, pos) != 0)
      _exit(LPAR_EXITBADINPUT); /* the parent sent bad bytes */
    return 0;
  }
  lua_pushcfunction(L, decodeat);
  lua_pushlightuserdata(L, &ws->in);
  lua_pushinteger(L, (lua_Integer)*pos);
  status = usercall(&ws->r, 2, 2, &ws->r.memerr);
  if (status == LUA_OK) {
    if (lua_isnil(L, -1))
      _exit(LPAR_EXITBADINPUT); /* the parent sent bad bytes */
    *pos = (size_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return 0;
  }
  if (lpar_codec_skip(ws->in.p, ws->in.n, pos) != 0)
    _exit(LPAR_EXITBADINPUT); /* the parent sent bad bytes */
  lpar_worker_unpackerror(L); /* function, error, traceback */
  lua_remove(L, -3);
  lpar_worker_senderror(&ws->r, i);
  return 1;
}

/* A WORK or ITEMS frame: run the items, send the results, then READY. */
static void items(WState *ws, const Frame *f) {
  lua_State *L = ws->r.L;
  lua_Integer first, k;
  size_t pos = 8;
  if (ws->in.n < 8 || (f->type == LPAR_FWORK && ws->a->itemsidx == 0))
    _exit(LPAR_EXITBADINPUT); /* the parent sent bad bytes */
  first = (lua_Integer)lpar_wire_get64(ws->in.p);
  ws->r.timed = (ws->flags & LPAR_CALLTIMED) != 0;
  lpar_worker_begin(&ws->r, first);
  for (k = 0; k < (lua_Integer)f->count && !lua_isnil(L, ws->fidx); k++) {
    int failed;
    lua_pushvalue(L, ws->fidx);
    if (f->type == LPAR_FWORK)
      failed = fetchitem(&ws->r, ws->a->itemsidx, first + k);
    else
      failed = decodeitem(ws, first + k, &pos);
    /* a large frame, all decoded, is not kept while its items run (so
       that one long item costs twice its size here, not three times) */
    if (f->type == LPAR_FITEMS && k + 1 == (lua_Integer)f->count)
      lpar_buf_shed(&ws->in);
    if (!failed)
      failed = lpar_worker_runitem(&ws->r, first + k);
    if (failed && !(ws->flags & LPAR_CALLCOLLECT))
      break;
  }
  chunkdone(&ws->r);
}

static void serve(WState *ws) {
  Frame f;
  for (;;) {
    int rc;
    lpar_worker_own();
    rc = lpar_wire_recv(ws->a->cmdfd, &f, &ws->in);
    if (rc == 1)
      return; /* the parent closed the channel: done */
    lpar_worker_check(rc);
    if (f.type == LPAR_FCALL)
      call(ws, &f);
    else if (f.type == LPAR_FWORK || f.type == LPAR_FITEMS)
      items(ws, &f);
    else
      _exit(LPAR_EXITBADINPUT);
  }
}

static void pushornil(lua_State *L, int idx) {
  if (idx)
    lua_pushvalue(L, idx);
  else
    lua_pushnil(L);
}

/* Stack: fns, items, init, close (nil when absent), WState. */
static int workermain(lua_State *L) {
  WState *ws = lua_touserdata(L, 5);
  Frame f;
  char h[LPAR_HDRSIZE];
  lpar_worker_pushmsgh(L);
  ws->r.msgh = lua_gettop(L);
  lua_pushnil(L);
  ws->fidx = lua_gettop(L);
  if (!lua_isnil(L, 3) && lpar_worker_inithook(&ws->r, 3)) {
    lpar_worker_senderror(&ws->r, 0); /* init failed: say so and leave */
    return 0;
  }
  f.type = LPAR_FREADY;
  f.count = 1;
  f.len = 0;
  lpar_wire_putheader(h, &f);
  lpar_worker_check(lpar_wire_write(ws->r.fd, h, sizeof h));
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
  lpar_worker_reseed(L, a->place);
  ws.r.ring = a->ring;
  if (lpar_worker_setlimit(&ws.r, a->maxmem)) { /* said as init's failure */
    lua_pushnil(L);
    lpar_worker_senderror(&ws.r, 0);
    _exit(0);
  }
  lua_pushcfunction(L, workermain);
  pushornil(L, a->fnsidx);
  pushornil(L, a->itemsidx);
  pushornil(L, a->initidx);
  pushornil(L, a->closeidx);
  lua_pushlightuserdata(L, &ws);
  own.fnsidx = a->fnsidx ? 1 : 0; /* as workermain sees them */
  own.itemsidx = a->itemsidx ? 2 : 0;
  own.initidx = a->initidx ? 3 : 0;
  own.closeidx = a->closeidx ? 4 : 0;
  ws.a = &own;
  status = lua_pcall(L, 5, 0, 0);
  _exit(status == LUA_OK ? 0 : LPAR_EXITBROKEN);
}
