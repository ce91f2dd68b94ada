/*
** place.c: one local worker process as a state machine (spawn, ready,
** busy, lost, retired), its deadlines, and what goes when one is lost.
*/
#include "engine.h"

#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "engstate.h"
#include "hosts.h"
#include "kind.h"
#include "lcompat.h"
#include "lpar.h"
#include "worker.h"

/* ---- fds and processes ---- */

/*
** While the engine works, SIGCHLD is deliverable even if the caller
** ignores it, or the kernel would reap ended workers before their exit
** status is read. The caller's action is back when the outermost call
** returns.
*/
void lpar_place_holdchld(Engine *e) {
  if (e->chld++ == 0)
    e->heldchld = lpar_proc_holdchld(&e->oldchld);
}

void lpar_place_releasechld(Engine *e) {
  if (--e->chld == 0 && e->heldchld) {
    sigaction(SIGCHLD, &e->oldchld, NULL);
    e->heldchld = 0;
  }
}

/* Reap the killed workers that have ended ('block': wait for all). */
void lpar_place_reapdying(Engine *e, int block) {
  int i = 0, status;
  while (i < e->ndying) {
    if (lpar_proc_wait(e->dying[i], &status, block) != 0)
      e->dying[i] = e->dying[--e->ndying];
    else
      i++;
  }
}

/* Close a worker's channel, leaving its pid (and pidfd, no longer
   watched) in place. */
void lpar_place_close(Engine *e, EWorker *w) {
  lpar_loop_stop(&e->loop, &w->resw);
  lpar_loop_stop(&e->loop, &w->pidw);
  lpar_loop_stop(&e->loop, &w->cmdw);
  lpar_proc_close(&w->proc);
  w->in.n = 0;
  w->out.n = w->outpos = 0;
}

/* Empty w's place (its process is someone else's business now). */
void lpar_place_vacate(Engine *e, EWorker *w) {
  e->vacated = 1; /* the pump fills it before it waits */
  w->proc.pid = 0;
  w->state = W_EMPTY;
  w->job = NULL;
  w->nq = 0;
  if (!w->host)
    e->live--;
}

/* Kill worker w and empty its place; it is reaped later. */
void lpar_place_drop(Engine *e, EWorker *w) {
  pid_t pid = w->proc.pid;
  lpar_place_close(e, w);
  lpar_proc_killproc(&w->proc, SIGKILL);
  lpar_proc_closepid(&w->proc);
  if (e->ndying == e->capdying) {
    int cap = e->capdying ? 2 * e->capdying : 8;
    pid_t *d = realloc(e->dying, (size_t)cap * sizeof(pid_t));
    if (d == NULL) { /* cannot defer: reap it now */
      lpar_proc_wait(pid, &(int){0}, 1);
      pid = 0;
    }
    else {
      e->dying = d;
      e->capdying = cap;
    }
  }
  if (pid != 0)
    e->dying[e->ndying++] = pid;
  lpar_place_vacate(e, w);
}

/* Let idle worker w go: end of file on its channel makes it leave, and
   it exits (running close) while the others finish. It is reaped when
   the engine closes. */
void lpar_place_retire(Ctx *c, EWorker *w) {
  Engine *e = c->e;
  if (e->nretired == e->capretired) {
    int cap = e->capretired ? 2 * e->capretired : 8;
    Proc *p = realloc(e->retired, (size_t)cap * sizeof(Proc));
    lpar_engine_nomem(c->L, p == NULL);
    e->retired = p;
    e->capretired = cap;
  }
  lpar_place_close(e, w);
  e->retired[e->nretired++] = w->proc; /* keeps the pid and pidfd */
  w->proc.pidfd = -1;
  lpar_place_vacate(e, w);
}

/* Drop the results of every job (in a freshly forked worker: they are
   the caller's, not the worker's heap). */
static void dropresults(Ctx *c) {
  lua_State *L = c->L;
  Job *j;
  for (j = c->e->jobs; j; j = j->nextjob) {
    lua_rawgeti(L, c->uv, EU_ANCHORS);
    if (lua_rawgetp(L, -1, j) == LUA_TUSERDATA) {
      lua_getiuservalue(L, -1, 1);
      lua_pushnil(L);
      lua_rawseti(L, -2, JU_RESULTS);
      lua_pushnil(L);
      lua_rawseti(L, -2, JU_ERRORS);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
}

/* Place i has a fresh process, w: start its conversation, watching its
   channel and its end. 0, or -errno with *call naming the call that
   failed (then it is dropped). */
int lpar_place_start(Engine *e, EWorker *w, const char **call) {
  int rc;
  w->state = W_STARTING;
  w->job = NULL;
  w->fnjob = 0;
  w->fresh = 0;
  w->nq = 0;
  w->got = w->busy = 0;
  w->in.n = 0;
  w->out.n = w->outpos = 0;
  w->timedout = 0;
  w->blame = 0;
  w->killat = 0;
  w->hello = 0;
  w->hostn = 0;
  w->rtt = 0;
  w->lastread = lpar_proc_now();
  /* timed beats begin once its agent runs: the first would measure the
     connection's start */
  w->probeat = w->lastread + LPAR_HOSTSTARTNS;
  rc = lpar_loop_start(&e->loop, &w->resw, w->proc.resfd, EPOLLIN);
  if (rc == 0 && w->proc.pidfd >= 0) /* its end, whoever holds its pipe */
    rc = lpar_loop_start(&e->loop, &w->pidw, w->proc.pidfd, EPOLLIN);
  if (rc != 0) {
    *call = "epoll_ctl";
    lpar_place_drop(e, w);
  }
  return rc;
}

/* What a child of e starts with: the caller's signal mask (the one in
   force now, or the one a wait replaced, in 'cur'), SIGINT as 'ignint'
   says. */
ChildSetup lpar_place_childsetup(Engine *e, sigset_t *cur, int ignint) {
  ChildSetup cs;
  cs.mask = lpar_loop_callermask(&e->loop, cur);
  cs.ignint = ignint;
  return cs;
}

/*
** The buffers of the other places (bytes on their way to a worker or
** from it: a long item, a long result) are left out of a fork: a worker
** forked while lpar sends a long line to another has no use for its
** bytes, and would count them in its memory. Before the fork (child 0)
** they are marked; in the child (1) the large ones are forgotten, never
** freed nor read: their pages are not there.
*/
static void sparebufs(Engine *e, int child) {
  int i;
  for (i = 0; i < e->o.n; i++) {
    Buf *b[2];
    int k;
    b[0] = &e->w[i].out;
    b[1] = &e->w[i].in;
    for (k = 0; k < 2; k++) {
      if (b[k]->cap < LPAR_BUFMAP)
        continue;
      if (child)
        *b[k] = (Buf){NULL, 0, 0};
      else
        lpar_buf_nofork(b[k]);
    }
  }
}

/* Fork a worker into empty place i; 0, or -errno with *call naming the
   call that failed. */
int lpar_place_spawn(Ctx *c, int i, const char **call) {
  lua_State *L = c->L;
  Engine *e = c->e;
  EWorker *w = &e->w[i];
  sigset_t cur;
  ChildSetup cs = lpar_place_childsetup(e, &cur, e->o.ignint);
  pid_t pid;
  e->slots[i].item = 0;
  lpar_ring_unmap(&w->ring); /* the last worker in this place is gone */
  if (lpar_ring_map(&w->ring, LPAR_RINGSIZE) != 0)
    w->ring.base = NULL; /* no ring: every frame takes the pipe */
  lua_rawgeti(L, c->uv, EU_FNS);
  lua_rawgeti(L, c->uv, EU_ITEMS);
  lua_rawgeti(L, c->uv, EU_INIT);
  lua_rawgeti(L, c->uv, EU_CLOSE);
  sparebufs(e, 0);
  pid = lpar_proc_fork(&w->proc, &cs, call);
  if (pid == 0) {
    WorkerArgs a;
    int top = lua_gettop(L);
    sparebufs(e, 1);
    dropresults(c);
    a.cmdfd = w->proc.cmdfd;
    a.resfd = w->proc.resfd;
    a.fnsidx = lua_isnil(L, top - 3) ? 0 : top - 3;
    a.itemsidx = lua_isnil(L, top - 2) ? 0 : top - 2;
    a.initidx = lua_isnil(L, top - 1) ? 0 : top - 1;
    a.closeidx = lua_isnil(L, top) ? 0 : top;
    a.place = i;
    a.maxmem = e->o.maxmem;
    a.ring = w->ring;
    a.slot = &e->slots[i];
    lpar_worker_run(L, &a);
  }
  lua_pop(L, 4);
  lpar_ring_keep(&w->ring);
  if (pid < 0) {
    lpar_ring_unmap(&w->ring);
    return (int)pid;
  }
  e->live++;
  e->forks++;
  lpar_policy_started(&e->wave, e->live, lpar_proc_now());
  return lpar_place_start(e, w, call);
}

/* ---- workers lost ---- */

/* Make the engine unusable: 'why' on top (popped), of kind 'code', fails
   every job. */
void lpar_place_breakengine(Ctx *c, int code) {
  lua_State *L = c->L;
  lua_pushvalue(L, -1);
  lua_rawseti(L, c->uv, EU_BROKEN);
  c->e->brokencode = code;
  while (c->e->jobs) {
    lua_pushvalue(L, -1);
    lpar_job_fail(c, c->e->jobs, NULL, code);
  }
  lua_pop(L, 1);
}

/* Hand the chunks w holds back to their job, as they are. */
void lpar_place_giveback(Ctx *c, EWorker *w, int from) {
  Job *j = w->job;
  int k;
  if (j == NULL || j->state != J_RUNNING)
    return;
  for (k = w->nq - 1; k >= from; k--) {
    lua_Integer skip = k == 0 ? w->got : 0;
    lpar_engine_nomem(c->L,
                      lpar_ranges_push(&j->redo, w->q[k].first + skip,
                                       w->q[k].count - skip, w->q[k].alone));
  }
}

/*
** Worker w is gone or must go: reap it (killing it first if 'force'),
** name the item it was running, and queue the rest of its chunk again.
** 'why' overrides the wait status in the message, and 'code' its kind
** (kind.h; 0: from the wait status).
*/
void lpar_place_lose(Ctx *c, EWorker *w, int force, const char *why, int code) {
  lua_State *L = c->L;
  Engine *e = c->e;
  pid_t pid = w->proc.pid;
  Slot *slot = &e->slots[w - e->w];
  Job *j = w->job;
  int status = 0, rc, starting = w->state == W_STARTING;
  int broke = why != NULL; /* a reason given: not its death's */
  lua_Integer culprit, from, end, got;
  int suspects, nq;
  Chunk q0;
  char desc[96];
  if (w->host) {
    lpar_host_lose(c, w, force, why);
    return;
  }
  lpar_place_close(e, w);
  rc = lpar_proc_reap(&w->proc, force, &status);
  lpar_proc_closepid(&w->proc);
  if (why == NULL)
    why = rc < 0 ? "vanished (reaped elsewhere)"
                 : lpar_proc_describe(status, desc, sizeof desc);
  if (code == 0)
    code = rc < 0 ? LPAR_KLOST : lpar_kind_fromstatus(status);
  if (starting) {
    lpar_place_giveback(c, w, 0); /* nothing of them ran */
    lpar_place_vacate(e, w);
    if (w->timedout == LPAR_SLOTHOOK) { /* stopped in init */
      if (lua_rawgeti(L, c->uv, EU_INITERR) == LUA_TNIL) {
        char secs[32];
        lua_pushfstring(L, "worker init timed out after %s s",
                        lpar_proc_secs(e->o.timeout, secs, sizeof secs));
        lua_rawseti(L, c->uv, EU_INITERR);
      }
      lua_pop(L, 1);
    }
    else if ((!force || broke) && slot->item == LPAR_SLOTHOOK) {
      /* it died in init, or broke the protocol there */
      if (lua_rawgeti(L, c->uv, EU_INITERR) == LUA_TNIL) {
        lua_pushfstring(L, "worker init failed: worker %d %s", (int)pid, why);
        lua_rawseti(L, c->uv, EU_INITERR);
      }
      lua_pop(L, 1);
    }
    lua_rawgeti(L, c->uv, EU_INITERR);
    /* one worker's init failing is the failure of a call's engine, or of
       a pool being made; a pool that lives on tries a few times */
    if ((!lua_isnil(L, -1) && (e->creating || e->o.ondemand)) ||
        ++e->startfails > 2 * e->o.n + 2) {
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      }
      else
        code = LPAR_KINIT;
      lpar_place_breakengine(c, code);
    }
    else
      lua_pop(L, 1);
    return;
  }
  if (j != NULL && j->state == J_RUNNING && w->nq > 0)
    lpar_place_giveback(c, w,
                        1); /* the chunk waiting its turn goes back as it is */
  q0 = w->q[0];
  nq = w->nq;
  got = w->got;
  lpar_place_vacate(e, w);
  if (j == NULL || j->state != J_RUNNING || nq == 0)
    return;
  from = q0.first + got;
  end = q0.first + q0.count;
  culprit = w->blame ? 0
                     : lpar_policy_culprit(q0.first, q0.count, got,
                                           (lua_Integer)slot->item, w->timedout,
                                           q0.alone);
  lpar_engine_nomem(
      L, lpar_ranges_requeue(&j->redo, from, end, culprit, !w->blame));
  suspects = culprit == 0 && !w->blame && from < end;
  if (w->blame) /* it broke the protocol reporting this one */
    culprit = w->blame;
  if (culprit) {
    if (w->timedout) {
      lua_pushfstring(L, "timed out after %s s",
                      lpar_proc_secs(j->o.timeout, desc, sizeof desc));
      code = LPAR_KTIMEOUT;
    }
    else
      lua_pushfstring(L, "worker %d %s", (int)pid, why);
    /* a batch that said how far it got: the record it was running is
       named, {message = ..., record = k} */
    if (j->o.slice || (j->o.batched && culprit == (lua_Integer)slot->item &&
                       slot->part >= 0)) { /* {message, record} */
      lua_createtable(L, 0, 2);
      lua_insert(L, -2);
      lua_setfield(L, -2, "message");
      if (culprit == (lua_Integer)slot->item && slot->part >= 0) {
        lua_pushinteger(L, (lua_Integer)slot->part + 1);
        lua_setfield(L, -2, "record");
      }
    }
    lua_pushnil(L);
    lpar_job_itemfailed(c, j, culprit, NULL, code);
  }
  /* a loss that sent items back as suspects is bound to name one of them
     if it happens again: only the others count towards the limit */
  else if (!suspects) {
    if (++j->lost > 2 * e->o.n + 2) {
      lua_pushfstring(L, "workers keep dying (worker %d %s)", (int)pid, why);
      lpar_job_fail(c, j, NULL, code);
    }
  }
}

void lpar_place_protoerror(Ctx *c, EWorker *w, const char *what) {
  char why[256];
  snprintf(why, sizeof why, "broke the protocol (%s)", what);
  lpar_place_lose(c, w, 1, why, LPAR_KPROTOCOL);
}

/* ---- sending ---- */

/* Send what is pending to w, watching its fd while some is left. 0, or
   -errno if the worker cannot be written. */
int lpar_place_sendsome(Engine *e, EWorker *w) {
  int rc = lpar_wire_sendsome(w->proc.cmdfd, &w->out, &w->outpos);
  if (rc != 0)
    return rc;
  if (w->outpos < w->out.n && !lpar_loop_active(&w->cmdw))
    return lpar_loop_start(&e->loop, &w->cmdw, w->proc.cmdfd, EPOLLOUT);
  if (w->outpos == w->out.n) {
    lpar_loop_stop(&e->loop, &w->cmdw);
    if (lpar_buf_shed(&w->out)) /* a long item, sent */
      w->outpos = 0;
  }
  return 0;
}

/* The highest first item of the chunks w holds: a slot cut there asks
   them all to end early (parts of batches have higher indices than the
   batches after them, see "records"). */
long long lpar_place_lastitem(const EWorker *w) {
  long long at = 0;
  int k;
  for (k = 0; k < w->nq; k++)
    if (w->q[k].first > at)
      at = w->q[k].first;
  return at;
}

/* ---- time ---- */

/*
** A worker that is not running an item (idle, between items, or in its
** init, which sends nothing) and left a frame unfinished for the timeout
** (its job's, else the engine's, else LPAR_STALLNS) broke the protocol;
** what it sent so far is read first. Returns when to look again
** (ns; 0: never, -1: something was handled, the pump goes on).
*/
static long long stalled(Ctx *c, EWorker *w, long long now) {
  Engine *e = c->e;
  double secs =
      w->job && w->job->o.timeout > 0 ? w->job->o.timeout : e->o.timeout;
  long long limit = secs > 0 ? (long long)(secs * 1e9) : LPAR_STALLNS;
  char what[96], num[32];
  if (w->in.n == 0 || e->slots[w - e->w].item > 0)
    return 0;
  if (now < w->lastread + limit)
    return w->lastread + limit;
  lpar_frame_read(c, w);
  if (w->state == W_EMPTY || w->in.n == 0 || now < w->lastread + limit)
    return -1;
  snprintf(what, sizeof what, "partial frame, nothing more for %s s",
           lpar_proc_secs(secs > 0 ? secs : (double)LPAR_STALLNS / 1e9, num,
                          sizeof num));
  lpar_place_protoerror(c, w, what);
  return -1;
}

/*
** A busy worker of a job with a timeout that is between items: one that
** has taken no item (nor sent a byte) for the timeout since its chunk
** came, its last item began or its last bytes came, is stopped (SIGSTOP,
** a debugger) or stuck outside any item; what it sent is read first. It
** is let go and its items go back as suspects, unblamed. Returns when to
** look again (ns), or -1 if it was let go.
*/
static long long idlelimit(Ctx *c, EWorker *w, long long now) {
  Engine *e = c->e;
  Slot *slot = &e->slots[w - e->w];
  long long t = w->started, limit;
  if (w->lastread > t)
    t = w->lastread;
  if (slot->since > t)
    t = slot->since;
  limit = t + (long long)(w->job->o.timeout * 1e9);
  if (w->in.n > 0) /* a frame begun: stalled() judges it */
    return limit;
  if (now < limit)
    return limit < now + LPAR_LOOKNS ? limit : now + LPAR_LOOKNS;
  lpar_frame_read(c, w); /* what it sent counts */
  if (w->state != W_BUSY || slot->item != 0 || w->lastread > t || w->in.n > 0)
    return now + LPAR_LOOKNS; /* it moved on */
  w->q[0].alone = 0;          /* no item of its chunk is to blame */
  lpar_place_lose(c, w, 1, "took no item for the timeout", LPAR_KTIMEOUT);
  return -1;
}

/* Timeouts per item and for init, stalled frames, TERM -> KILL
   escalation; arms the timer for the next deadline. Returns whether a
   worker was lost meanwhile (then do not wait: its place wants filling). */
int lpar_place_deadlines(Ctx *c) {
  Engine *e = c->e;
  long long now = lpar_proc_now(), next = 0;
  int i, rc, acted = 0;
  for (i = 0; i < e->o.n; i++) {
    EWorker *w = &e->w[i];
    long long due = 0, stall;
    if (w->host) {
      if (w->state != W_EMPTY)
        due = lpar_host_deadline(c, w, now);
      else if (!w->dropped && w->retryat > now)
        due = w->retryat; /* it starts again then */
      if (due < 0)
        acted = 1;
      else if (due > 0 && (next == 0 || due < next))
        next = due;
      continue;
    }
    if (w->state == W_EMPTY)
      continue;
    if (w->killat > 0) {
      if (now >= w->killat) {
        lpar_proc_killproc(&w->proc, SIGKILL);
        w->killat = 0;
      }
      else
        due = w->killat;
    }
    else if (w->state == W_STARTING && e->o.timeout > 0) {
      long long limit = e->slots[i].since + (long long)(e->o.timeout * 1e9);
      if (e->slots[i].item == LPAR_SLOTHOOK && now >= limit) {
        w->timedout = LPAR_SLOTHOOK;
        lpar_proc_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else /* not in init yet, or until its limit */
        due = e->slots[i].item == LPAR_SLOTHOOK ? limit : now + LPAR_LOOKNS;
    }
    else if (w->state == W_BUSY && w->job && w->job->o.timeout > 0) {
      lua_Integer item = e->slots[i].item;
      long long limit =
          e->slots[i].since + (long long)(w->job->o.timeout * 1e9);
      if (item != 0 && now >= limit) {
        w->timedout = item;
        lpar_proc_killproc(&w->proc, SIGTERM);
        w->killat = now + KILLGRACE;
        due = w->killat;
      }
      else if (item != 0)
        due = limit;
      else if ((due = idlelimit(c, w, now)) < 0) { /* it was let go */
        acted = 1;
        continue;
      }
    }
    if (w->killat == 0 && w->state == W_BUSY && w->nq > 0 && w->job &&
        w->job->o.batched && e->slots[i].cut < lpar_place_lastitem(w)) {
      /* a batch far past the time it was sized for gives back the records
         it has not run, and so does the one queued behind it: they go to
         the other workers */
      long long at =
          w->started +
          lpar_policy_overdue(w->q[0].tns, w->q[0].weight, LPAR_OVERDUENS);
      if (now >= at)
        e->slots[i].cut = lpar_place_lastitem(w);
      else if (due == 0 || at < due)
        due = at;
    }
    if (w->killat == 0 && w->state != W_EMPTY &&
        (stall = stalled(c, w, now)) != 0) {
      if (stall < 0)
        acted = 1;
      else if (due == 0 || stall < due)
        due = stall;
    }
    if (due > 0 && (next == 0 || due < next))
      next = due;
  }
  /* cannot fail with the values given: if it does, no deadline would
     ever fire, so the call fails (as epoll_wait's failure does) */
  rc = lpar_loop_arm(&e->loop, next);
  if (rc != 0)
    luaL_error(c->L, "timerfd_settime: %s", strerror(-rc));
  return acted;
}
