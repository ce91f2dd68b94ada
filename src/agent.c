/*
** agent.c: `lpar --worker [-j N]`, the far end of a host (hosts.h). A pool
** of N workers of its own (the engine) behind one stream: stdin brings
** frames from the parent, stdout takes frames back. Each chunk the parent
** sends becomes a job of that pool; its results go back in item order,
** chunk after chunk. The agent enforces the parent's timeouts and memory
** limit itself, and leaves, killing its workers, at end of file, on
** SIGTERM or SIGHUP, or when the parent has been silent for the time its
** setup gives (LPAR_AGENTIDLENS by default).
*/
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codec.h"
#include "engine.h"
#include "hosts.h"
#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "loop.h"
#include "lpar.h"
#include "proc.h"
#include "wire.h"
#include "worker.h"
#include "xfer.h"

/* a chunk from the parent, as a job of the agent's pool */
typedef struct Entry {
  Job *j;            /* NULL: its function could not be loaded, or the
                        parent cancelled it */
  lua_Integer first; /* the parent's index of its first item */
  lua_Integer count;
  int flags; /* of the CALL it runs under (LPAR_CALL*) */
} Entry;

typedef struct Agent {
  lua_State *L;
  int in, out; /* the stream to the parent */
  Buf inb;     /* bytes from the parent not handled yet */
  Buf outb;    /* bytes for the parent */
  size_t outpos;
  long long lastin, lastout;
  int eidx;  /* stack: the pool */
  int fidx;  /* ... the function of the last CALL (nil: none) */
  int jobs;  /* ... a table anchoring the jobs in 'q' */
  int fns;   /* ... the functions the workers inherit (or nil) */
  int flags; /* of the last CALL */
  double timeout;
  Entry *q; /* chunks in the order they came */
  int head, tail, cap;
  int n;              /* workers */
  long long idle;     /* the parent's silence it takes as its end (ns) */
  Watcher inw;        /* 'in', on the pool's loop */
  Watcher outw;       /* 'out', while bytes wait for the parent */
  int inready;        /* 'in' may be read (its watcher saw it) */
  int inalways;       /* 'in' is always readable (a regular file) */
  const char *broken; /* why the parent's stream is of no use, or NULL */
} Agent;

static void nomem(lua_State *L, int rc) {
  if (rc != 0)
    luaL_error(L, "not enough memory");
}

/* Queue a frame for the parent, with the '\n' that follows each. */
static void put(Agent *a, int type, uint32_t count, const char *p, size_t len) {
  if (a->outpos == a->outb.n)
    a->outb.n = a->outpos = 0;
  nomem(a->L, lpar_wire_addframe(&a->outb, (uint32_t)type, count, p, len) ||
                  lpar_buf_add(&a->outb, "\n", 1));
}

/* Write what the parent can take now; -1 when it is gone. */
static int flush(Agent *a) {
  while (a->outpos < a->outb.n) {
    ssize_t k = write(a->out, a->outb.p + a->outpos, a->outb.n - a->outpos);
    if (k < 0 && errno == EINTR)
      continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      return 0;
    if (k <= 0)
      return -1;
    a->outpos += (size_t)k;
    a->lastout = lpar_proc_now();
  }
  if (a->outpos > 0 && lpar_buf_shed(&a->outb)) /* a long result, sent */
    a->outpos = 0;
  return 0;
}

/* Write everything queued, waiting as long as it takes (up to the idle
   limit); -1 when the parent is gone or stuck. */
static int flushall(Agent *a) {
  long long until = lpar_proc_now() + LPAR_AGENTIDLENS;
  while (a->outpos < a->outb.n) {
    struct pollfd p = {a->out, POLLOUT, 0};
    if (flush(a) != 0)
      return -1;
    if (a->outpos == a->outb.n)
      break;
    if (lpar_proc_now() > until)
      return -1;
    if (poll(&p, 1, 1000) < 0 && errno != EINTR)
      return -1;
  }
  return 0;
}

/* Begin a frame at the end of a->outb, its payload to be appended;
   returns where it begins (see endframe). */
static size_t beginframe(Agent *a) {
  size_t at;
  if (a->outpos == a->outb.n)
    a->outb.n = a->outpos = 0;
  nomem(a->L, lpar_buf_reserve(&a->outb, LPAR_HDRSIZE));
  at = a->outb.n;
  a->outb.n += LPAR_HDRSIZE;
  return at;
}

/* End the frame begun at 'at': its header, and the '\n' after it. */
static void endframe(Agent *a, size_t at, int type, uint32_t count) {
  Frame f;
  f.type = (uint32_t)type;
  f.count = count;
  f.len = a->outb.n - at - LPAR_HDRSIZE;
  lpar_wire_putheader(a->outb.p + at, &f);
  nomem(a->L, lpar_buf_add(&a->outb, "\n", 1));
}

/* Queue an ERROR frame for item i: the value on top (popped), of kind
   'code' (kind.h), with no traceback (a failure's message holds it). */
static void puterror(Agent *a, lua_Integer i, int code) {
  lua_State *L = a->L;
  size_t at = beginframe(a);
  char index[8];
  lpar_wire_put64(index, (uint64_t)i);
  nomem(L, lpar_buf_add(&a->outb, index, 8));
  if (lpar_codec_encode(L, -1, &a->outb) != 0) { /* a table that cannot go */
    lua_pop(L, 1);
    a->outb.n = at + LPAR_HDRSIZE + 8;
    lpar_worker_describe(L, -1);
    lua_replace(L, -2);
    nomem(L, lpar_codec_encode(L, -1, &a->outb));
  }
  lua_pop(L, 1);
  lua_pushnil(L); /* no traceback */
  nomem(L, lpar_codec_encode(L, -1, &a->outb));
  lua_pop(L, 1);
  endframe(a, at, LPAR_FERROR, (uint32_t)code);
}

/* lua_CFunction: (message, Agent) -> puterror of the message as the
   start's failure, in a protected call. */
static int sayerror(lua_State *L) {
  Agent *a = lua_touserdata(L, 2);
  lua_settop(L, 1);
  puterror(a, 0, LPAR_KERROR);
  return 0;
}

/* Tell the parent why the agent cannot go on (the message on top,
   popped), as the failure of its start, and leave. */
static _Noreturn void giveup(Agent *a) {
  fprintf(stderr, "lpar --worker: %s\n", lua_tostring(a->L, -1));
  fflush(stderr);
  puterror(a, 0, LPAR_KERROR);
  flushall(a);
  _exit(1);
}

/* Read what the parent sent; 0, 1 at end of file, -1 on an error. */
static int readin(Agent *a) {
  for (;;) {
    long k = lpar_wire_tryread(a->in, &a->inb);
    if (k == -EAGAIN)
      return 0;
    if (k == 0)
      return 1;
    if (k < 0)
      return -1;
    a->lastin = lpar_proc_now();
  }
}

/* The next whole frame in a->inb, *at advanced past it: 1, 0 if none is
   there yet, -1 on a bad header. */
static int nextframe(Agent *a, size_t *at, Frame *f, const char **p) {
  if (a->inb.n - *at < LPAR_HDRSIZE)
    return 0;
  if (lpar_wire_getheader(a->inb.p + *at, f) != 0)
    return -1;
  if (f->len > a->inb.n - *at - LPAR_HDRSIZE)
    return 0;
  *p = a->inb.p + *at + LPAR_HDRSIZE;
  *at += LPAR_HDRSIZE + (size_t)f->len;
  return 1;
}

/* lua_CFunction: (bytes) -> the functions they hold, xfer-encoded one
   after another: init or nil, close or nil, and a sequence. */
static int decodefns(lua_State *L) {
  size_t len, pos = 8;
  const char *p = lua_tolstring(L, 1, &len);
  uint32_t flags, nf, k;
  if (len < 8)
    return luaL_error(L, "setup too short");
  flags = lpar_wire_get32(p);
  nf = lpar_wire_get32(p + 4);
  lua_settop(L, 1);
  if (flags & LPAR_SETUPINIT)
    lpar_xfer_decode(L, p, len, &pos);
  else
    lua_pushnil(L);
  if (flags & LPAR_SETUPCLOSE)
    lpar_xfer_decode(L, p, len, &pos);
  else
    lua_pushnil(L);
  if (nf > 0) {
    lua_createtable(L, (int)nf, 0);
    for (k = 1; k <= nf; k++) {
      lpar_xfer_decode(L, p, len, &pos);
      lua_rawseti(L, -2, k);
    }
  }
  else
    lua_pushnil(L);
  if (pos != len)
    return luaL_error(L, "bad setup (trailing bytes)");
  return 3;
}

/* lua_CFunction: (bytes) -> init, close, functions, from the table of the
   CLI (lpar.cli's agent() makes them from the script it names). */
static int clifns(lua_State *L) {
  size_t len, pos = 0;
  const char *p = lua_tolstring(L, 1, &len);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "lpar.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "agent");
  if (lpar_codec_decode(L, p, len, &pos) != 0 || pos != len)
    return luaL_error(L, "bad setup for the command line");
  lua_call(L, 1, 3);
  return 3;
}

/*
** Take the SETUP frame's payload p[0..len): check the versions, then make
** the pool (pushed at a->eidx, with its functions at a->fns) and start
** its workers. Gives up (ERROR 0, leaves) when something does not fit.
*/
static void setup(Agent *a, const char *p, size_t len) {
  lua_State *L = a->L;
  char why[400];
  EngineOpts o;
  uint32_t kind;
  if (lpar_hosts_checkversions(p, len, "its parent", why, sizeof why) != 0) {
    lua_pushstring(L, why);
    giveup(a);
  }
  if (len < LPAR_VERSIONSIZE + 28) {
    lua_pushliteral(L, "setup too short");
    giveup(a);
  }
  p += LPAR_VERSIONSIZE;
  len -= LPAR_VERSIONSIZE;
  memset(&o, 0, sizeof o);
  o.n = a->n;
  o.ignint = 1;
  o.maxmem = (size_t)lpar_wire_get64(p);
  o.timeout = (double)lpar_wire_get64(p + 8) / 1e9;
  if (lpar_wire_get64(p + 16) > 0)
    a->idle = (long long)lpar_wire_get64(p + 16);
  kind = lpar_wire_get32(p + 24);
  lua_pushcfunction(L, kind == LPAR_SETUPCLI ? clifns : decodefns);
  lua_pushlstring(L, p + 28, len - 28);
  if (lua_pcall(L, 1, 3, 0) != LUA_OK) {
    lua_pushfstring(L, "cannot load the setup: %s", lua_tostring(L, -1));
    giveup(a);
  }
  lua_pushvalue(L, -1);
  a->fns = lua_gettop(L) - 3; /* below init, close, functions, items */
  lua_insert(L, a->fns);
  lua_pushnil(L); /* items are always sent */
  lpar_engine_new(L, &o, LPAR_POOLMT);
  a->eidx = lua_gettop(L);
  /* its workers start now, and the agent goes on beating while they run
     init: one that fails fails the chunks, as an on-demand pool's does */
  lpar_engine_pump(L, a->eidx, 0);
}

/* A CALL frame: u64 timeout (ns), then what a worker's CALL holds. */
static void call(Agent *a, const Frame *f, const char *p) {
  lua_State *L = a->L;
  size_t pos = 8;
  a->flags = (int)f->count;
  a->timeout = f->len >= 8 ? (double)lpar_wire_get64(p) / 1e9 : 0;
  if (f->len >= 16 && (a->flags & LPAR_CALLINHERIT) && lua_istable(L, a->fns))
    lua_rawgeti(L, a->fns, (lua_Integer)lpar_wire_get64(p + 8));
  else if (f->len >= 8 && !(a->flags & LPAR_CALLINHERIT)) {
    lua_pushcfunction(L, lpar_worker_loadfn);
    lua_pushlstring(L, p + pos, (size_t)f->len - pos);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      lua_pushfstring(L, "cannot load the function: %s", lua_tostring(L, -1));
      lua_remove(L, -2);
      puterror(a, 0, LPAR_KERROR);
      lua_pushnil(L);
    }
  }
  else
    lua_pushnil(L);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  lua_replace(L, a->fidx);
}

/* An ITEMS frame: its items become a job of the pool, queued. */
static void items(Agent *a, const Frame *f, const char *p, int last) {
  lua_State *L = a->L;
  size_t pos = 8;
  uint32_t k;
  Entry *e;
  if (a->tail == a->cap) {
    int cap = a->cap ? 2 * a->cap : 8;
    Entry *q;
    if (a->head > 0) { /* make room at the front first */
      memmove(a->q, a->q + a->head, (size_t)(a->tail - a->head) * sizeof *q);
      a->tail -= a->head;
      a->head = 0;
    }
    else {
      q = realloc(a->q, (size_t)cap * sizeof *q);
      nomem(L, q == NULL);
      a->q = q;
      a->cap = cap;
    }
  }
  e = &a->q[a->tail++];
  e->first = f->len >= 8 ? (lua_Integer)lpar_wire_get64(p) : 0;
  e->count = f->count;
  e->flags = a->flags;
  e->j = NULL;
  /* each item takes a byte at least: a count beyond that is not believed
     (nor passed on as a table size) */
  if (f->len < 8 || f->count > f->len - 8) {
    lua_pushliteral(L, "bad items frame");
    giveup(a);
  }
  if (lua_isnil(L, a->fidx) || f->count == 0)
    return; /* said already: its items are skipped */
  lua_createtable(L, f->count < (1u << 20) ? (int)f->count : 1 << 20, 0);
  for (k = 1; k <= f->count; k++) {
    if (lpar_codec_decode(L, p, (size_t)f->len, &pos) != 0) {
      lua_pushfstring(L, "bad items frame: %s", lua_tostring(L, -1));
      giveup(a);
    }
    lua_rawseti(L, -2, k);
  }
  /* a long frame, decoded, is not kept while its items go to a worker
     (the last in the buffer: frames() reads no further) */
  if (last && f->len >= LPAR_KEEPBUF)
    lpar_buf_free(&a->inb);
  {
    JobOpts o;
    memset(&o, 0, sizeof o);
    o.collect = 1;
    o.timeout = a->timeout;
    o.wakefd = -1;
    e->j = lpar_engine_submit(L, a->eidx, a->fidx, -1, f->count, &o);
  }
  lua_rawsetp(L, a->jobs, e->j);
  lua_pop(L, 1);
}

/* lua_CFunction: (job) -> results, n, errors, or raises its failure. */
static int jobresults(lua_State *L) {
  return lpar_engine_results(L, 1);
}

/* Queue a RESULT frame for the values aside[from .. to] (items first +
   from - 1 ...), 'ns' spent on them. */
static void putresults(Agent *a, int aside, lua_Integer first, lua_Integer from,
                       lua_Integer to, long long ns) {
  lua_State *L = a->L;
  char head[16];
  lua_Integer k;
  size_t at;
  if (to < from)
    return;
  at = beginframe(a);
  lpar_wire_put64(head, (uint64_t)(first + from - 1));
  lpar_wire_put64(head + 8, (uint64_t)ns);
  nomem(L, lpar_buf_add(&a->outb, head, 16));
  for (k = from; k <= to; k++) {
    lua_rawgeti(L, aside, k);
    if (lpar_codec_encode(L, -1, &a->outb) != 0) {
      a->outb.n = at; /* no frame half made goes out */
      luaL_error(L, "cannot send the result of item %I: %s",
                 (LUAI_UACINT)(first + k - 1), lua_tostring(L, -1));
    }
    lua_pop(L, 1);
  }
  endframe(a, at, LPAR_FRESULT, (uint32_t)(to - from + 1));
}

/* The chunk at the head of the queue is done: its results and errors,
   in item order (up to the first error unless the parent collects), then
   READY. */
static void relay(Agent *a) {
  lua_State *L = a->L;
  Entry *e = &a->q[a->head];
  int top = lua_gettop(L);
  if (e->j != NULL) {
    lua_rawgetp(L, a->jobs, e->j);
    lua_pushcfunction(L, jobresults);
    lua_pushvalue(L, -2);
    if (lua_pcall(L, 1, 3, 0) != LUA_OK) /* the chunk failed as a whole */
      puterror(a, 0, lpar_engine_failkind(L, top + 1));
    else {
      int res = top + 2, errs = top + 4;
      lua_Integer k, from = 1;
      long long ns =
          (long long)(lpar_engine_nsperitem(e->j) * (double)e->count);
      for (k = 1; k <= e->count; k++) {
        if (lua_rawgeti(L, errs, k) == LUA_TNIL) {
          lua_pop(L, 1);
          continue;
        }
        putresults(a, res, e->first, from, k - 1, ns);
        ns = 0;
        puterror(a, e->first + k - 1, lpar_engine_itemkind(L, top + 1, k));
        from = k + 1;
        if (!(e->flags & LPAR_CALLCOLLECT))
          break;
      }
      if (k > e->count)
        putresults(a, res, e->first, from, e->count, ns);
    }
    lua_pushnil(L);
    lua_rawsetp(L, a->jobs, e->j);
  }
  lua_settop(L, top);
  put(a, LPAR_FREADY, 0, NULL, 0);
  a->head++;
  if (a->head == a->tail)
    a->head = a->tail = 0;
}

/* The parent does not want the chunks it sent so far: their jobs are
   cancelled (the workers running them killed), and each chunk ends with
   READY alone. */
static void cancelall(Agent *a) {
  lua_State *L = a->L;
  int k;
  for (k = a->head; k < a->tail; k++) {
    Entry *e = &a->q[k];
    if (e->j == NULL)
      continue;
    lua_rawgetp(L, a->jobs, e->j);
    if (lpar_engine_running(e->j))
      lpar_engine_cancel(L, lua_gettop(L), "cancelled by the parent");
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_rawsetp(L, a->jobs, e->j);
    e->j = NULL;
  }
}

/* Handle the frames that have come; -1 on a bad one. */
static int frames(Agent *a) {
  size_t at = 0;
  Frame f;
  const char *p;
  int rc;
  while ((rc = nextframe(a, &at, &f, &p)) > 0) {
    if (f.type == LPAR_FCALL)
      call(a, &f, p);
    else if (f.type == LPAR_FITEMS) {
      items(a, &f, p, at == a->inb.n);
      if (a->inb.p == NULL) /* let go by items */
        at = 0;
    }
    else if (f.type == LPAR_FCANCEL)
      cancelall(a);
    else if (f.type == LPAR_FBEAT && f.count == 0 && f.len == 8)
      put(a, LPAR_FBEAT, 1, p, 8); /* timed: back at once */
    else if (f.type != LPAR_FBEAT)
      return -1;
  }
  lpar_buf_drop(&a->inb, at);
  if (a->inb.n == 0) /* a long item, taken, is not kept twice */
    lpar_buf_shed(&a->inb);
  return rc < 0 ? -1 : 0;
}

/* Wait for SETUP (BEAT may come first) and take it. */
static void waitsetup(Agent *a) {
  lua_State *L = a->L;
  for (;;) {
    struct pollfd p = {a->in, POLLIN, 0};
    size_t at = 0;
    Frame f;
    const char *q;
    int rc;
    while ((rc = nextframe(a, &at, &f, &q)) > 0) {
      if (f.type == LPAR_FSETUP) {
        /* read in place: setup reads no input, and holds no memory of
           its own when it raises */
        setup(a, q, (size_t)f.len);
        lpar_buf_drop(&a->inb, at);
        return;
      }
      if (f.type != LPAR_FBEAT)
        rc = -1;
      if (rc < 0)
        break;
    }
    if (rc < 0) {
      lua_pushliteral(L, "the parent did not speak lpar's protocol");
      giveup(a);
    }
    lpar_buf_drop(&a->inb, at);
    if (lpar_proc_now() > a->lastin + LPAR_AGENTSETUPNS) {
      lua_pushliteral(L, "no setup came from the parent");
      giveup(a);
    }
    if (poll(&p, 1, 1000) < 0 && errno != EINTR)
      luaL_error(L, "poll: %s", strerror(errno));
    if (lpar_loop_caught())
      _exit(1);
    if ((p.revents & (POLLIN | POLLHUP)) && readin(a) != 0) {
      if (a->inb.n == 0)
        _exit(0); /* the parent left first */
      lua_pushliteral(L, "the parent's stream ended inside a frame");
      giveup(a);
    }
  }
}

/* The parent's stream has bytes (or its end). */
static void oninput(Loop *l, Watcher *w, uint32_t events, void *arg) {
  (void)l, (void)events, (void)arg;
  LPAR_OWNER(w, Agent, inw)->inready = 1;
}

/* The parent takes bytes again: the wait ends, and the agent flushes. */
static void onoutput(Loop *l, Watcher *w, uint32_t events, void *arg) {
  (void)l, (void)w, (void)events, (void)arg;
}

/* Put the parent's stream on the loop of the pool. */
static void watchstream(Agent *a) {
  Loop *l = lpar_engine_loop(a->L, a->eidx);
  int rc = lpar_loop_start(l, &a->inw, a->in, EPOLLIN);
  if (rc == -EPERM) /* a regular file: always readable */
    a->inalways = 1;
  else if (rc != 0)
    luaL_error(a->L, "epoll_ctl: %s", strerror(-rc));
}

/* Watch 'out' while bytes wait for it (a regular file always takes
   them); how long the loop may wait (ms). */
static int watchoutput(Agent *a, int wait) {
  Loop *l = lpar_engine_loop(a->L, a->eidx);
  int pending = a->outpos < a->outb.n;
  if (pending && !lpar_loop_active(&a->outw) &&
      lpar_loop_start(l, &a->outw, a->out, EPOLLOUT) != 0)
    return 0; /* cannot be watched: try again at once */
  if (!pending)
    lpar_loop_stop(l, &a->outw);
  return a->inalways ? 0 : wait;
}

/* How long the agent may wait for the stream or its workers (ms): until
   its next beat is due, a second at most. */
static int beatwait(Agent *a, long long now) {
  long long wait = (a->lastout + LPAR_BEATNS - now) / 1000000;
  if (wait < 0)
    wait = 0;
  if (wait > 1000)
    wait = 1000;
  return (int)wait;
}

/* One turn of the agent: the stream and the pool; 0, or -1 to leave. */
static int turn(Agent *a) {
  lua_State *L = a->L;
  long long now = lpar_proc_now();
  if (flush(a) != 0)
    return -1; /* the parent is gone */
  a->inready = 0;
  lpar_engine_pump(L, a->eidx, watchoutput(a, beatwait(a, now)));
  if (lpar_loop_caught())
    return -1;
  now = lpar_proc_now();
  if (a->inready || a->inalways) {
    int r = readin(a);
    if (r == 0 && frames(a) != 0)
      a->broken = "the parent did not speak lpar's protocol";
    else if (r > 0 && a->inb.n > 0)
      a->broken = "the parent's stream ended inside a frame";
    if (r != 0 || a->broken)
      return -1; /* end of file, or bytes that are not frames */
    lpar_engine_pump(L, a->eidx, 0);
  }
  while (a->head < a->tail &&
         (a->q[a->head].j == NULL || !lpar_engine_running(a->q[a->head].j)))
    relay(a);
  if (a->outpos == a->outb.n && now >= a->lastout + LPAR_BEATNS)
    put(a, LPAR_FBEAT, 0, NULL, 0);
  if (now > a->lastin + a->idle) {
    fprintf(stderr,
            "lpar --worker: nothing came from the parent for %.0f "
            "s: leaving\n",
            (double)a->idle / 1e9);
    return -1;
  }
  return 0;
}

/* lua_CFunction: the agent, with a light userdata Agent at 1. */
static int agentmain(lua_State *L) {
  Agent *a = lua_touserdata(L, 1);
  char hello[LPAR_VERSIONSIZE];
  Buf b = {0};
  a->L = L;
  lua_pushnil(L);
  a->fidx = lua_gettop(L);
  lua_newtable(L);
  a->jobs = lua_gettop(L);
  nomem(L, lpar_hosts_putversions(&b));
  memcpy(hello, b.p, sizeof hello);
  lpar_buf_free(&b);
  put(a, LPAR_FHELLO, (uint32_t)a->n, hello, sizeof hello);
  if (flushall(a) != 0)
    return 0;
  waitsetup(a);
  put(a, LPAR_FREADY, 1, NULL, 0);
  watchstream(a);
  while (turn(a) == 0)
    ;
  lpar_engine_close(L, a->eidx, "the parent is gone");
  if (a->broken)
    luaL_error(L, "%s", a->broken);
  return 0;
}

int lpar_agent_run(lua_State *L, int n) {
  Agent a;
  struct sigaction sa;
  int fd, status;
  memset(&a, 0, sizeof a);
  a.n = n;
  /* the stream leaves fds 0 and 1: what the workers print goes to stderr
     and what they read is empty, so neither can break a frame */
  a.in = fcntl(0, F_DUPFD_CLOEXEC, 3);
  a.out = fcntl(1, F_DUPFD_CLOEXEC, 3);
  if (a.in < 0 || a.out < 0 || dup2(2, 1) < 0) {
    fprintf(stderr, "lpar --worker: cannot move the stream: %s\n",
            strerror(errno));
    return 1;
  }
  fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  lpar_watcher_init(&a.inw, oninput);
  lpar_watcher_init(&a.outw, onoutput);
  if (fd < 0 || dup2(fd, 0) < 0 || fcntl(a.in, F_SETFL, O_NONBLOCK) < 0 ||
      fcntl(a.out, F_SETFL, O_NONBLOCK) < 0 || lpar_loop_catch(SIGTERM) < 0 ||
      lpar_loop_catch(SIGHUP) < 0) {
    fprintf(stderr, "lpar --worker: cannot set up its stdio: %s\n",
            strerror(errno));
    return 1;
  }
  close(fd);
  sa.sa_handler = SIG_IGN;
  if (sigaction(SIGPIPE, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0) {
    fprintf(stderr, "lpar --worker: cannot set up its signals: %s\n",
            strerror(errno));
    return 1;
  }
  a.lastin = a.lastout = lpar_proc_now();
  a.idle = LPAR_AGENTIDLENS;
  lua_pushcfunction(L, agentmain);
  lua_pushlightuserdata(L, &a);
  status = lua_pcall(L, 1, 0, 0);
  if (status != LUA_OK) {
    a.L = L;
    fprintf(stderr, "lpar --worker: %s\n", lua_tostring(L, -1));
    lua_pushcfunction(L, sayerror); /* it may raise: out of memory */
    lua_insert(L, -2);
    lua_pushlightuserdata(L, &a);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK)
      lua_pop(L, 1); /* the parent sees the stream end; stderr said why */
  }
  flushall(&a);
  lpar_buf_free(&a.inb);
  lpar_buf_free(&a.outb);
  free(a.q);
  return status == LUA_OK ? 0 : 1;
}
