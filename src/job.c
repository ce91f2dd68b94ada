/*
** job.c: items and their lifecycle: sources, chunks, retries, results in
** order, events.
*/
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "codec.h"
#include "engstate.h"
#include "kind.h"
#include "lcompat.h"
#include "worker.h"

/* what an iterator returns for "no item yet" (its address) */
static const char pendingkey = 0;

void lpar_engine_pushpending(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&pendingkey);
}

static void waitpending(lua_State *L, int fdidx);

void lpar_engine_nextitem(lua_State *L, int iter) {
  iter = lua_absindex(L, iter);
  for (;;) {
    lua_pushvalue(L, iter);
    lua_call(L, 0, 2);
    if (lua_touserdata(L, -2) != &pendingkey) {
      lua_pop(L, 1);
      return;
    }
    waitpending(L, lua_gettop(L));
    lua_pop(L, 2);
  }
}

static void waitpending(lua_State *L, int fdidx) {
  int isfd;
  lua_Integer fd = lua_tointegerx(L, fdidx, &isfd);
  struct pollfd p;
  if (!isfd || fd < 0 || fd > INT32_MAX)
    return;
  p.fd = (int)fd;
  p.events = POLLIN;
  p.revents = 0;
  if (poll(&p, 1, -1) == -1 && errno != EINTR)
    luaL_error(L, "cannot wait on fd %d for the items iterator: %s", (int)fd,
               strerror(errno));
}

/* ---- jobs ---- */

/* Push job j (from the anchors) and its uservalue; returns the index of
   the uservalue. */
int lpar_job_pushuv(Ctx *c, Job *j) {
  lua_State *L = c->L;
  lua_rawgeti(L, c->uv, EU_ANCHORS);
  lua_rawgetp(L, -1, j);
  lua_remove(L, -2);
  lua_getiuservalue(L, -1, 1);
  return lua_gettop(L);
}

void lpar_job_free(Job *j) {
  lpar_ranges_free(&j->redo);
  lpar_buf_free(&j->call);
  lpar_buf_free(&j->hostcall);
}

/* Stop watching j's wakefd. */
void lpar_job_unwatchwake(Engine *e, Job *j) {
  if (lpar_loop_active(&j->wakew)) {
    lpar_loop_stop(&e->loop, &j->wakew);
    lpar_proc_closefd(&j->wakefd); /* a copy of the iterator's fd */
  }
}

/* Take finished job j out of the engine's list and anchors. */
static void detach(Ctx *c, Job *j) {
  lua_State *L = c->L;
  Engine *e = c->e;
  Job **pp;
  int i;
  for (pp = &e->jobs; *pp && *pp != j; pp = &(*pp)->nextjob)
    ;
  if (*pp == NULL)
    return;
  *pp = j->nextjob;
  if (e->lastjob == j) {
    Job *k;
    e->lastjob = NULL;
    for (k = e->jobs; k; k = k->nextjob)
      e->lastjob = k;
  }
  j->nextjob = NULL;
  lpar_job_unwatchwake(e, j);
  for (i = 0; i < e->o.n; i++)
    if (e->w[i].job == j)
      e->w[i].job = NULL;
  if (j->state == J_DONE && j->tns > 0) { /* remember for the next job */
    int uv = lpar_job_pushuv(c, j);
    lua_rawgeti(L, c->uv, EU_TNS);
    lua_rawgeti(L, uv, JU_F);
    lua_pushnumber(L, (lua_Number)j->tns);
    lua_rawset(L, -3);
    lua_pop(L, 3);
  }
  lua_rawgeti(L, c->uv, EU_ANCHORS);
  lua_pushnil(L);
  lua_rawsetp(L, -2, j);
  lua_pop(L, 1);
  lpar_job_free(j);
}

static void tellend(Ctx *c, Job *j, int juv, lua_Integer i, int eidx, int code,
                    lua_Integer ok, lua_Integer failed, lua_Integer again);

static int byitem(const void *a, const void *b) {
  lua_Integer x = *(const lua_Integer *)a, y = *(const lua_Integer *)b;
  return (x > y) - (x < y);
}

/* The items of job j (with on_event) that started and did not end (on
   its workers, or sent back unrun) end as cancelled, with message 'why',
   in item order. */
static void tellstarted(Ctx *c, Job *j, const char *why) {
  lua_State *L = c->L;
  int uv = lpar_job_pushuv(c, j);
  lua_Integer *items = NULL;
  size_t n = 0, cap = 0, k;
  lua_pushstring(L, why);
  lua_rawgeti(L, uv, JU_STARTS);
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) { /* the keys first: on_event may start more */
    lua_pop(L, 1);
    if (n == cap) {
      lua_Integer *p;
      cap = cap ? 2 * cap : 16;
      p = realloc(items, cap * sizeof *items);
      if (p == NULL) {
        free(items);
        lpar_engine_nomem(L, 1);
      }
      items = p;
    }
    items[n++] = lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  if (n > 1)
    qsort(items, n, sizeof *items, byitem);
  for (k = 0; k < n && j->o.onevent; k++)
    tellend(c, j, uv, items[k], uv + 1, LPAR_KCANCELLED, -1, 0, 0);
  free(items);
  lua_settop(L, uv - 2);
}

/* Worker w stops the chunks of its job it holds: a host's agent is told
   to (a host costs a connection) and says READY for each; a local worker
   is killed and replaced. */
static void stopchunks(Ctx *c, EWorker *w) {
  if (w->host) {
    w->job = NULL;
    if (w->proc.cmdfd >= 0) { /* a channel that failed ends it later */
      lpar_host_send(c, w, LPAR_FCANCEL, 0, NULL, 0);
      lpar_place_sendsome(c->e, w);
    }
  }
  else
    lpar_place_drop(c->e, w);
}

/*
** Job j ends with the error value at the top of the stack (popped) as its
** failure, of kind 'code' (kind.h). Workers still running its chunks are
** killed and replaced, but 'self', which skips the rest of its chunk by
** itself (unless it holds another chunk of the job); what it sends until
** it is idle is dropped.
*/
void lpar_job_end(Ctx *c, Job *j, int state, EWorker *self, int code) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int i, uv;
  if (j->state != J_RUNNING) {
    lua_pop(L, 1);
    return;
  }
  uv = lpar_job_pushuv(c, j);
  lua_pushvalue(L, uv - 2);
  lua_rawseti(L, uv, JU_FAILURE);
  lua_pop(L, 3);
  j->state = state;
  j->failcode = code;
  e->ended = 1;
  e->vacated = 1;                           /* a wait for it must not block */
  if (state == J_CANCELLED && j->o.onevent) /* the items started end so */
    tellstarted(c, j, "cancelled");
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    if (w->job != j)
      continue;
    if (w == self && !w->host && w->nq == 1)
      w->job = NULL; /* it skips the rest and says READY */
    else
      stopchunks(c, w);
  }
  detach(c, j);
}

void lpar_job_fail(Ctx *c, Job *j, EWorker *self, int code) {
  lpar_job_end(c, j, J_FAILED, self, code);
}

/*
** Jobs halted now (lpar_engine_halt): the chunks their workers run go back
** to them unrun (a halting job hands nothing out again), their workers
** killed and replaced, a host's agent told to stop them. Run where no
** frame of a worker is being read: from the pump, between its steps.
*/
void lpar_job_stopnow(Ctx *c) {
  Engine *e = c->e;
  Job *j, *next;
  int i;
  e->haltnow = 0;
  for (j = e->jobs; j; j = next) {
    next = j->nextjob;
    if (j->state != J_RUNNING || !j->haltnow)
      continue;
    j->haltnow = 0;
    if (j->o.onevent) { /* the items running end, as cancelled */
      tellstarted(c, j, "halted");
      if (j->state != J_RUNNING) /* its on_event failed it */
        continue;
    }
    for (i = 0; i < e->o.n; i++) {
      EWorker *w = &e->w[i];
      if (w->job != j || w->nq == 0)
        continue;
      lpar_place_giveback(c, w, 0);
      stopchunks(c, w);
    }
    e->vacated = 1;
    lpar_job_settle(c, j);
  }
}

/* Whether every item of j is reported. */
static int complete(Job *j) {
  if (j->halting) /* what was handed out is in (a table's others too) */
    return j->done + j->redo.items + (j->stream ? 0 : j->n - j->next + 1) ==
           j->n + j->nkids;
  return j->done == j->n + j->nkids &&
         (!j->stream || (j->exhausted && j->redo.n == 0));
}

/* Job j is over if all its items are reported. */
static void unhold(Ctx *c, Job *j);

void lpar_job_settle(Ctx *c, Job *j) {
  if (j->state == J_RUNNING && complete(j)) {
    if (j->halting && j->o.onevent) { /* those sent back will not run */
      tellstarted(c, j, "halted");
      if (j->state != J_RUNNING) /* its on_event failed it */
        return;
    }
    if (j->halting)
      unhold(c, j);
    j->state = J_DONE;
    c->e->vacated = 1; /* a wait for it must not block */
    detach(c, j);
  }
}

/*
** Events (o.onevent): on_event(ev) is called as each item is handed to a
** place, ev = {event = "start", item = i, attempt = k, host = spec (nil:
** this machine)}, and as it ends, ev = {event = "end", item, attempt,
** host, status = "ok" | "failed" | "timeout" | "lost", error = message,
** seconds}. For a part of a batch (see "records") item is its batch's
** number and 'at' and 'n' say which records it holds; an end of a
** batched job's item also says how many of its records ended ok, failed
** for good ('failed') or run again ('again'). An error it raises fails the
** job.
*/
/* Push on_event and a new event for item i (start or end); returns the
   event's index. */
static int newevent(Ctx *c, Job *j, int juv, lua_Integer i, int start) {
  lua_State *L = c->L;
  int ev;
  lua_Integer attempt = 1;
  long long now = lpar_proc_now();
  lua_rawgeti(L, juv, JU_ONEVENT);
  lua_createtable(L, 0, 10);
  ev = lua_gettop(L);
  lua_pushstring(L, start ? "start" : "end");
  lua_setfield(L, ev, "event");
  if (i > KIDBASE) {
    lua_rawgeti(L, juv, JU_KIDS);
    if (lua_rawgeti(L, -1, i) == LUA_TTABLE) {
      lua_getfield(L, -1, "root");
      lua_setfield(L, ev, "item");
      lua_getfield(L, -1, "from"); /* in the batch, not its parent part */
      lua_setfield(L, ev, "at");
      lua_getfield(L, -1, "n");
      lua_setfield(L, ev, "n");
      lua_getfield(L, -1, "attempt");
      attempt = lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
  else {
    lua_pushinteger(L, i);
    lua_setfield(L, ev, "item");
  }
  if (!j->o.slice && j->o.retries > 0) { /* the item as a whole runs again */
    lua_rawgeti(L, juv, JU_ATTEMPTS);
    if (lua_istable(L, -1)) {
      lua_rawgeti(L, -1, i);
      attempt = lua_tointeger(L, -1) + 1;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pushinteger(L, attempt);
  lua_setfield(L, ev, "attempt");
  lua_rawgeti(L, juv, JU_STARTS);
  if (start) {
    lua_pushinteger(L, now);
    lua_rawseti(L, -2, i);
  }
  else {
    if (lua_rawgeti(L, -1, i) == LUA_TNUMBER) {
      lua_pushnumber(L, (double)(now - lua_tointeger(L, -1)) / 1e9);
      lua_setfield(L, ev, "seconds");
    }
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
  }
  lua_pop(L, 1);
  return ev;
}

/* Call on_event with the event on top (both popped); an error it raises
   fails the job. */
static void callevent(Ctx *c, Job *j) {
  if (lua_pcall(c->L, 1, 0, 0) != LUA_OK)
    lpar_job_fail(c, j, NULL, lpar_kind_code(c->L, -1));
}

/* Item i was handed to worker w. An item handed out again unblamed (it
   went back with the chunk of a worker that was lost) is not started
   again: its start has had no end, and its end comes once it ran. */
void lpar_job_tellstart(Ctx *c, Job *j, int juv, lua_Integer i, EWorker *w) {
  lua_State *L = c->L;
  int ev, open, top = lua_gettop(L);
  lua_rawgeti(L, juv, JU_STARTS);
  open = lua_istable(L, -1) && lua_rawgeti(L, -1, i) == LUA_TNUMBER;
  lua_settop(L, top);
  if (open)
    return;
  ev = newevent(c, j, juv, i, 1);
  lua_pushinteger(L, (lua_Integer)(w - c->e->w) + 1);
  lua_setfield(L, ev, "place");
  if (w->host) {
    lpar_host_pushspec(L, c->uv, w->host);
    lua_setfield(L, ev, "host");
  }
  callevent(c, j);
}

/* The status an end event gives a failure of kind 'code' (kind.h). */
static const char *endstatus(int code) {
  switch (LPAR_KINDOF(code)) {
  case LPAR_KTIMEOUT:
    return "timeout";
  case LPAR_KSIGNAL:
  case LPAR_KEXIT:
  case LPAR_KLOST:
  case LPAR_KPROTOCOL:
    return "lost";
  case LPAR_KCANCELLED:
  case LPAR_KINTERRUPTED:
    return "cancelled";
  default:
    return "failed";
  }
}

/* Item i ended: its error (nil: none) at 'eidx', of kind 'code' (0: as
   JU_KINDS has it); for a batched job, what became of its records: ok,
   failed for good, run again (-1: not a batched job). */
static void tellend(Ctx *c, Job *j, int juv, lua_Integer i, int eidx, int code,
                    lua_Integer ok, lua_Integer failed, lua_Integer again) {
  lua_State *L = c->L;
  int ev = newevent(c, j, juv, i, 0);
  if (!lua_isnil(L, eidx) && code == 0)
    code = lpar_job_kind(L, juv, i, 0);
  lua_pushstring(L, lua_isnil(L, eidx) ? "ok" : endstatus(code));
  lua_setfield(L, ev, "status");
  if (!lua_isnil(L, eidx)) {
    lpar_kind_push(L, code);
    lua_setfield(L, ev, "detail");
    lua_setfield(L, ev, "kind");
    if (lua_istable(L, eidx))
      lua_getfield(L, eidx, "message");
    else
      lua_pushvalue(L, eidx);
    lua_setfield(L, ev, "error");
  }
  if (c->e->from > 0) {
    lpar_host_pushspec(L, c->uv, c->e->from);
    lua_setfield(L, ev, "host");
  }
  if (ok >= 0) {
    lua_pushinteger(L, ok);
    lua_setfield(L, ev, "ok");
    lua_pushinteger(L, failed);
    lua_setfield(L, ev, "failed");
    lua_pushinteger(L, again);
    lua_setfield(L, ev, "again");
  }
  callevent(c, j);
}

/*
** Records (a batched job with o.slice). A batch is an item, and so is
** each part of a batch run again: a record that failed with retries left
** (alone, its next attempt), the records a batch handed back (its field
** 'rest': it ran past its time), and those of a batch lost with its
** worker (before the record it was running, that record if it has
** retries left, after it). Parts are items from KIDBASE on, handed out
** before fresh ones, so they run in parallel with the rest, on any
** worker. Each has a node in JU_KIDS while it runs: {root = the batch it
** comes from, at = its first record (1-based) in the item it was cut
** from, from = the same in the root batch, n = records, attempt = k};
** when it is reported the node gets
** value, error and host (the spec, nil: this machine), and the nodes of
** its own parts in 'kids'. A batch with parts has a node too ({kids,
** hold = parts not reported}) and is emitted once hold is 0, its parts in
** the field 'kids' of its result ({kids = ...} for a batch lost whole).
** A batch's result is a string (all ran), or a table of strings and
** {k, error} (record k failed) with the field 'rest'.
*/

/* Cut records from..to (run for the 'attempt'th time) of the batch at
   'bidx', of n records, as a new part, child of the node at 'nidx' whose
   root is item 'root' (all of it: the batch itself, not cut). 0, or -1
   with the job failed (slice raised). */
static int addpart(Ctx *c, Job *j, int juv, int bidx, int nidx,
                   lua_Integer root, lua_Integer from, lua_Integer to,
                   lua_Integer n, lua_Integer attempt) {
  lua_State *L = c->L;
  lua_Integer kid = KIDBASE + j->nkids + 1;
  if (from == 1 && to == n)
    lua_pushvalue(L, bidx);
  else {
    lua_rawgeti(L, juv, JU_SLICE);
    lua_pushvalue(L, bidx);
    lua_pushinteger(L, from);
    lua_pushinteger(L, to);
    if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
      lpar_job_fail(c, j, NULL, lpar_kind_code(L, -1));
      return -1;
    }
  }
  j->nkids++;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_insert(L, -2);
  lua_rawseti(L, -2, kid);
  lua_pop(L, 1);
  lua_createtable(L, 0, 8); /* its node */
  lua_pushinteger(L, root);
  lua_setfield(L, -2, "root");
  lua_pushinteger(L, from);
  lua_setfield(L, -2, "at");
  /* its first record in the root batch: the parent's (1 for the batch
     itself) plus 'from' */
  if (lua_istable(L, nidx))
    lua_getfield(L, nidx, "from");
  else
    lua_pushnil(L);
  lua_pushinteger(L, luaL_optinteger(L, -1, 1) + from - 1);
  lua_setfield(L, -3, "from");
  lua_pop(L, 1);
  lua_pushinteger(L, to - from + 1);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, attempt);
  lua_setfield(L, -2, "attempt");
  lua_rawgeti(L, juv, JU_KIDS);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, kid);
  lua_pop(L, 1);
  if (lua_isnil(L, nidx)) { /* a batch's first part: its node */
    lua_newtable(L);
    lua_replace(L, nidx);
  }
  if (lua_getfield(L, nidx, "kids") == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, nidx, "kids");
  }
  lua_insert(L, -2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 1);
  /* a record run again is a suspect: alone, so that losing its worker
     again names it */
  lpar_engine_nomem(L, lpar_ranges_push(&j->redo, kid, 1, attempt > 1));
  return 0;
}

/* The parts of item i (records 1..n, run for the 'attempt'th time; its
   result at 'vidx', its error at 'eidx', its batch at 'bidx', its node at
   'nidx'): how many were made, or -1 with the job failed. */
static lua_Integer addparts(Ctx *c, Job *j, int juv, const int idx[4],
                            lua_Integer root, lua_Integer n,
                            lua_Integer attempt, lua_Integer cnt[2]) {
  lua_State *L = c->L;
  int vidx = idx[0], eidx = idx[1], bidx = idx[2], nidx = idx[3];
  int stop = j->halting; /* nothing more runs */
  int again = !stop && lpar_policy_retry(attempt - 1, j->o.retries);
  /* a failure with retries left when the job halts is not one for good:
     the record is not run again, and neither ok nor failed */
  int pending = stop && lpar_policy_retry(attempt - 1, j->o.retries);
  lua_Integer made = 0, k, x, len, p = 0;
  /* cnt: records failed for good, records in parts */
#define PART(from, to, a)                                                      \
  do {                                                                         \
    if (addpart(c, j, juv, bidx, nidx, root, from, to, n, a) != 0)             \
      return -1;                                                               \
    made++;                                                                    \
    cnt[1] += (to) - (from) + 1;                                               \
  } while (0)
  cnt[0] = cnt[1] = 0;
  if (lua_istable(L, vidx)) {
    len = (lua_Integer)lua_rawlen(L, vidx);
    for (x = 1; x <= len; x++) {
      if (lua_rawgeti(L, vidx, x) == LUA_TTABLE) {
        lua_rawgeti(L, -1, 1);
        k = lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (again && k >= 1 && k <= n) {
          lua_pop(L, 1);
          PART(k, k, attempt + 1);
          continue;
        }
        cnt[pending]++;
      }
      lua_pop(L, 1);
    }
    lua_getfield(L, vidx, "rest");
    k = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (k >= 1 && k <= n && stop)
      cnt[1] += n - k + 1;       /* not run: neither ok nor failed */
    else if (k >= 1 && k <= n) { /* handed back: spread over the places */
      lua_Integer left = n - k + 1, ways = c->e->o.n, size;
      if (ways > left)
        ways = left;
      for (x = 0; x < ways; x++) {
        size = (left - x + ways - 1) / ways; /* sums to 'left' */
        PART(k, k + size - 1, attempt);
        k += size;
      }
    }
    return made;
  }
  if (lua_isnil(L, eidx)) /* ran whole */
    return 0;
  /* lost with its worker, or stopped at its timeout */
  if (lua_istable(L, eidx)) {
    lua_getfield(L, eidx, "record");
    p = lua_tointeger(L, -1);
    lua_pop(L, 1);
  }
  if (stop) { /* the record it ran failed (if known), the others did not run */
    cnt[0] = (p >= 1 && p <= n) || n == 1 ? !pending : 0;
    cnt[1] = n - cnt[0];
    return 0;
  }
  if (p < 1 || p > n) {
    if (n == 1 && again)
      PART(1, 1, attempt + 1);
    else if (n > 1) /* which record did it is not known: each alone */
      for (k = 1; k <= n; k++)
        PART(k, k, attempt);
    else
      cnt[0] = 1;
    return made;
  }
  if (p > 1)
    PART(1, p - 1, attempt);
  if (again)
    PART(p, p, attempt + 1);
  else
    cnt[0] = 1;
  if (p < n)
    PART(p + 1, n, attempt);
#undef PART
  return made;
}

/* Every part of batch 'root' is reported: it may be emitted, its parts in
   its result's field 'kids'. */
static void release(Ctx *c, Job *j, int juv, lua_Integer root) {
  lua_State *L = c->L;
  lua_rawgeti(L, juv, JU_RESULTS);
  if (lua_rawgeti(L, -1, root) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, root);
  }
  lua_rawgeti(L, juv, JU_KIDS);
  lua_rawgeti(L, -1, root);
  lua_getfield(L, -1, "kids");
  lua_setfield(L, -4, "kids");
  lua_pop(L, 1);
  lua_pushnil(L);
  lua_rawseti(L, -2, root);
  lua_pop(L, 3);
  if (j->fin != NULL) {
    j->fin[(root - 1) % LPAR_WINDOW] = 1;
    if (j->o.unordered)
      j->queue[j->qtail++ % LPAR_WINDOW] = root;
  }
}

/*
** Item i of a job with o.slice is reported, its result on top (left
** there): make its parts (see "records"). Returns -1 for a part (its
** node has its outcome; the result must not be stored), 1 for a batch
** that waits for its parts, 0 for a batch that may be emitted.
*/
static int adopt(Ctx *c, Job *j, int juv, lua_Integer i) {
  lua_State *L = c->L;
  int top = lua_gettop(L), idx[4];
  lua_Integer root = i, attempt = 1, n, made, hold, cnt[2];
  idx[0] = top;
  lua_rawgeti(L, juv, JU_KIDS); /* top + 1 */
  if (i > KIDBASE) {
    lua_rawgeti(L, top + 1, i); /* its node */
    lua_getfield(L, -1, "root");
    lua_getfield(L, -2, "attempt");
    lua_getfield(L, -3, "n");
    root = lua_tointeger(L, -3);
    attempt = lua_tointeger(L, -2);
    n = lua_tointeger(L, -1);
    lua_pop(L, 3);
  }
  else {
    lua_pushnil(L); /* its node, made if it gets parts */
    n = j->recs[(i - 1) % LPAR_WINDOW];
  }
  idx[3] = top + 2;
  lua_rawgeti(L, juv, JU_ERRORS);
  lua_rawgeti(L, -1, i);
  lua_remove(L, -2);
  idx[1] = top + 3;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_rawgeti(L, -1, i);
  lua_remove(L, -2);
  idx[2] = top + 4;
  made = addparts(c, j, juv, idx, root, n, attempt, cnt);
  if (made < 0) {
    lua_settop(L, top);
    return i > KIDBASE ? -1 : 0;
  }
  if (j->o.onevent)
    tellend(c, j, juv, i, idx[1], 0, n - cnt[0] - cnt[1], cnt[0], cnt[1]);
  if (i <= KIDBASE) {
    if (made > 0) {
      lua_pushinteger(L, made);
      lua_setfield(L, idx[3], "hold");
      lua_pushvalue(L, idx[3]);
      lua_rawseti(L, top + 1, i);
    }
    lua_settop(L, top);
    return made > 0;
  }
  /* a part: its outcome goes into its node, with its failure's kind */
  lua_pushvalue(L, top);
  lua_setfield(L, idx[3], "value");
  lua_pushvalue(L, idx[1]);
  lua_setfield(L, idx[3], "error");
  if (!lua_isnil(L, idx[1])) {
    lpar_kind_push(L, lpar_job_kind(L, juv, i, 1));
    lua_setfield(L, idx[3], "detail");
    lua_setfield(L, idx[3], "kind");
  }
  if (c->e->from > 0) {
    lpar_host_pushspec(L, c->uv, c->e->from);
    lua_setfield(L, idx[3], "host");
  }
  lua_pushnil(L);
  lua_rawseti(L, top + 1, i);
  lua_rawgeti(L, juv, JU_ERRORS);
  lua_pushnil(L);
  lua_rawseti(L, -2, i);
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_pushnil(L);
  lua_rawseti(L, -2, i);
  lua_rawgeti(L, top + 1, root);
  lua_getfield(L, -1, "hold");
  hold = lua_tointeger(L, -1) + made - 1;
  lua_pushinteger(L, hold);
  lua_setfield(L, -3, "hold");
  lua_settop(L, top);
  if (hold == 0 && j->state == J_RUNNING)
    release(c, j, juv, root);
  return -1;
}

/* A halted job is over: the batches that wait for parts that will not
   run are emitted as they are, and (in order) those never run as not run
   (nil, nil). */
static void unhold(Ctx *c, Job *j) {
  lua_State *L = c->L;
  int top = lua_gettop(L), juv;
  lua_Integer i;
  if (j->fin == NULL)
    return;
  juv = lpar_job_pushuv(c, j);
  if (j->o.slice) {
    lua_rawgeti(L, juv, JU_KIDS);
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
      i = lua_tointeger(L, -2);
      lua_pop(L, 1);
      if (i <= KIDBASE)
        release(c, j, juv, i);
    }
  }
  if (!j->o.unordered)
    for (i = j->emit; i <= j->n; i++)
      j->fin[(i - 1) % LPAR_WINDOW] = 1;
  lua_settop(L, top);
}

/* The value on top is the result of item i of j, whose uservalue is at
   'juv' (popped). */
void lpar_job_store(Ctx *c, Job *j, int juv, lua_Integer i) {
  lua_State *L = c->L;
  int held = 0;
  if (j->pending && !lpar_loop_active(&j->wakew)) /* it waited for a result */
    j->pending = 0;
  if (j->o.onevent && !j->o.slice) {
    lua_rawgeti(L, juv, JU_ERRORS);
    lua_rawgeti(L, -1, i);
    tellend(c, j, juv, i, lua_gettop(L), 0, -1, 0, 0);
    lua_pop(L, 2);
  }
  if (j->o.slice) {
    held = adopt(c, j, juv, i);
    if (held < 0) { /* a part: it went into its batch's node */
      lua_pop(L, 1);
      j->done++;
      c->e->stored++;
      return;
    }
  }
  if (j->stream) {
    lua_rawgeti(L, juv, JU_INFLIGHT);
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
  }
  if (j->where != NULL)
    j->where[(i - 1) % LPAR_WINDOW] = (unsigned short)c->e->from;
  if (j->fin != NULL && !held) {
    j->fin[(i - 1) % LPAR_WINDOW] = 1;
    if (j->o.unordered)
      j->queue[j->qtail++ % LPAR_WINDOW] = i;
  }
  if (lua_isnil(L, -1))
    lua_pop(L, 1);
  else {
    if (!j->sized && !j->stream) {
      /* made now rather than at submit, so that filling it does not copy
         pages the caller shares with workers forked before */
      j->sized = 1;
      lua_createtable(L, j->n < INT32_MAX ? (int)j->n : 0, 0);
      lua_rawseti(L, juv, JU_RESULTS);
    }
    lua_rawgeti(L, juv, JU_RESULTS);
    lua_insert(L, -2);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
  }
  j->done++;
  c->e->stored++;
}

/*
** Item i of job j failed with the error value and traceback at the top of
** the stack (both popped), of kind 'code' (kind.h): run again if it has
** retries left, recorded when collecting, else the job fails with "item
** i: <message>\n<traceback>". 'self' as for lpar_job_end.
*/
void lpar_job_itemfailed(Ctx *c, Job *j, lua_Integer i, EWorker *self,
                         int code) {
  lua_State *L = c->L;
  char prefix[48];
  int uv;
  if (j->o.retries > 0 && !j->o.slice) { /* a batch's records retry alone */
    lua_Integer tries;
    uv = lpar_job_pushuv(c, j);
    if (lua_rawgeti(L, uv, JU_ATTEMPTS) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawseti(L, uv, JU_ATTEMPTS);
    }
    lua_rawgeti(L, -1, i);
    tries = lua_tointeger(L, -1);
    if (lpar_policy_retry(tries, j->o.retries)) {
      if (j->o.onevent) { /* this try ends; the next starts when handed out */
        int top = lua_gettop(L);
        tellend(c, j, uv, i, uv - 3, code, -1, 0, 0);
        lua_settop(L, top);
      }
      lua_pushinteger(L, tries + 1);
      lua_rawseti(L, -3, i);
      lua_pop(L, 6); /* count, attempts, uservalue, job, error, traceback */
      /* it failed before: a suspect, run alone, so that losing its worker
         again names it */
      lpar_engine_nomem(L, lpar_ranges_push(&j->redo, i, 1, 1));
      return;
    }
    lua_pop(L, 4);
  }
  if (j->o.collect) {
    lpar_worker_failure(L, NULL);
    uv = lpar_job_pushuv(c, j);
    lua_rawgeti(L, uv, JU_ERRORS);
    lua_pushvalue(L, uv - 2);
    lua_rawseti(L, -2, i);
    lua_pop(L, 1);
    if (code != LPAR_KERROR) { /* the kinds of failures but Lua errors */
      if (lua_rawgeti(L, uv, JU_KINDS) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_rawseti(L, uv, JU_KINDS);
      }
      lua_pushinteger(L, code);
      lua_rawseti(L, -2, i);
      lua_pop(L, 1);
    }
    lua_pushnil(L);
    lpar_job_store(c, j, uv, i);
    j->failed++;
    lua_pop(L, 3);
    lpar_job_settle(c, j);
    return;
  }
  snprintf(prefix, sizeof prefix, "item %lld: ", (long long)i);
  lpar_worker_failure(L, prefix);
  lpar_job_fail(c, j, self, code);
}

/* Items of j handed out so far, fresh ones only. */
static lua_Integer handed(Job *j) {
  return j->stream ? j->n : j->next - 1;
}

/* How many more fresh items j may hand out now: results waiting to be
   taken (imap), or a stream's items in flight, stay within
   LPAR_WINDOW. */
lua_Integer lpar_job_room(Job *j) {
  lua_Integer left = j->stream ? LPAR_WINDOW : j->n - j->next + 1;
  lua_Integer win =
      LPAR_WINDOW - (handed(j) - (j->fin ? j->emit - 1 : j->done));
  if (j->fin || j->stream)
    return win < left ? win : left;
  return left;
}

int lpar_job_workleft(Job *j) {
  if (j->state != J_RUNNING || j->halting)
    return 0;
  if (j->redo.n > 0)
    return 1;
  if (j->stream)
    return !j->exhausted && !j->pending && lpar_job_room(j) > 0;
  return j->next <= j->n && lpar_job_room(j) > 0;
}

/* Whether j has handed out every item (none left to hand out again). */
int lpar_job_drained(Job *j) {
  return j->redo.n == 0 && (j->stream ? j->exhausted : j->next > j->n);
}

/* Items of j not handed out yet (fresh or again); -1: unknown. */
lua_Integer lpar_job_itemsleft(Job *j) {
  if (j->stream)
    return j->exhausted ? j->redo.items : -1;
  return j->n - j->next + 1 + j->redo.items;
}

/* lua_CFunction: (iterator [, want]) -> its next item and what follows
   it (the fd after lpar.pending; a batch's record count), under
   lua_pcall. */
static int callnext(lua_State *L) {
  lua_call(L, lua_gettop(L) - 1, 2);
  return 2;
}

/* Items of stream j handed out and not reported yet. */
static lua_Integer inflight(Job *j) {
  return j->n + j->nkids - j->done - j->redo.items;
}

/* Whether j's items come from an iterator that may block (one with no
   wakefd, not said to be nonblocking) and its results are taken one by
   one (imap): then it is not asked while a result is ready to go back
   (see pollfirst), nor for a busy worker's second chunk. */
int lpar_job_mayblock(const Job *j) {
  return j->stream && j->fin != NULL && j->o.wakefd < 0 && !j->o.nonblocking &&
         !j->exhausted;
}

/* Stream j's iterator returned lpar.pending, with what follows it at
   'fdidx': pulling waits until that fd (else the job's wakefd) is
   readable, or a result is taken (one in flight, or one done that the
   caller has still to take). 0, or -1 if there is nothing to wait for
   (the job failed). */
static int pending(Ctx *c, Job *j, int fdidx) {
  lua_State *L = c->L;
  int isfd, d, rc;
  lua_Integer fd = lua_tointegerx(L, fdidx, &isfd);
  if (!isfd || fd < 0 || fd > INT32_MAX)
    fd = j->o.wakefd;
  if (fd < 0) {
    if (inflight(j) == 0 && !(j->fin != NULL && lpar_job_emittable(j))) {
      lua_pushliteral(L, "the items iterator returned lpar.pending with no "
                         "fd to wait on and no result to wait for");
      lpar_job_fail(c, j, NULL, LPAR_KERROR);
      return -1;
    }
    j->pending = 1; /* asked again as a result comes */
    return 0;
  }
  if (lpar_loop_active(&j->wakew) && j->wakesrc == fd) {
    j->pending = 1;
    return 0;
  }
  lpar_job_unwatchwake(c->e, j);
  /* a copy is watched: the same fd may be another job's too */
  d = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) {
    lua_pushfstring(L, "cannot wait on fd %d for the items iterator: %s",
                    (int)fd, strerror(errno));
    lpar_job_fail(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  rc = lpar_loop_start(&c->e->loop, &j->wakew, d, EPOLLIN);
  if (rc == -EPERM) { /* a regular file: always readable, ask again */
    close(d);
    c->e->vacated = 1; /* the pump looks again without waiting */
    return 1;
  }
  if (rc != 0) {
    close(d);
    lua_pushfstring(L, "cannot wait on fd %d for the items iterator: %s",
                    (int)fd, strerror(-rc));
    lpar_job_fail(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  lpar_proc_track(d);
  j->wakefd = d;
  j->wakesrc = (int)fd;
  j->pending = 1;
  return 0;
}

/*
** Whether the iterator at 'idx' reads a Lua file (file:lines, io.lines):
** a C closure whose first upvalue is an open file. Then its fd goes in
** *fd, and the file is returned, so that the engine waits for the fd
** rather than ask the iterator while nothing can be read (see
** fileready): results that are ready go back meanwhile. NULL if not, or
** where stdio's buffer cannot be seen (not glibc).
*/
luaL_Stream *lpar_job_fileiter(lua_State *L, int idx, int *fd) {
#if defined(__GLIBC__)
  luaL_Stream *s = NULL;
  if (lua_iscfunction(L, idx) && lua_getupvalue(L, idx, 1) != NULL) {
    s = luaL_testudata(L, -1, LUA_FILEHANDLE);
    lua_pop(L, 1);
    if (s != NULL && (LPAR_STREAMCLOSED(s) || s->f == NULL || fileno(s->f) < 0))
      s = NULL;
    if (s != NULL)
      *fd = fileno(s->f);
  }
  return s;
#else
  (void)L, (void)idx, (void)fd;
  return NULL;
#endif
}

/* Whether reading file s (fd 'fd') can give bytes without waiting: stdio
   holds some, or the fd is readable (or at its end); a closed file too
   (its iterator says so). */
static int fileready(luaL_Stream *s, int fd) {
#if defined(__GLIBC__)
  struct pollfd p;
  int n;
  if (LPAR_STREAMCLOSED(s) || s->f->_IO_read_ptr < s->f->_IO_read_end)
    return 1;
  p.fd = fd;
  p.events = POLLIN;
  do
    n = poll(&p, 1, 0);
  while (n == -1 && errno == EINTR);
  return n != 0;
#else
  (void)s, (void)fd;
  return 1;
#endif
}

/*
** Ask stream j (uservalue at 'juv') for its next item: 1 with the item
** pushed (counted, and kept in flight); 0 with nothing pushed when it has
** ended or has none yet (lpar.pending); -1 when it raised or waits on an
** fd that cannot be (the job failed).
*/
int lpar_job_askiter(Ctx *c, Job *j, int juv) {
  lua_State *L = c->L;
  lua_Integer weight = 1;
  if (j->file != NULL && !fileready(j->file, j->o.wakefd)) {
    int rc;
    lua_pushnil(L); /* no fd of its own: the file's */
    rc = pending(c, j, lua_gettop(L));
    lua_pop(L, 1);
    if (rc <= 0)
      return rc;
  }
  lua_pushcfunction(L, callnext);
  lua_rawgeti(L, juv, JU_ITEMS);
  if (j->o.batched)
    lua_pushinteger(L, lpar_deal_chunksize(c->e, j));
  if (lua_pcall(L, j->o.batched ? 2 : 1, 2, 0) != LUA_OK) {
    lpar_job_fail(c, j, NULL, lpar_kind_code(L, -1));
    return -1;
  }
  lua_insert(L, -2); /* the item on top, what follows it below */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 2);
    j->exhausted = 1;
    lpar_job_unwatchwake(c->e, j);
    lpar_job_settle(c, j); /* its items may all be in */
    return 0;
  }
  if (lua_touserdata(L, -1) == &pendingkey) {
    int rc = pending(c, j, lua_gettop(L) - 1);
    lua_pop(L, 2);
    return rc < 0 ? -1 : 0;
  }
  if (j->o.batched) {
    int isnum;
    weight = lua_tointegerx(L, -2, &isnum);
    if (!isnum || weight < 1) {
      const char *got = luaL_tolstring(L, -2, NULL);
      lua_pushfstring(L,
                      "the items iterator (batched) gave %s as the record "
                      "count of its batch %I, not a positive integer",
                      got, (LUAI_UACINT)(j->n + 1));
      lua_replace(L, -4);
      lua_pop(L, 2);
      lpar_job_fail(c, j, NULL, LPAR_KERROR);
      return -1;
    }
  }
  lua_remove(L, -2);
  j->n++;
  if (j->recs != NULL)
    j->recs[(j->n - 1) % LPAR_WINDOW] = weight;
  lua_rawgeti(L, juv, JU_INFLIGHT);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, j->n);
  lua_pop(L, 1);
  return 1;
}

/* Encode item i, on top, into w->out and pop it: 0; or -1 with the job
   failed, naming the item. */
static int encodeitem(Ctx *c, Job *j, EWorker *w, lua_Integer i) {
  lua_State *L = c->L;
  if (lpar_codec_encode(L, -1, &w->out) != 0) {
    lua_pushfstring(L, "item %I: cannot send item: %s", (LUAI_UACINT)i,
                    lua_tostring(L, -1));
    lua_replace(L, -3);
    lua_pop(L, 1);
    lpar_job_fail(c, j, NULL, LPAR_KERROR);
    return -1;
  }
  lua_pop(L, 1);
  return 0;
}

/*
** Pull up to 'max' fresh items of stream j (uservalue at juv) into w->out;
** returns how many, or -1 if the job failed (the iterator raised, or an
** item cannot be sent).
*/
lua_Integer lpar_job_pull(Ctx *c, Job *j, int juv, EWorker *w,
                          lua_Integer max) {
  lua_Integer k = 0;
  while (k < max && !j->exhausted && !j->pending && lpar_job_room(j) > 0 &&
         !(lpar_job_mayblock(j) && lpar_job_emittable(j))) {
    int rc = lpar_job_askiter(c, j, juv);
    if (rc <= 0)
      return rc < 0 ? -1 : k;
    if (encodeitem(c, j, w, j->n) != 0)
      return -1;
    k++;
  }
  return k;
}

/* The kind code of failed item i of the job whose uservalue is at 'juv'
   (LPAR_KERROR if none was kept); with 'take', taken out of the job's
   kinds. */
int lpar_job_kind(lua_State *L, int juv, lua_Integer i, int take) {
  int code = LPAR_KERROR;
  if (lua_rawgeti(L, juv, JU_KINDS) == LUA_TTABLE) {
    if (lua_rawgeti(L, -1, i) == LUA_TNUMBER)
      code = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (take) {
      lua_pushnil(L);
      lua_rawseti(L, -2, i);
    }
  }
  lua_pop(L, 1);
  return code;
}

/* Records in part k (see "records"). */
lua_Integer lpar_job_partsize(Ctx *c, int juv, lua_Integer k) {
  lua_Integer n;
  lua_rawgeti(c->L, juv, JU_KIDS);
  lua_rawgeti(c->L, -1, k);
  lua_getfield(c->L, -1, "n");
  n = lua_tointeger(c->L, -1);
  lua_pop(c->L, 3);
  return n > 0 ? n : 1;
}

/* Encode items first .. first+count-1 of the table at 'tidx' into
   w->out; 0, or -1 with the job failed. */
int lpar_job_putitems(Ctx *c, Job *j, int tidx, EWorker *w, lua_Integer first,
                      lua_Integer count) {
  lua_State *L = c->L;
  lua_Integer i;
  for (i = first; i < first + count; i++) {
    lua_geti(L, tidx, i);
    if (encodeitem(c, j, w, i) != 0)
      return -1;
  }
  return 0;
}

/* Whether the next result of emitting job j may be taken. */
int lpar_job_emittable(Job *j) {
  if (j->o.unordered)
    return j->qhead < j->qtail;
  return j->emit <= j->n && j->fin[(j->emit - 1) % LPAR_WINDOW];
}
