/*
** engstate.h: the engine's structs: places, jobs, the engine itself;
** private to the engine's files (front ends go through engine.h).
*/
#ifndef lpar_engstate_h
#define lpar_engstate_h

#include <signal.h>
#include <stdint.h>

#include "buf.h"
#include "engine.h"
#include "loop.h"
#include "lua.h"
#include "policy.h"
#include "proc.h"
#include "ranges.h"
#include "ring.h"

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
  int waiting;        /* a blocking wait owns SIGINT (and SIGTERM) */
  int interrupted;    /* the signal that ended a wait, 0 if none */
  int ended;          /* a job failed or was cancelled */
  int vacated;        /* a place was emptied since the pump looked */
  struct Job *waited; /* the job a blocking wait is for, or NULL */
  int from;           /* the host whose frame is handled (0: none) */
  int brokencode;     /* the kind (kind.h) of what broke it (EU_BROKEN) */
  int initcode;       /* ... of the first worker init's failure */
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
  lua_Integer failed;   /* items that failed (collected) */
  lua_Integer toldone;  /* done and failed at the last progress call; */
  lua_Integer toldfail; /* toldone is -1 before the first */
  long long toldat;     /* when it was made */
  int failcode;         /* the kind (kind.h) of its failure, once failed */
  void *file; /* the luaL_Stream a stream's iterator reads (see fileiter in
                 engine.c), whose fd is o.wakefd; NULL: none */
} Job;

#endif
