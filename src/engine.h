/*
** engine.h: the one loop of lpar: workers, jobs oldest first, timers and
** signals, for lpar.parallel, lpar.imap, pools and the CLI alike.
*/
#ifndef lpar_engine_h
#define lpar_engine_h

#include <stddef.h>
#include <sys/types.h>

#include "loop.h"
#include "lua.h"

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
  int nonblocking;   /* a stream's iterator never waits (it says "not yet"
                        instead, or reads what cannot block): it is asked
                        with results ready to go back (see mayblock) */
  int batched;       /* a stream whose items are batches of records: its
                        iterator is called with the number of records the
                        policy wants in the next item and returns the item
                        and the number it holds; a chunk is one batch,
                        'chunk' and the time per item count records */
  int slice;         /* a batched job of an emitting call: stack index (at
                        submit) of slice(batch, from, to), which returns
                        the batch of records from..to of a batch; then
                        each record lives on its own (see "records" in
                        job.c), 0: a batch lives as one item */
  int onevent;       /* stack index (at submit) of a function called as
                        on_event(ev) as each item starts and ends (see
                        "events" in job.c); 0: none */
  int progress;      /* stack index (at submit) of a function called as
                        progress(done, total, failed) while the job is
                        waited for (see LPAR_PROGRESSNS); 0: none */
} JobOpts;

/* an engine and its jobs: userdata behind the functions below */
typedef struct Engine Engine;
typedef struct Job Job;

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

/* Halt the emitting job at 'jidx': nothing more is handed out; the job
   ends once the items handed out are reported (the others are emitted as
   not run: nil, nil). Soon: workers running its batches stop between
   records. Now: they are killed at once (from on_event: once the pump
   has read what is ready), and what they ran is emitted as not run. */
void lpar_engine_halt(lua_State *L, int jidx, int now);

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

/* The loop of the engine at 'idx', where a front end may watch fds of its
   own (their callbacks run inside a pump: they must not use the engine). */
Loop *lpar_engine_loop(lua_State *L, int idx);

/* Whether job j is still running. */
int lpar_engine_running(const Job *j);

/* What job j is: "running", "done", "failed" or "cancelled". */
const char *lpar_engine_statename(const Job *j);

/* Items of job j reported so far, and its items: their count, or those
   pulled so far from an iterator. */
lua_Integer lpar_engine_jobdone(const Job *j);
lua_Integer lpar_engine_jobitems(const Job *j);

/* Whether job j's results are taken one by one (imap). */
int lpar_engine_emitting(const Job *j);

/* The ns per item measured for job j, 0 until known. */
double lpar_engine_nsperitem(const Job *j);

/* Whether job j is running in an engine that may cancel it now (one
   lpar_engine_check lets through). */
int lpar_engine_maycancel(const Job *j);

/* Raise unless e can be used now: made by this process (a child holds a
   copy it must not use), open if 'needopen', and not pumping (a finalizer
   run by the pump's allocations cannot use it). */
void lpar_engine_check(lua_State *L, const Engine *e, int needopen);

/* Whether e is closed. */
int lpar_engine_closed(const Engine *e);

/* Jobs of e not finished. */
int lpar_engine_njobs(const Engine *e);

/* Places of e (its most workers), and the pid of place i's worker
   (0 <= i < places; 0: none runs there). */
int lpar_engine_nplaces(const Engine *e);
pid_t lpar_engine_placepid(const Engine *e, int i);

/* The epoll fd of e's loop: readable when e has something to handle. */
int lpar_engine_fd(const Engine *e);

/* Register the engine and job metatables' shared parts. */
void lpar_engine_open(lua_State *L);

#endif
