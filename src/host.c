/*
** host.c: the parent side of a remote place: its command started, HELLO
** and BEAT, its chunks, its loss (hosts.c parses specs).
*/
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "engstate.h"
#include "hosts.h"
#include "kind.h"
#include "lcompat.h"
#include "lpar.h"

/* The places of local workers come first, hosts after them. */
int lpar_host_nlocal(const Engine *e) {
  return e->o.n - e->o.nhosts;
}

/* Push the description of host 'host' (1, 2...) of the engine whose
   uservalue is at 'euv' (see lpar_hosts_parse). */
static void pushhost(lua_State *L, int euv, int host) {
  lua_rawgeti(L, euv, EU_HOSTS);
  lua_rawgeti(L, -1, host);
  lua_remove(L, -2);
}

void lpar_host_pushspec(lua_State *L, int euv, int host) {
  pushhost(L, euv, host);
  lua_getfield(L, -1, "spec");
  lua_remove(L, -2);
}

/* The spec of w's host, for messages (valid while the engine lives: the
   string is held by EU_HOSTS). */
static const char *hostname(Ctx *c, const EWorker *w) {
  const char *spec;
  lpar_host_pushspec(c->L, c->uv, w->host);
  spec = lua_tostring(c->L, -1);
  lua_pop(c->L, 1);
  return spec ? spec : "?";
}

/* Queue frame (type, count) with payload p[0..len) for host w. */
void lpar_host_send(Ctx *c, EWorker *w, int type, uint32_t count, const char *p,
                    size_t len) {
  if (w->outpos == w->out.n)
    w->out.n = w->outpos = 0;
  lpar_engine_nomem(c->L,
                    lpar_wire_addframe(&w->out, (uint32_t)type, count, p, len));
}

/*
** Start host k's command in empty place i, its stdin and stdout the
** place's channel, and queue SETUP for its agent; 0, or -errno with
** *call naming the call that failed. The command runs in a process group
** of its own, killed with the place (ssh then hangs up, and the agent
** leaves at end of file).
*/
static int spawnhost(Ctx *c, int i, const char **call) {
  lua_State *L = c->L;
  Engine *e = c->e;
  EWorker *w = &e->w[i];
  sigset_t cur;
  ChildSetup cs = lpar_place_childsetup(e, &cur, 1);
  pid_t pid;
  int rc, top = lua_gettop(L);
  lua_Integer k, n;
  const char **argv;
  size_t len;
  const char *setup;
  pushhost(L, c->uv, w->host);
  lua_getfield(L, -1, "argv");
  n = (lua_Integer)lua_rawlen(L, -1);
  argv = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof(char *), 0);
  for (k = 1; k <= n; k++) {
    lua_rawgeti(L, top + 2, k);
    argv[k - 1] = lua_tostring(L, -1);
    lua_pop(L, 1); /* still held by the table */
  }
  argv[n] = NULL;
  e->slots[i].item = 0;
  pid = lpar_proc_fork(&w->proc, &cs, call);
  if (pid == 0) {
    int in = w->proc.cmdfd, out = w->proc.resfd;
#if defined(__linux__)
    /* should the parent die, even by SIGKILL, the command is told to stop,
       not killed: an agent here stops its workers' children too */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
    /* both above 2 first, so that neither is overwritten by the other */
    if (in <= 2)
      in = fcntl(in, F_DUPFD, 3);
    if (out <= 2)
      out = fcntl(out, F_DUPFD, 3);
    if (in < 0 || out < 0 || dup2(in, 0) < 0 || dup2(out, 1) < 0)
      _exit(127);
    execvp(argv[0], (char *const *)argv);
    fprintf(stderr, "lpar: host '%s': cannot run %s: %s\n", hostname(c, w),
            argv[0], strerror(errno));
    _exit(127);
  }
  lua_settop(L, top);
  if (pid < 0)
    return (int)pid;
  w->ring.base = NULL;
  if ((rc = lpar_place_start(e, w, call)) != 0)
    return rc;
  lua_rawgeti(L, c->uv, EU_SETUP); /* the whole frame */
  setup = lua_tolstring(L, -1, &len);
  lpar_engine_nomem(L, lpar_buf_add(&w->out, setup, len));
  lua_pop(L, 1);
  return 0;
}

/* Whether every host is left out and no local place exists: then the
   engine has nothing to run on. */
static int nohost(Engine *e) {
  int i;
  if (lpar_host_nlocal(e) > 0 || e->o.nhosts == 0)
    return 0;
  for (i = lpar_host_nlocal(e); i < e->o.n; i++)
    if (!e->w[i].dropped)
      return 0;
  return 1;
}

/* Leave host w out for good, saying why on stderr; 'why' is kept as the
   last host's failure. */
void lpar_host_leaveout(Ctx *c, EWorker *w, const char *why) {
  const char *name = hostname(c, w);
  w->dropped = 1;
  fprintf(stderr, "lpar: host '%s' is left out: %s\n", name, why);
  fflush(stderr);
  lua_pushfstring(c->L, "host '%s': %s", name, why);
  lua_rawseti(c->L, c->uv, EU_HOSTERR);
}

/* With every host left out and no local place, the engine breaks, naming
   the last host's failure. */
static void checkhosts(Ctx *c) {
  if (!nohost(c->e) || lpar_deal_broken(c))
    return;
  lua_rawgeti(c->L, c->uv, EU_HOSTERR);
  lua_pushfstring(c->L, "no host can run workers (the last: %s)",
                  lua_tostring(c->L, -1));
  lua_remove(c->L, -2);
  lpar_place_breakengine(c, LPAR_KLOST);
}

/*
** Host w is gone or must go: its command is killed and reaped, and the
** chunks it held go back to their job as they are, unblamed (the host
** failed, not an item: a failing item is the agent's to name). Said on
** stderr. A host lost LPAR_HOSTFAILS times with no chunk done in between,
** or before its agent said HELLO, is left out; else it starts again a
** little later. With no host left and no local place, the engine breaks.
*/
void lpar_host_lose(Ctx *c, EWorker *w, int force, const char *why) {
  lua_State *L = c->L;
  Engine *e = c->e;
  int status = 0, rc;
  lua_Integer inflight = 0;
  char desc[96];
  const char *name = hostname(c, w);
  int k;
  /* a frame it broke cannot be the item's doing (a relay, its agent):
     that item goes back too */
  if (w->blame && w->nq > 0 && w->blame >= w->q[0].first &&
      w->blame - w->q[0].first < w->got)
    w->got = w->blame - w->q[0].first;
  w->blame = 0;
  for (k = 0; k < w->nq; k++)
    inflight += w->q[k].count - (k == 0 ? w->got : 0);
  lpar_place_close(e, w);
  if (force) /* its agent stops its workers (and their children) first */
    lpar_proc_killproc(&w->proc, SIGTERM);
  rc = lpar_proc_reap(&w->proc, 0, &status);
  lpar_proc_closepid(&w->proc);
  if (why == NULL)
    why = rc < 0 ? "vanished (reaped elsewhere)"
                 : lpar_proc_describe(status, desc, sizeof desc);
  if (w->job != NULL && w->job->state == J_RUNNING)
    lpar_place_giveback(c, w, 0);
  else
    inflight = 0;
  w->hostfails++;
  if (!w->dropped && (!w->hello || w->hostfails >= LPAR_HOSTFAILS)) {
    lpar_host_leaveout(c, w,
                       lua_pushfstring(L, "its command %s%s", why,
                                       w->hello ? ", again and again" : ""));
    lua_pop(L, 1);
  }
  else if (!w->dropped)
    fprintf(stderr, "lpar: host '%s' was lost (its command %s)\n", name, why);
  if (inflight > 0)
    fprintf(stderr, "lpar: %lld item%s of host '%s' run again elsewhere\n",
            (long long)inflight, inflight == 1 ? "" : "s", name);
  fflush(stderr);
  w->retryat = lpar_proc_now() + (long long)w->hostfails * 1000000000LL;
  lpar_place_vacate(e, w);
  checkhosts(c);
}

/* Chunk size for host w (see lpar_policy_hostchunk): each of its workers
   gets a chunk that is long next to a round trip (LPAR_HOSTCHUNKNS). */
lua_Integer lpar_host_chunk(Engine *e, Job *j, EWorker *w) {
  SchedChunk s = {0};
  s.fixed = j->o.chunk;
  s.left = lpar_job_itemsleft(j);
  s.places = lpar_deal_workers(e);
  s.tns = j->tns;
  s.minns = lpar_policy_hostwork(LPAR_HOSTCHUNKNS, w->rtt);
  s.probe = LPAR_POOLPROBE;
  s.max = LPAR_POOLMAXCHUNK;
  return (lua_Integer)lpar_policy_hostchunk(&s, w->hostn);
}

/* The CALL frame of job j as hosts take it: the timeout per item (ns)
   before the function. */
void lpar_host_makecall(lua_State *L, Job *j) {
  Frame f;
  lpar_engine_nomem(L, lpar_buf_reserve(&j->hostcall, j->call.n + 8));
  lpar_wire_getheader(j->call.p, &f);
  f.len += 8;
  lpar_wire_putheader(j->hostcall.p, &f);
  lpar_wire_put64(j->hostcall.p + LPAR_HDRSIZE,
                  (uint64_t)(j->o.timeout > 0 ? j->o.timeout * 1e9 : 0));
  memcpy(j->hostcall.p + LPAR_HDRSIZE + 8, j->call.p + LPAR_HDRSIZE,
         j->call.n - LPAR_HDRSIZE);
  j->hostcall.n = j->call.n + 8;
}

/* Start every host that is not running, not left out and not waiting to
   start again. */
void lpar_host_refill(Ctx *c) {
  Engine *e = c->e;
  long long now = lpar_proc_now();
  int i, starting = 0;
  for (i = lpar_host_nlocal(e); i < e->o.n; i++)
    starting += e->w[i].state == W_STARTING && !e->w[i].hello;
  for (i = lpar_host_nlocal(e); i < e->o.n && !lpar_deal_broken(c); i++) {
    EWorker *w = &e->w[i];
    const char *call = "fork";
    int rc;
    if (w->state != W_EMPTY || w->dropped || now < w->retryat)
      continue;
    if (starting >= LPAR_HOSTWAVE)
      break; /* the next wave starts as these say HELLO */
    starting++;
    rc = spawnhost(c, i, &call);
    if (rc == 0 && lpar_place_sendsome(e, w) != 0)
      lpar_place_lose(c, w, 0, NULL, 0);
    else if (rc != 0) {
      char why[128];
      snprintf(why, sizeof why, "cannot start (%s: %s)", call, strerror(-rc));
      lpar_host_leaveout(c, w, why);
      checkhosts(c);
    }
  }
}

/* A HELLO frame from host w: its agent's versions must be this lpar's.
   0, or -1 with a message pushed. */
int lpar_host_hello(Ctx *c, EWorker *w, const Frame *f, const char *p) {
  char why[400];
  if (lpar_hosts_checkversions(p, (size_t)f->len, "its agent", why,
                               sizeof why) != 0) {
    lua_pushstring(c->L, why);
    return -1;
  }
  if (f->count < 1) {
    lua_pushliteral(c->L, "its agent has no workers");
    return -1;
  }
  if (f->count > LPAR_MAXWORKERS) {
    snprintf(why, sizeof why, "its agent announces %lu workers, more than %d",
             (unsigned long)f->count, LPAR_MAXWORKERS);
    lua_pushstring(c->L, why);
    return -1;
  }
  w->hello = 1;
  w->hostn = (int)f->count;
  return 0;
}

/*
** Host w: lost when it sent nothing (not even BEAT) for its limit, what
** it sent being read first; sent BEAT when it was sent nothing for
** LPAR_BEATNS. Returns when to look again (ns), or -1 if it was lost.
*/
long long lpar_host_deadline(Ctx *c, EWorker *w, long long now) {
  /* until READY, the agent loads (the CLI's script runs there) */
  long long limit =
      w->state == W_STARTING ? LPAR_HOSTSTARTNS : LPAR_HOSTSILENCENS;
  long long due;
  if (now >= w->lastread + limit) {
    lpar_frame_read(c, w); /* waiting bytes are not silence */
    if (w->state == W_EMPTY)
      return -1;
    if (now >= w->lastread + limit) {
      char why[96];
      snprintf(why, sizeof why, "sent nothing for %.0f s (stopped, or cut off)",
               (double)limit / 1e9);
      lpar_place_lose(c, w, 1, why, LPAR_KLOST);
      return -1;
    }
  }
  if (now >= w->probeat) { /* timed: the round trip is measured */
    char clock[8];
    lpar_wire_put64(clock, (uint64_t)now);
    lpar_host_send(c, w, LPAR_FBEAT, 0, clock, sizeof clock);
    if (lpar_place_sendsome(c->e, w) != 0) {
      lpar_place_lose(c, w, 0, NULL, 0);
      return -1;
    }
    w->probeat = now + LPAR_BEATNS;
  }
  due = w->lastread + limit;
  return w->probeat < due ? w->probeat : due;
}
