/*
** engstate.h: the engine's structs and what its files share (engine.c,
** place.c, host.c, job.c, deal.c, frame.c); front ends use engine.h.
*/
#ifndef lpar_engstate_h
#define lpar_engstate_h

#include <signal.h>
#include <stdint.h>

#include "buf.h"
#include "engine.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "loop.h"
#include "lua.h"
#include "policy.h"
#include "proc.h"
#include "ranges.h"
#include "ring.h"
#include "wire.h"

enum { W_EMPTY = 0, W_STARTING, W_IDLE, W_BUSY };
enum { J_RUNNING = 0, J_DONE, J_FAILED, J_CANCELLED };

struct Job;

typedef struct Chunk {
  lua_Integer first, count;
  lua_Integer weight; /* records in it (a batched job), else count */
  double tns;         /* the time per record it was sized by (0: none) */
  int alone;          /* one suspect (see lpar_ranges_take) */
} Chunk;

typedef struct EWorker {
  Proc proc;
  int state;            /* W_* */
  struct Job *job;      /* job of the chunks it runs; NULL when idle, or
                           when the results of its chunks are dropped */
  uint64_t fnjob;       /* id of the job whose function it holds */
  Chunk q[2];           /* chunks sent: q[0] runs, q[1] waits its turn */
  int nq;               /* chunks sent and not finished */
  lua_Integer got;      /* items of q[0] reported so far */
  long long busy;       /* ns it reports spending on q[0] */
  long long started;    /* when q[0] was sent, or became the first */
  Buf in;               /* bytes received and not yet handled */
  long long lastread;   /* when bytes last came */
  Buf out;              /* bytes to send */
  size_t outpos;        /* bytes of 'out' already sent */
  Watcher resw;         /* its results fd */
  Watcher pidw;         /* its pidfd: its end, whoever holds its pipe */
  Watcher cmdw;         /* its command fd, while bytes wait to be sent */
  Ring ring;            /* big results frames arrive here */
  lua_Integer timedout; /* item it was stopped for, 0 if none */
  lua_Integer blame;    /* item whose report broke the protocol, 0 if none */
  int fresh;            /* a CALL went out and nothing came back since: an
                           ERROR of index 0 may answer it (see errorframe) */
  long long killat;     /* if > 0: SIGKILL due at this time */
  int host;             /* its host's number (1-based), 0: a local worker */
  int hostn;            /* a host's workers, as its HELLO says */
  int hello;            /* a host said HELLO */
  int hostfails;        /* a host lost this many times with no chunk done */
  int dropped;          /* a host left out for good */
  long long retryat;    /* a lost host starts again from this time */
  long long probeat;    /* a host: when to send the next timed BEAT */
  long long rtt;        /* ... the shortest round trip seen (ns), 0: none */
} EWorker;

typedef struct Engine {
  EngineOpts o;
  pid_t owner; /* the process that made it (children inherit copies) */
  int closed;
  int creating; /* lpar.pool is waiting for the first workers */
  int inpump;   /* a pump is running (guards against re-entry) */
  Loop loop;    /* every fd watched, and the timer */
  EWorker *w;
  Slot *slots;
  pid_t *dying; /* workers killed and not yet reaped */
  int ndying, capdying;
  Proc *retired; /* workers let go, reaped when the engine closes */
  int nretired, capretired;
  struct Job *jobs, *lastjob; /* active jobs, oldest first */
  uint64_t nextid;
  int live;           /* workers running */
  int forks;          /* workers started so far */
  int cap;            /* most workers to run (a failed fork lowers it) */
  int startfails;     /* workers lost before READY, in a row */
  SchedWave wave;     /* workers started while none is past its first item */
  long long pns;      /* ns the caller spent taking results */
  long long pitems;   /* results those ns were spent on */
  long long stored;   /* results stored, all jobs (failures too) */
  int interrupted;    /* the signal that ended a wait, 0 if none */
  int ended;          /* a job failed or was cancelled */
  int vacated;        /* a place was emptied since the pump looked */
  int haltnow;        /* a job halts now (see lpar_job_stopnow) */
  struct Job *waited; /* the job a blocking wait is for, or NULL */
  int from;           /* the host whose frame is handled (0: none) */
  int brokencode;     /* the kind (kind.h) of what broke it (EU_BROKEN) */
  int chld;           /* depth of the calls that made SIGCHLD deliverable */
  int heldchld;       /* the caller ignored SIGCHLD: oldchld is its action */
  struct sigaction oldchld;
} Engine;

typedef struct Job {
  Engine *e;
  struct Job *nextjob;
  uint64_t id;
  int state; /* J_* */
  JobOpts o;
  lua_Integer n;         /* items: the count, or pulled so far (a stream) */
  lua_Integer next;      /* next item never handed out */
  lua_Integer done;      /* items reported */
  int stream;            /* items come from an iterator */
  int exhausted;         /* ... which has ended */
  int pending;           /* ... which said "not yet": wait for wakefd */
  Watcher wakew;         /* watches wakefd */
  int wakefd;            /* a copy of the fd a pending stream waits for */
  int wakesrc;           /* ... the iterator's own fd */
  int sized;             /* the results table was made at its full size */
  double tns;            /* ns per item, 0 until measured */
  long long tnsn;        /* ... from this many items (0: remembered) */
  Ranges redo;           /* items to hand out again */
  int lost;              /* workers lost under it without a culprit */
  Buf call;              /* CALL frame: header and the function */
  Buf hostcall;          /* ... as hosts take it (with the timeout) */
  lua_Integer emit;      /* next index to emit (imap) */
  unsigned char *fin;    /* ring of LPAR_WINDOW flags: item done (imap) */
  lua_Integer *recs;     /* ring of LPAR_WINDOW: records in each item in
                            flight (a batched job) */
  lua_Integer *queue;    /* ring of done indices (unordered imap) */
  unsigned short *where; /* ring of LPAR_WINDOW: the host that ran an item
                            (0: a local worker), with hosts */
  lua_Integer qhead, qtail;
  lua_Integer nkids;    /* items made of parts of batches (o.slice) */
  int halting;          /* lpar_engine_halt: nothing more is handed out */
  int haltnow;          /* and its running chunks are to be stopped */
  lua_Integer failed;   /* items that failed (collected) */
  lua_Integer toldone;  /* done and failed at the last progress call; */
  lua_Integer toldfail; /* toldone is -1 before the first */
  long long toldat;     /* when it was made */
  int failcode;         /* the kind (kind.h) of its failure, once failed */
  void *file;           /* the luaL_Stream a stream's iterator reads (see
                           lpar_job_fileiter), whose fd is o.wakefd; NULL: none */
} Job;

/* an engine that lives on: its chunks take at least this long once the
   time per item is known (ns): no fork to amortize, only a round trip */
#if !defined(LPAR_POOLCHUNKNS)
#define LPAR_POOLCHUNKNS 100000
#endif

/* ... and hold this many items at most before it is known */
#if !defined(LPAR_POOLPROBE)
#define LPAR_POOLPROBE 256
#endif

/* a host's chunk keeps each of its workers busy this long at least (ns):
   a round trip through ssh or srun is far longer than through a pipe */
#if !defined(LPAR_HOSTCHUNKNS)
#define LPAR_HOSTCHUNKNS 50000000
#endif

/* most items in one chunk */
#if !defined(LPAR_POOLMAXCHUNK)
#define LPAR_POOLMAXCHUNK (1 << 20)
#endif

/* a job's progress function is called at most this often (ns), and once
   more when the job is over */
#if !defined(LPAR_PROGRESSNS)
#define LPAR_PROGRESSNS 50000000LL
#endif

/* a batch of records (a batched job) runs at least this long before it
   may be asked to end early (see lpar_policy_overdue), ns */
#if !defined(LPAR_OVERDUENS)
#define LPAR_OVERDUENS 50000000LL
#endif

/* after SIGTERM for a timeout, SIGKILL follows this much later (ns) */
#define KILLGRACE 500000000LL

/* a worker that may be past a deadline soon (one not yet in its init,
   one between items) is looked at again at least this often (ns) */
#if !defined(LPAR_LOOKNS)
#define LPAR_LOOKNS 10000000LL
#endif

/* fields of the engine's uservalue */
enum {
  EU_INIT = 1,
  EU_CLOSE,
  EU_FNS,
  EU_ITEMS,
  EU_ANCHORS,
  EU_TNS,
  EU_BROKEN,
  EU_INITERR,
  EU_HOSTS,  /* what lpar_engine_sethosts was given */
  EU_SETUP,  /* ... and the SETUP frame its agents get */
  EU_HOSTERR /* why the last host was left out */
};
#define EU_N EU_HOSTERR

/* fields of a job's uservalue */
enum {
  JU_RESULTS = 1,
  JU_ERRORS,
  JU_ITEMS,
  JU_FAILURE,
  JU_ENGINE,
  JU_F,
  JU_ATTEMPTS, /* item -> times run again so far, with retries */
  JU_INFLIGHT, /* a stream's items handed out and not yet reported */
  JU_PROGRESS, /* the progress function, if any */
  JU_KINDS,    /* item -> kind code (kind.h) of its collected failure */
  JU_SLICE,    /* o.slice: cuts a batch into parts */
  JU_KIDS,     /* item -> its node (see "records" in job.c) */
  JU_ONEVENT,  /* o.onevent */
  JU_STARTS    /* item -> when it was handed out (ns), with o.onevent */
};
#define JU_N JU_STARTS

/* the first index of the items made of parts of batches (o.slice), so
   that the iterator's items keep their own numbers */
#define KIDBASE ((lua_Integer)1 << 48)

/* what the engine's functions share: the engine and its uservalue's
   index */
typedef struct Ctx {
  lua_State *L;
  Engine *e;
  int uv;
} Ctx;

/* Raise "not enough memory" if rc (of a Buf or Ranges call) says so. */
static inline void lpar_engine_nomem(lua_State *L, int rc) {
  if (rc != 0)
    luaL_error(L, "not enough memory");
}

/* places (place.c) */
void lpar_place_holdchld(Engine *e);
void lpar_place_releasechld(Engine *e);
void lpar_place_reapdying(Engine *e, int block);
void lpar_place_close(Engine *e, EWorker *w);
void lpar_place_vacate(Engine *e, EWorker *w);
void lpar_place_drop(Engine *e, EWorker *w);
void lpar_place_retire(Ctx *c, EWorker *w);
int lpar_place_start(Engine *e, EWorker *w, const char **call);
ChildSetup lpar_place_childsetup(Engine *e, sigset_t *cur, int ignint);
int lpar_place_spawn(Ctx *c, int i, const char **call);
void lpar_place_breakengine(Ctx *c, int code);
void lpar_place_giveback(Ctx *c, EWorker *w, int from);
void lpar_place_lose(Ctx *c, EWorker *w, int force, const char *why, int code);
void lpar_place_protoerror(Ctx *c, EWorker *w, const char *what);
int lpar_place_sendsome(Engine *e, EWorker *w);
long long lpar_place_lastitem(const EWorker *w);
int lpar_place_deadlines(Ctx *c);

/* hosts (host.c) */
int lpar_host_nlocal(const Engine *e);
/* Push the spec of host 'host' (1, 2...) as given, of the engine whose
   uservalue is at 'euv'. */
void lpar_host_pushspec(lua_State *L, int euv, int host);
void lpar_host_send(Ctx *c, EWorker *w, int type, uint32_t count, const char *p,
                    size_t len);
void lpar_host_leaveout(Ctx *c, EWorker *w, const char *why);
void lpar_host_lose(Ctx *c, EWorker *w, int force, const char *why);
lua_Integer lpar_host_chunk(Engine *e, Job *j, EWorker *w);
void lpar_host_makecall(lua_State *L, Job *j);
void lpar_host_refill(Ctx *c);
int lpar_host_hello(Ctx *c, EWorker *w, const Frame *f, const char *p);
long long lpar_host_deadline(Ctx *c, EWorker *w, long long now);

/* jobs (job.c) */
int lpar_job_pushuv(Ctx *c, Job *j);
void lpar_job_free(Job *j);
void lpar_job_unwatchwake(Engine *e, Job *j);
void lpar_job_end(Ctx *c, Job *j, int state, EWorker *self, int code);
void lpar_job_fail(Ctx *c, Job *j, EWorker *self, int code);
void lpar_job_settle(Ctx *c, Job *j);
void lpar_job_stopnow(Ctx *c);
void lpar_job_tellstart(Ctx *c, Job *j, int juv, lua_Integer i, EWorker *w);
void lpar_job_store(Ctx *c, Job *j, int juv, lua_Integer i);
void lpar_job_itemfailed(Ctx *c, Job *j, lua_Integer i, EWorker *self,
                         int code);
lua_Integer lpar_job_room(Job *j);
int lpar_job_workleft(Job *j);
int lpar_job_drained(Job *j);
lua_Integer lpar_job_itemsleft(Job *j);
int lpar_job_mayblock(const Job *j);
luaL_Stream *lpar_job_fileiter(lua_State *L, int idx, int *fd);
int lpar_job_askiter(Ctx *c, Job *j, int juv);
lua_Integer lpar_job_pull(Ctx *c, Job *j, int juv, EWorker *w, lua_Integer max);
int lpar_job_kind(lua_State *L, int juv, lua_Integer i, int take);
lua_Integer lpar_job_partsize(Ctx *c, int juv, lua_Integer k);
int lpar_job_putitems(Ctx *c, Job *j, int tidx, EWorker *w, lua_Integer first,
                      lua_Integer count);
int lpar_job_emittable(Job *j);

/* handing out (deal.c) */
lua_Integer lpar_deal_chunksize(Engine *e, Job *j);
int lpar_deal_workers(Engine *e);
void lpar_deal_assign(Ctx *c, EWorker *w, Job *j, int juv);
void lpar_deal_dispatch(Ctx *c);
int lpar_deal_broken(Ctx *c);
int lpar_deal_spawnone(Ctx *c, const char **call);
void lpar_deal_refill(Ctx *c);
Job *lpar_deal_canspawn(Ctx *c);
int lpar_deal_spawnwait(Ctx *c);

/* frames (frame.c) */
void lpar_frame_read(Ctx *c, EWorker *w);

#endif
