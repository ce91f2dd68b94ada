/*
** deal.c: handing out chunks to places and starting workers as the
** policy (policy.c) says.
*/
#include "engine.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engstate.h"
#include "kind.h"
#include "lcompat.h"
#include "lpar.h"
#include "worker.h"

/* The time per item (per record for a batched job) that stream j's next
   chunk is sized by: the time learnt, raised by any of its chunks that is
   overdue by the time it was sized by (see lpar_policy_pace). */
static double pace(Engine *e, Job *j) {
  long long now = 0;
  double tns = j->tns;
  int i;
  for (i = 0; i < e->o.n && tns > 0; i++) {
    EWorker *w = &e->w[i];
    if (w->job == j && w->nq > 0 && w->state == W_BUSY) {
      double t;
      if (now == 0)
        now = lpar_proc_now();
      t = lpar_policy_pace(w->q[0].tns, now - w->started, w->q[0].weight,
                           LPAR_OVERDUENS);
      if (t > tns)
        tns = t;
    }
  }
  return tns;
}

/* Chunk size (see lpar_policy_chunk), in records for a batched job. The
   engine of a call amortizes
   forks (LPAR_MINCHUNKS of work at least, more for a stream, which has
   no tail to balance until it ends); one that lives on only a round trip
   (LPAR_POOLCHUNKNS), with at most LPAR_POOLPROBE items until the time
   per item is known. */
lua_Integer lpar_deal_chunksize(Engine *e, Job *j) {
  SchedChunk s = {0};
  s.fixed = j->o.chunk;
  s.left = lpar_job_itemsleft(j);
  s.places = e->o.n;
  s.tns = j->stream ? pace(e, j) : j->tns;
  if (e->o.ondemand) {
    s.minns = (j->stream ? 4.0 : 1.0) * LPAR_MINCHUNKNS;
    s.max = j->stream && j->o.chunk <= 0 ? LPAR_MAXSTREAMCHUNK : 0;
  }
  else {
    s.minns = LPAR_POOLCHUNKNS;
    s.probe = LPAR_POOLPROBE;
    s.max = LPAR_POOLMAXCHUNK;
  }
  return (lua_Integer)lpar_policy_chunk(&s);
}

/* Workers of the engine that can run a job now: local places and the
   agents' workers of the hosts that said HELLO. */
int lpar_deal_workers(Engine *e) {
  int i, n = lpar_host_nlocal(e);
  for (i = lpar_host_nlocal(e); i < e->o.n; i++)
    if (e->w[i].state != W_EMPTY && e->w[i].hello)
      n += e->w[i].hostn;
  return n > 0 ? n : 1;
}

/*
** Hand worker w a chunk of job j (uservalue at 'juv'): the job's function
** first if w does not hold it, then the items (a range of the inherited
** table, or encoded). Nothing is sent when a stream has no item ready.
*/
void lpar_deal_assign(Ctx *c, EWorker *w, Job *j, int juv) {
  lua_State *L = c->L;
  int alone = 0, type = j->o.inherit ? LPAR_FWORK : LPAR_FITEMS;
  lua_Integer first, count;
  size_t at, start;
  int top = lua_gettop(L);
  Frame f;
  if (w->outpos == w->out.n) /* all sent: start afresh */
    w->out.n = w->outpos = 0;
  start = w->out.n;
  if (w->fnjob != j->id && w->host) {
    if (j->hostcall.n == 0)
      lpar_host_makecall(L, j);
    lpar_engine_nomem(L, lpar_buf_add(&w->out, j->hostcall.p, j->hostcall.n));
  }
  else if (w->fnjob != j->id)
    lpar_engine_nomem(L, lpar_buf_add(&w->out, j->call.p, j->call.n));
  if (w->fnjob != j->id)
    w->fresh = 1;
  at = w->out.n;
  lpar_engine_nomem(L, lpar_buf_reserve(&w->out, LPAR_HDRSIZE + 8));
  w->out.n += LPAR_HDRSIZE + 8;
  /* a batched job's chunk is one batch, of the records the policy wants
     (asked of the iterator); a host's, as many batches as make its share
     of records */
  if (j->o.batched && w->host) {
    lua_Integer per = lpar_deal_chunksize(c->e, j);
    count = (lpar_host_chunk(c->e, j, w) + per - 1) / per;
    if (count < w->hostn)
      count = w->hostn;
  }
  else if (j->o.batched)
    count = 1;
  else
    count =
        w->host ? lpar_host_chunk(c->e, j, w) : lpar_deal_chunksize(c->e, j);
  if (count > LPAR_MAXFRAMECOUNT) /* a frame's count is a u32 */
    count = LPAR_MAXFRAMECOUNT;
  if (j->redo.n > 0) {
    long long from;
    count = lpar_ranges_take(&j->redo, count, &from, &alone);
    first = from;
    if (!j->o.inherit)
      lua_rawgeti(L, juv, j->stream ? JU_INFLIGHT : JU_ITEMS);
  }
  else if (j->stream) {
    first = j->n + 1;
    count = lpar_job_pull(c, j, juv, w, count);
  }
  else {
    lua_Integer r = lpar_job_room(j);
    first = j->next;
    if (count > r)
      count = r;
    j->next += count;
    if (!j->o.inherit)
      lua_rawgeti(L, juv, JU_ITEMS);
  }
  if (lua_gettop(L) > top) { /* items from a table */
    int rc = lpar_job_putitems(c, j, top + 1, w, first, count);
    lua_settop(L, top);
    if (rc != 0)
      count = -1;
  }
  if (count <= 0) { /* nothing, or the job failed: the frame never leaves */
    w->out.n = start;
    lpar_job_settle(c, j); /* a stream that ended may be complete now */
    return;
  }
  f.type = (uint32_t)type;
  f.count = (uint32_t)count;
  f.len = w->out.n - at - LPAR_HDRSIZE;
  lpar_wire_putheader(w->out.p + at, &f);
  lpar_wire_put64(w->out.p + at + LPAR_HDRSIZE, (uint64_t)first);
  w->fnjob = j->id;
  if (w->state == W_IDLE)
    w->state = W_BUSY;
  w->job = j;
  w->q[w->nq].first = first;
  w->q[w->nq].count = count;
  w->q[w->nq].weight = count;
  w->q[w->nq].tns = j->tns;
  if (j->recs != NULL) { /* the records of its batches */
    lua_Integer k;
    w->q[w->nq].weight = 0;
    for (k = first; k < first + count; k++)
      w->q[w->nq].weight += k > KIDBASE ? lpar_job_partsize(c, juv, k)
                                        : j->recs[(k - 1) % LPAR_WINDOW];
  }
  w->q[w->nq].alone = alone;
  if (w->nq++ == 0) {
    w->got = 0;
    w->busy = 0;
    w->started = lpar_proc_now();
    c->e->slots[w - c->e->w].cut = 0;
  }
  if (j->o.onevent) {
    lua_Integer k;
    for (k = first; k < first + count && j->state == J_RUNNING; k++)
      lpar_job_tellstart(c, j, juv, k, w);
  }
  if (lpar_place_sendsome(c->e, w) != 0) /* gone, or going: reaped as it ends */
    lpar_place_lose(c, w, 0, NULL, 0);
}

/* Whether busy worker w should get a second chunk of its job now, to
   start as soon as it is done with the first rather than wait for the
   parent (see lpar_policy_prefetch). */
static int prefetch(Engine *e, EWorker *w, long long now) {
  Job *j = w->job;
  if (w->state != W_BUSY || w->nq != 1 || j == NULL || !lpar_job_workleft(j))
    return 0;
  if (lpar_job_mayblock(
          j)) /* its results go back before its iterator is asked */
    return 0;
  if (w->host) /* a round trip away: its next chunk waits there */
    return 1;
  if (e->slots[w - e->w].cut >= w->q[0].first) /* overdue: not behind it */
    return 0;
  return lpar_policy_prefetch(
      j->tns, w->q[0].weight, now - w->started,
      e->o.ondemand ? LPAR_MINCHUNKNS : LPAR_POOLCHUNKNS,
      lpar_job_itemsleft(j) < 0 ? LPAR_WINDOW : lpar_job_itemsleft(j), e->o.n,
      j->o.batched ? 1 : lpar_deal_chunksize(e, j));
}

/* Whether w may be handed a chunk: live and holding none (a worker still
   in init takes it after init). */
static int takes(const EWorker *w) {
  if (w->host) /* once its agent runs */
    return w->state == W_IDLE && w->nq == 0;
  return (w->state == W_IDLE || w->state == W_STARTING) && w->nq == 0;
}

/* Whether some job has everything handed out (nothing to wait for). */
static int alldrained(Engine *e) {
  Job *j;
  for (j = e->jobs; j; j = j->nextjob)
    if (!lpar_job_drained(j))
      return 0;
  return 1;
}

/*
** Give every idle worker a chunk of the oldest job with work left. Then,
** if there is still work, give busy workers whose items are quick a second
** chunk of their job. An engine that retires its workers lets the idle
** ones go once every item is handed out.
*/
void lpar_deal_dispatch(Ctx *c) {
  Engine *e = c->e;
  Job *j = e->waited;
  int i, juv = 0;
  lua_State *L = c->L;
  int top = lua_gettop(L);
  /* the job the caller waits for goes first (a side job waited for in
     the body of another's loop must not queue behind it) */
  for (i = 0; j && i < e->o.n && lpar_job_workleft(j) && j->state == J_RUNNING;
       i++) {
    EWorker *w = &e->w[i];
    if (!takes(w) || (w->host && j->o.inherit))
      continue;
    if (juv == 0)
      juv = lpar_job_pushuv(c, j);
    lpar_deal_assign(c, w, j, juv);
  }
  lua_settop(L, top);
  juv = 0;
  j = e->jobs;
  for (i = 0; i < e->o.n && j; i++) {
    EWorker *w = &e->w[i];
    if (!takes(w))
      continue;
    while (j && !lpar_job_workleft(j)) {
      j = j->nextjob;
      juv = 0;
      lua_settop(L, top);
    }
    if (j == NULL)
      break;
    if (w->host && j->o.inherit) /* items a host cannot have */
      continue;
    if (juv == 0)
      juv = lpar_job_pushuv(c, j);
    lpar_deal_assign(c, w, j, juv);
    if (j->state != J_RUNNING) { /* it failed meanwhile */
      j = e->jobs;
      juv = 0;
      lua_settop(L, top);
    }
  }
  lua_settop(L, top);
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (prefetch(e, w, lpar_proc_now())) {
      lpar_deal_assign(c, w, w->job, lpar_job_pushuv(c, w->job));
      lua_settop(L, top);
    }
  }
  if (e->o.retire && alldrained(e))
    for (i = 0; i < e->o.n; i++) {
      EWorker *w = &e->w[i];
      if (w->state == W_IDLE && w->nq == 0)
        lpar_place_retire(c, w);
    }
}

/*
** Whether job j has an item to hand out. A stream that has none at hand
** is asked for its next one (kept in flight, handed out first), so that
** no worker starts for items that do not exist.
*/
static int hasitem(Ctx *c, Job *j) {
  lua_State *L = c->L;
  int top = lua_gettop(L);
  if (!lpar_job_workleft(j))
    return 0;
  if (!j->stream || j->redo.n > 0)
    return 1;
  if (lpar_job_mayblock(j) && lpar_job_emittable(j)) /* it goes back first */
    return 0;
  if (lpar_job_askiter(c, j, lpar_job_pushuv(c, j)) > 0)
    lpar_engine_nomem(
        L, lpar_ranges_add(&j->redo, j->n, 1)); /* handed out first */
  lua_settop(L, top);
  return j->state == J_RUNNING && j->redo.n > 0;
}

/* Whether the engine is broken (no worker will start). */
int lpar_deal_broken(Ctx *c) {
  int b = lua_rawgeti(c->L, c->uv, EU_BROKEN) != LUA_TNIL;
  lua_pop(c->L, 1);
  return b;
}

/* Fork a worker into the first empty place; 0 or -errno, *call set. */
int lpar_deal_spawnone(Ctx *c, const char **call) {
  int i;
  for (i = 0; i < lpar_host_nlocal(c->e); i++)
    if (c->e->w[i].state == W_EMPTY)
      return lpar_place_spawn(c, i, call);
  return 0;
}

/*
** Start workers: in every empty place (an engine that keeps them all), or
** one when none is running and there is work (an engine that starts them
** on demand; more follow in pump()). The first fork checks max_memory
** against the caller's heap, which the worker inherits; a replacement
** checks for itself, and says so as its init's failure.
*/
void lpar_deal_refill(Ctx *c) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int i, rc = 0;
  const char *call = "fork";
  Job *j;
  if (e->closed || lpar_deal_broken(c))
    return;
  if (e->o.nhosts > 0) {
    lpar_host_refill(c);
    if (lpar_deal_broken(c) || lpar_host_nlocal(e) == 0)
      return;
  }
  if (e->o.ondemand) {
    if (e->live > 0)
      return;
    for (j = e->jobs; j && !hasitem(c, j); j = j->nextjob)
      ;
    if (j == NULL)
      return;
  }
  else if (e->live == lpar_host_nlocal(e))
    return;
  if (e->o.maxmem > 0 && e->forks == 0 &&
      lpar_worker_checkheap(L, e->o.maxmem)) {
    lpar_place_breakengine(c, LPAR_KMEMORY);
    return;
  }
  if (e->o.ondemand)
    rc = lpar_deal_spawnone(c, &call);
  else
    for (i = 0; i < lpar_host_nlocal(e); i++)
      if (e->w[i].state == W_EMPTY) {
        int r = lpar_place_spawn(c, i, &call);
        if (r != 0)
          rc = r;
      }
  if (e->live == 0 && rc != 0) {
    lua_pushfstring(L, "cannot start a worker: %s: %s", call, strerror(-rc));
    lpar_place_breakengine(c, LPAR_KINIT);
  }
}

/* Time per item as the shared slots show it before any results came
   back: from a worker past the first item of its chunk; 0 if none is. */
static double slotestimate(Engine *e, long long now) {
  double est = 0;
  int i;
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->state != W_EMPTY && w->nq > 0) {
      double per = lpar_policy_slotrate(now - w->started, w->q[0].first,
                                        (lua_Integer)e->slots[i].item);
      if (per > est)
        est = per;
    }
  }
  return est;
}

/* For an engine that starts workers on demand: the job another worker
   would serve now (none busy takes more, and a job has items to hand
   out), or NULL. lpar_deal_spawnwait says whether to start it yet. */
Job *lpar_deal_canspawn(Ctx *c) {
  Engine *e = c->e;
  Job *j;
  int i;
  if (!e->o.ondemand || e->closed || e->live == 0 || e->live >= e->cap)
    return NULL;
  for (i = 0; i < e->o.n; i++)
    if (takes(&e->w[i]))
      return NULL;
  for (j = e->jobs; j && !hasitem(c, j); j = j->nextjob)
    ;
  return j;
}

int lpar_deal_spawnwait(Ctx *c) {
  Engine *e = c->e;
  SchedSpawn s;
  Job *j = lpar_deal_canspawn(c);
  if (j == NULL)
    return -1;
  s.now = lpar_proc_now();
  /* per item: a batched job's items are batches of chunksize records */
  s.tns =
      j->tns > 0
          ? j->tns * (j->o.batched ? (double)lpar_deal_chunksize(e, j) : 1.0)
          : slotestimate(e, s.now);
  s.left = lpar_job_itemsleft(j);
  s.live = e->live;
  s.pns = e->pns;
  s.pitems = e->pitems;
  s.worthns = LPAR_FORKWORTHNS;
  s.wavegap = LPAR_SPAWNWAITNS;
  return lpar_policy_spawn(&s, &e->wave);
}
