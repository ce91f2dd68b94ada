/*
** frame.c: decoding what workers send (RESULT, ERROR, READY, HELLO, ring
** frames) into the jobs they run.
*/
#include "engine.h"

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include "codec.h"
#include "engstate.h"
#include "kind.h"
#include "lcompat.h"
#include "worker.h"

/* ---- receiving ---- */

/* Decode the error value and traceback after the u64 index of an ERROR
   frame's payload; 0, or -1 with a message pushed. */
static int geterror(lua_State *L, const char *p, size_t len) {
  size_t pos = 8;
  if (lpar_codec_decode(L, p, len, &pos) != 0)
    return -1;
  if (lpar_codec_decode(L, p, len, &pos) != 0) {
    lua_remove(L, -2);
    return -1;
  }
  if (pos != len) {
    lua_pop(L, 2);
    lua_pushliteral(L, "trailing bytes in a frame");
    return -1;
  }
  return 0;
}

/* Store the n values decoded aside (in the table at 'aside', [k + 1] for
   item first + k) as results of j (uservalue at 'juv'). */
static void storeaside(Ctx *c, Job *j, int juv, int aside, lua_Integer first,
                       uint32_t n) {
  uint32_t k;
  for (k = 0; k < n; k++) {
    lua_rawgeti(c->L, aside, (lua_Integer)k + 1);
    lpar_job_store(c, j, juv, first + k);
  }
}

/* Results of items first .. first+count-1 at p[16..len) from worker w.
   0, or -1 with a message pushed. */
static int results(Ctx *c, EWorker *w, const char *p, size_t len,
                   lua_Integer first, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  uint32_t k;
  size_t pos = 16;
  int juv, aside;
  if (j == NULL)
    return 0; /* dropped */
  if (first != w->q[0].first + w->got ||
      first - w->q[0].first + (lua_Integer)count > w->q[0].count) {
    lua_pushliteral(L, "result for an item it was not given");
    return -1;
  }
  juv = lpar_job_pushuv(c, j);
  if (w->got + (lua_Integer)count == w->q[0].count) {
    /* its chunk is done: learn from its timing, and give the engine of a
       call's worker its next chunk before decoding, so that it works
       while the caller does */
    j->tns = lpar_policy_learn(j->tns, j->tnsn, w->busy, w->q[0].weight);
    j->tnsn = w->q[0].weight;
    j->lost = 0;
    if (c->e->o.retire && w->nq == 1 && j == c->e->jobs && lpar_job_workleft(j))
      lpar_deal_assign(c, w, j, juv);
    if (w->state == W_EMPTY || j->state != J_RUNNING) {
      lua_settop(L, juv - 2);
      return 0;
    }
  }
  else if (j->tns == 0) /* a first estimate before the chunk ends */
    j->tns = (double)(w->busy > 0 ? w->busy : 1) /
             (double)(w->got + (lua_Integer)count);
  /* decoded aside, and stored only once the frame has proved sound */
  lua_createtable(L, count < 1024 ? (int)count : 1024, 0);
  aside = lua_gettop(L);
  for (k = 0; k < count; k++) {
    if (lpar_codec_decode(L, p, len, &pos) != 0) {
      /* the item whose value this is fails (a worker sends the same
         bytes again if it runs again); the ones after it run again */
      storeaside(c, j, juv, aside, first, k);
      lua_replace(L, juv - 1);
      lua_settop(L, juv - 1);
      w->got += k + 1;
      w->blame = first + k;
      return -1;
    }
    lua_rawseti(L, aside, (lua_Integer)k + 1);
  }
  if (pos != len) { /* none is taken: its first item fails, the others
                       run again */
    lua_settop(L, juv - 2);
    lua_pushliteral(L, "trailing bytes in a frame");
    w->got += 1;
    w->blame = first;
    return -1;
  }
  storeaside(c, j, juv, aside, first, count);
  lua_settop(L, juv - 2);
  w->got += count;
  lpar_job_settle(c, j);
  return 0;
}

/* An ERROR frame for item i (0: init or loading the function failed), of
   kind 'code'. 0, or -1 with a message pushed. */
static int errorframe(Ctx *c, EWorker *w, const char *p, size_t len,
                      lua_Integer i, int code) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (geterror(L, p, len) != 0) {
    if (j != NULL && w->nq > 0 && i >= w->q[0].first + w->got &&
        i < w->q[0].first + w->q[0].count) { /* that item fails */
      w->got = i - w->q[0].first + 1;
      w->blame = i;
    }
    return -1;
  }
  if (i == 0 && w->state == W_STARTING && w->host) {
    /* its agent could not start: it says why and leaves (the engine
       breaks, if it must, as its stream ends) */
    lpar_worker_failure(L, NULL);
    lpar_host_leaveout(c, w, luaL_tolstring(L, -1, NULL));
    lua_pop(L, 2);
    return 0;
  }
  if (i == 0 && w->state == W_STARTING) {
    lpar_worker_failure(L, "worker init failed: ");
    lua_rawseti(L, c->uv, EU_INITERR);
    return 0; /* it leaves: lpar_place_lose() follows at end of file */
  }
  if (w->state != W_BUSY) {
    lua_pop(L, 2);
    lua_pushliteral(L, "error frame while idle");
    return -1;
  }
  if (j == NULL) {
    lua_pop(L, 2);
    return 0; /* dropped */
  }
  if (i == 0) {
    /* the job failed as a whole: its function did not load (a worker),
       or the host's own job failed; only as the answer to a CALL, with a
       message, and of a kind a worker sends */
    int kind = LPAR_KINDOF(code);
    if (!w->fresh || lua_type(L, -2) != LUA_TSTRING ||
        (!w->host && kind != LPAR_KERROR && kind != LPAR_KMEMORY)) {
      lua_pop(L, 2);
      lua_pushliteral(L, "error frame for no item");
      return -1;
    }
    lua_pop(L, 1); /* the message says it all */
    lpar_job_fail(c, j, w, code);
    return 0;
  }
  if (i < w->q[0].first + w->got || i >= w->q[0].first + w->q[0].count) {
    lua_pop(L, 2);
    lua_pushliteral(L, "error for an item it was not given");
    return -1;
  }
  w->got = i - w->q[0].first + 1;
  if (w->got == w->q[0].count)
    j->lost = 0;
  lpar_job_itemfailed(c, j, i, w, code);
  return 0;
}

/* A READY frame: started (count 1) or done with its chunk (count 0).
   0, or -1 with a message pushed. */
static int readyframe(Ctx *c, EWorker *w, uint32_t count) {
  lua_State *L = c->L;
  Job *j = w->job;
  if (count == 1 && w->state == W_STARTING) {
    w->state = w->nq > 0 ? W_BUSY : W_IDLE;
    w->probeat = lpar_proc_now(); /* its round trip, at once */
    c->e->startfails = 0;
    return 0;
  }
  if (count != 0 || w->state != W_BUSY || w->nq == 0) {
    lua_pushliteral(L, "unexpected ready frame");
    return -1;
  }
  if (j != NULL && w->got != w->q[0].count) {
    lua_pushliteral(L, "chunk ended early");
    return -1;
  }
  w->q[0] = w->q[1];
  w->got = 0;
  w->busy = 0;
  w->started = lpar_proc_now();
  w->hostfails = 0; /* a host that finishes chunks is sound */
  if (--w->nq == 0) {
    w->state = W_IDLE;
    w->job = NULL;
  }
  return 0;
}

/* Handle frame f (payload at p) from worker w: 0, or -1 when w broke the
   protocol with it (it is lost then). */
static int frame(Ctx *c, EWorker *w, const Frame *f, const char *p) {
  lua_State *L = c->L;
  int rc;
  c->e->from = w->host; /* what it stores is from there */
  if (f->type == LPAR_FRESULT && f->len >= 16 && f->count > 0 &&
      w->state == W_BUSY) {
    w->busy += (long long)lpar_wire_get64(p + 8);
    rc = results(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p),
                 f->count);
  }
  else if (f->type == LPAR_FERROR && f->len >= 8)
    rc = errorframe(c, w, p, (size_t)f->len, (lua_Integer)lpar_wire_get64(p),
                    lpar_kind_fromwire(f->count));
  else if (f->type == LPAR_FREADY && (!w->host || w->hello))
    rc = readyframe(c, w, f->count);
  else if (f->type == LPAR_FHELLO && w->host && !w->hello)
    rc = lpar_host_hello(c, w, f, p);
  else if (f->type == LPAR_FBEAT && w->host) {
    /* still there (lastread says so); a timed one came back */
    if (f->count == 1 && f->len == 8) {
      long long rtt = lpar_proc_now() - (long long)lpar_wire_get64(p);
      if (rtt > 0 && (w->rtt == 0 || rtt < w->rtt))
        w->rtt = rtt;
    }
    rc = 0;
  }
  else {
    lua_pushstring(L, f->type == LPAR_FRESULT ? "bad frame header"
                                              : "unexpected frame");
    rc = -1;
  }
  c->e->from = 0;
  if (f->type == LPAR_FRESULT || f->type == LPAR_FERROR ||
      f->type == LPAR_FREADY)
    w->fresh = 0; /* it answered the CALL */
  if (rc != 0) {
    char what[160];
    snprintf(what, sizeof what, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    lpar_place_protoerror(c, w, what);
  }
  return rc;
}

/* A RING frame: the frame w put in its ring at the place that p names;
   its space is handed back once it is handled. */
static int ringframe(Ctx *c, EWorker *w, const char *p) {
  uint64_t pos = lpar_wire_get64(p), n = lpar_wire_get64(p + 8);
  const char *q = lpar_ring_get(&w->ring, pos, n);
  Frame f;
  if (q == NULL || n < LPAR_HDRSIZE || lpar_wire_getheader(q, &f) != 0 ||
      f.len != n - LPAR_HDRSIZE || f.type == LPAR_FRING) {
    lpar_place_protoerror(c, w, "bad place in the ring");
    return -1;
  }
  if (frame(c, w, &f, q + LPAR_HDRSIZE) != 0)
    return -1;
  if (w->state != W_EMPTY)
    lpar_ring_release(&w->ring, pos + n);
  return 0;
}

/* Handle the whole frames w has sent; -1 if w is gone meanwhile. */
static int frames(Ctx *c, EWorker *w) {
  size_t at = 0;
  pid_t pid = w->proc.pid;
  for (;;) {
    Frame f;
    const char *p;
    if (w->host) /* the '\n' an agent writes after each frame */
      while (at < w->in.n && w->in.p[at] == '\n')
        at++;
    if (w->in.n - at < LPAR_HDRSIZE)
      break;
    if (lpar_wire_getheader(w->in.p + at, &f) != 0 ||
        (f.type == LPAR_FRING && f.len != 16)) {
      lpar_place_protoerror(c, w, "bad frame header");
      return -1;
    }
    if (f.len > w->in.n - at - LPAR_HDRSIZE)
      break; /* not all there yet */
    p = w->in.p + at + LPAR_HDRSIZE;
    if ((f.type == LPAR_FRING ? ringframe(c, w, p) : frame(c, w, &f, p)) != 0)
      return -1;
    if (w->state == W_EMPTY || w->proc.pid != pid)
      return -1; /* its job failed and took it along */
    at += LPAR_HDRSIZE + (size_t)f.len;
  }
  lpar_buf_drop(&w->in, at);
  /* a long result, decoded, is not kept twice while it is written */
  if (w->in.n == 0)
    lpar_buf_shed(&w->in);
  return 0;
}

/* Read what worker w has sent and handle it. The time an engine of a
   call spends on it counts as the caller's cost per result. */
void lpar_frame_read(Ctx *c, EWorker *w) {
  Engine *e = c->e;
  long long t0 = e->o.ondemand ? lpar_proc_now() : 0;
  long long stored0 = e->stored;
  for (;;) {
    long k = lpar_wire_tryread(w->proc.resfd, &w->in);
    if (k == -EAGAIN)
      break;
    if (k == -ENOMEM) {
      char what[96];
      lpar_place_protoerror(c, w, lpar_wire_toolong(&w->in, what, sizeof what));
      return;
    }
    if (k <= 0) { /* end of file (a partial frame is dropped) or error */
      lpar_place_lose(c, w, k < 0, NULL, 0);
      return;
    }
    w->lastread = lpar_proc_now();
    if (frames(c, w) != 0)
      return;
  }
  if (e->o.ondemand) {
    e->pns += lpar_proc_now() - t0;
    e->pitems += e->stored - stored0;
  }
}
