/*
** engine.h: the one loop of lpar: workers, jobs oldest first, timers and
** signals, for lpar.parallel, lpar.imap, pools and the CLI alike.
*/
#ifndef lpar_engine_h
#define lpar_engine_h

#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>

#include "buf.h"
#include "lua.h"
#include "policy.h"
#include "proc.h"
#include "ranges.h"
#include "ring.h"

#define LPAR_POOLMT "lpar.Pool"  /* an engine that lives on (lpar.pool) */
#define LPAR_ENGINEMT "lpar.Run" /* the engine of one call (parallel, imap) */
#define LPAR_JOBMT "lpar.Job"

/* items pulled from an iterator, or results not yet taken by lpar.imap,
   at most */
#if !defined(LPAR_WINDOW)
#define LPAR_WINDOW 16384
#endif

/* What an engine is made with. */
typedef struct EngineOpts {
  int n;          /* places: most workers at once (>= 1) */
  int ondemand;   /* workers start as the policy finds them worth it
                     (else all at once, replaced when lost) */
  int retire;     /* idle workers leave once nothing is left to hand out */
  int ignint;     /* workers keep SIGINT ignored */
  int sigterm;    /* SIGTERM (and SIGHUP) end a wait, as SIGINT does */
  double timeout; /* seconds for init and close; 0: none */
  size_t maxmem;  /* Lua heap limit of each worker in bytes; 0: none */
  int nhosts;     /* the last nhosts places are hosts (hosts.h), which
                     lpar_engine_sethosts describes */
} EngineOpts;

/* What a job is made with. */
typedef struct JobOpts {
  lua_Integer chunk; /* fixed chunk size; 0: adaptive */
  int collect;       /* on_error = "collect" */
  int retries;       /* times a failed item is run again */
  double timeout;    /* seconds per item; 0: none */
  int emitting;      /* results are taken one by one (imap) */
  int unordered;     /* ... in the order they finish */
  int fnk;           /* the engine's inherited function k; 0: send f */
  int inherit;       /* items are the engine's inherited table (WORK) */
  int wakefd;        /* a stream's iterator may say "not yet" (see
                        lpar_engine_pushpending): then pulling waits until
                        this fd is readable; -1: none */
  int batched;       /* a stream whose items are batches of records: its
                        iterator is called with the number of records the
                        policy wants in the next item and returns the item
                        and the number it holds; a chunk is one batch,
                        'chunk' and the time per item count records */
  int slice;         /* a batched job of an emitting call: stack index (at
                        submit) of slice(batch, from, to), which returns
                        the batch of records from..to of a batch; then
                        each record lives on its own (see "records" in
                        engine.c), 0: a batch lives as one item */
  int onevent;       /* stack index (at submit) of a function called as
                        on_event(ev) as each item starts and ends (see
                        "events" in engine.c); 0: none */
  int progress;      /* stack index (at submit) of a function called as
                        progress(done, total, failed) while the job is
                        waited for (see LPAR_PROGRESSNS); 0: none */
} JobOpts;

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
  int watchout;         /* its command fd is in the epoll set */
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
  int epfd;     /* every fd watched, and the timer */
  int tfd;      /* timerfd of the next deadline */
  long long armed;
  EWorker *w;
  Slot *slots;
  struct epoll_event *evs;
  int nevs;
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
  int waiting;        /* a blocking wait owns SIGINT (and SIGTERM) */
  int watching;       /* signals the wait takes: it waits with waitmask */
  int interrupted;    /* the signal that ended a wait, 0 if none */
  int ended;          /* a job failed or was cancelled */
  int vacated;        /* a place was emptied since the pump looked */
  struct Job *waited; /* the job a blocking wait is for, or NULL */
  int from;           /* the host whose frame is handled (0: none) */
  sigset_t oldmask, waitmask;
  int brokencode; /* the kind (kind.h) of what broke it (EU_BROKEN) */
  int initcode;   /* ... of the first worker init's failure */
  int chld;       /* depth of the calls that made SIGCHLD deliverable */
  int heldchld;   /* the caller ignored SIGCHLD: oldchld is its action */
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
  int watchwake;         /* wakefd is in the epoll set */
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
  lua_Integer failed;   /* items that failed (collected) */
  lua_Integer toldone;  /* done and failed at the last progress call; */
  lua_Integer toldfail; /* toldone is -1 before the first */
  long long toldat;     /* when it was made */
  int failcode;         /* the kind (kind.h) of its failure, once failed */
  void *file; /* the luaL_Stream a stream's iterator reads (see fileiter in
                 engine.c), whose fd is o.wakefd; NULL: none */
} Job;

/*
** Replace the four values on top of the stack (init and close hooks, a
** table of functions and a table of items the workers inherit at fork;
** each may be nil) with a new engine, a userdata with metatable 'mt'.
** No worker starts yet. Raises on bad memory or fds.
*/
Engine *lpar_engine_new(lua_State *L, const EngineOpts *o, const char *mt);

/* Start every worker of the engine at 'idx' and wait until each has run
   init (lpar.pool); raises "worker init failed: ..." and the like, with
   the engine closed. */
void lpar_engine_start(lua_State *L, int idx);

/*
** Push a new job of the engine at 'eidx': function at 'fidx' over 'iidx',
** a table of 'n' items (n >= 0) or an iterator (n < 0). A function to
** send is encoded here (refused before anything is sent). The job starts
** at once (a pump that does not wait).
*/
Job *lpar_engine_submit(lua_State *L, int eidx, int fidx, int iidx,
                        lua_Integer n, const JobOpts *o);

/* Handle what is ready, waiting up to 'ms' (-1: until something
   happens); for the engine at 'idx'. */
void lpar_engine_pump(lua_State *L, int idx, int ms);

/* Pump until the job at 'jidx' is finished, with SIGINT ending the wait
   ("interrupted", the job is cancelled; SIGTERM "terminated" and SIGHUP
   "hangup" too when the engine takes them). */
void lpar_engine_wait(lua_State *L, int jidx);

/* Push what the finished job at 'idx' returns: results, n [, errors];
   raises its failure. */
int lpar_engine_results(lua_State *L, int idx);

/* For an emitting job at 'jidx': pump until a result may be taken and
   push index, value, error, the spec of the host that ran the item (nil:
   this machine or no hosts), and the error's kind and detail (see
   lpar_kind_push) (6); 0 when all are taken. Raises the job's failure. */
int lpar_engine_next(lua_State *L, int jidx);

/* Push the engine of the job at 'jidx'. */
void lpar_engine_pushengine(lua_State *L, int jidx);

/* The kind code (kind.h) of item i's failure in the finished job at
   'jidx' that collected it; 0 if none. */
int lpar_engine_itemkind(lua_State *L, int jidx, lua_Integer i);

/* The kind code of the failure of the job at 'jidx'; 0 if none. */
int lpar_engine_failkind(lua_State *L, int jidx);

/* Halt the emitting job at 'jidx' soon: nothing more is handed out, and
   workers running its batches stop between records; the job ends once
   the items handed out are reported (the others are emitted as not run:
   nil, nil). */
void lpar_engine_halt(lua_State *L, int jidx);

/* Cancel the running job at 'jidx': it fails with 'why'. */
void lpar_engine_cancel(lua_State *L, int jidx, const char *why);

/*
** Close the engine at 'idx': jobs not finished fail with 'why', busy
** workers are killed, idle ones told to leave (they run close, bounded by
** the timeout or a grace period), and all are reaped. Does nothing in a
** process that inherited a copy. Never raises (but on memory errors).
*/
void lpar_engine_close(lua_State *L, int idx, const char *why);

/* Push the value an iterator of a job with a wakefd returns to say "no
   item yet" (a light userdata). */
void lpar_engine_pushpending(lua_State *L);

/* Where no engine waits (a serial run, a pool draining an iterator): push
   the next item of the iterator at 'iter' (nil at its end); while it
   returns lpar.pending, wait until the fd that follows is readable (at
   once without one) and ask again. Raises what the iterator raises. */
void lpar_engine_nextitem(lua_State *L, int iter);

/*
** Describe the hosts of the engine at 'eidx' (made with nhosts): the table
** at 'hostsidx' holds, for each, what lpar_hosts_parse gives, in the order
** of the last places; the string at 'setupidx' is the payload of its
** SETUP frame after the versions block. Before any job.
*/
void lpar_engine_sethosts(lua_State *L, int eidx, int hostsidx, int setupidx);

/* Register the engine and job metatables' shared parts. */
void lpar_engine_open(lua_State *L);

#endif
