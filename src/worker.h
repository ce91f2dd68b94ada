/*
** worker.h: the child side of an engine: its own copy of the caller's Lua
** state, serving frames until its command channel closes.
*/
#ifndef lpar_worker_h
#define lpar_worker_h

#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "lua.h"
#include "proc.h"
#include "ring.h"

/* how a worker leaves when it cannot go on (its exit status): it cannot
   write to the parent or has no memory; the parent sent bad bytes */
#define LPAR_EXITBROKEN 3
#define LPAR_EXITBADINPUT 4

/* flags of an LPAR_FCALL frame (its count field) */
#define LPAR_CALLCOLLECT 1 /* go on with a chunk after an item fails */
#define LPAR_CALLTIMED 2   /* note when each item starts (timeouts) */
#define LPAR_CALLINHERIT 4 /* the function is one the worker inherited */

typedef struct WorkerArgs {
  int cmdfd;     /* read frames from here */
  int resfd;     /* write frames here */
  int fnsidx;    /* stack index of the functions inherited at fork, or 0 */
  int itemsidx;  /* stack index of the items inherited at fork, or 0 */
  int initidx;   /* stack index of a function run once first, or 0 */
  int closeidx;  /* stack index of a function run once last, or 0 */
  int place;     /* the worker's place (seeds math.random) */
  size_t maxmem; /* Lua heap limit in bytes, 0 for none */
  Slot *slot;    /* this worker's shared status */
  Ring ring;     /* where big results frames go; ring.base NULL: none */
} WorkerArgs;

/* Mark 'L' as living in a worker (a nested parallel runs serially). */
void lpar_worker_mark(lua_State *L);
int lpar_worker_inside(lua_State *L);

/* Whether the parent asked the item this worker runs to end early (see
   lpar_overdue). */
int lpar_worker_overdue(lua_State *L);

/* In a worker running a batch of records: 'done' of them are done, so a
   death now is the next one's (the parent names it, see lose()). Called
   after each record: a copy of the worker that the record's code forked
   and that returned here leaves at once, as in lpar_worker_own. */
void lpar_worker_progress(long long done);

/*
** Serve an engine in a freshly forked child: run init, say READY, then
** serve CALL, WORK and ITEMS frames until the command channel closes; run
** close and leave with _exit (no atexit handler or finalizer of the host
** runs).
*/
_Noreturn void lpar_worker_run(lua_State *L, const WorkerArgs *a);

/*
** Push the message handler a worker runs user code under: it notes the
** traceback of an error (only the levels above the caller of this
** function, not the parent's code the worker was forked inside) and
** leaves the error value as it is. Lua also runs it for an error that
** 'load' catches (a syntax error), which must reach 'load' untouched.
*/
void lpar_worker_pushmsgh(lua_State *L);

/* After a call under that handler failed, with the error value at the
   top: push the traceback noted for that very value, or nil. */
void lpar_worker_unpackerror(lua_State *L);

/* lua_CFunction: (bytes) -> the function that xfer encoded in them. */
int lpar_worker_loadfn(lua_State *L);

/* a results frame: header, u64 first index, u64 ns spent, values */
#define LPAR_RESHDR (LPAR_HDRSIZE + 16)

/*
** What runs items in a worker (of lpar.parallel or of a pool) and sends
** their results: the frame being built, and where it goes.
*/
typedef struct Runner {
  lua_State *L;
  int fd;            /* the results pipe */
  int msgh;          /* stack index of the message handler */
  Slot *slot;        /* this worker's shared status */
  int timed;         /* note when each item starts (for timeouts) */
  const char *limit; /* the memory limit ("512 MiB"), or NULL */
  Buf out;           /* results frame being built (LPAR_RESHDR, values) */
  lua_Integer first; /* index of the first result in 'out' */
  uint32_t count;    /* results in 'out' */
  long long mark;    /* when the items of 'out' began to run */
  int bigresults;    /* malloc was told to keep freed memory */
  int memerr;        /* the error being sent is the memory limit's */
  Ring ring;         /* big frames go here (ring.base NULL: none) */
} Runner;

/* Set up r to run items of the freshly forked worker state L and send
   results on fd (marks L as a worker; leaves the worker if out of
   memory). */
void lpar_worker_initrunner(Runner *r, lua_State *L, int fd, Slot *slot);

/* Leave the worker at once if rc != 0 (parent gone, out of memory). */
void lpar_worker_check(int rc);

/* Make sure this is the worker itself, not a process the user's code
   forked that returned into lpar (it would answer the parent and take
   its items): a copy says so on stderr and leaves with _exit(1), touching
   neither the pipes nor the shared slot. Called after each protected call
   of user code and before each frame is read or written. */
void lpar_worker_own(void);

/* Begin a results frame at item 'first', timing from now. */
void lpar_worker_begin(Runner *r, lua_Integer first);

/* Fill in the header of the results gathered in r->out; returns whether
   there are any (the frame is r->out.p .. r->out.n). */
int lpar_worker_seal(Runner *r);

/* Send the results gathered, if any, and begin the next frame. */
void lpar_worker_flush(Runner *r);

/* Send what was gathered, then an ERROR frame for item 'i' (0: the run
   itself, e.g. init) with the error value and traceback at the top of
   the stack (both popped). The value is made fit to travel under a
   protected call (an error value whose __tostring raises, or memory
   running out, gives a plain description); until the frame is out, the
   shared slot names item i. */
void lpar_worker_senderror(Runner *r, lua_Integer i);

/* Call the function and item pushed on the stack (both popped) as item
   'i': its result joins r->out, or its error is sent. 0, or 1 if the item
   failed. */
int lpar_worker_runitem(Runner *r, lua_Integer i);

/* Call the hook at 'idx' (init or close): 0, or 1 with the error value
   and traceback pushed. */
int lpar_worker_hook(Runner *r, int idx);

/* The same for init, with the shared slot saying so (LPAR_SLOTHOOK), so
   that the parent can time it. */
int lpar_worker_inithook(Runner *r, int idx);

/* Tell stderr that the close hook failed (error and traceback on top):
   there is nobody else to tell. */
void lpar_worker_reportclose(lua_State *L, const char *who);

/* Write a memory size into buf[0..size) as "512 MiB", "5.2 MiB" or
   "2 GiB"; returns buf. */
const char *lpar_worker_memname(size_t bytes, char *buf, size_t size);

/* Bytes of L's heap: what a worker forked now inherits, and counts
   against its max_memory. */
size_t lpar_worker_heap(lua_State *L);

/* Registry field: bytes of the caller's Lua heap held for records in
   flight (the CLI's batch strings, sent to a worker as ITEMS; nil: none).
   A worker forked while they are held never uses them, so its heap's
   count at start leaves them out (see lpar_worker_setlimit). */
#define LPAR_INFLIGHT "lpar.inflight"

/* room a worker needs above the heap it inherits, under max_memory */
#if !defined(LPAR_MEMROOM)
#define LPAR_MEMROOM (1024 * 1024)
#endif

/* Whether a worker forked now would start without LPAR_MEMROOM below the
   memory limit 'max' (the caller's heap is what it inherits; garbage is
   collected before the second look): 0 if not, else 1 with the message
   pushed, "max_memory 1 MiB is below the 5.2 MiB the worker inherited
   ..." or "... leaves less than 1024 KiB to run in above ...". */
int lpar_worker_checkheap(lua_State *L, size_t max);

/* In a worker: limit r's Lua heap to 'max' bytes (0: no limit), so that
   an item needing more fails with "not enough memory (limit 512 MiB)".
   1, with the message pushed, when the heap it inherited leaves less
   than LPAR_MEMROOM below the limit (as lpar_worker_checkheap). */
int lpar_worker_setlimit(Runner *r, size_t max);

/*
** Parent: wait until worker p, let go, has run its close hook and left,
** or 'deadline' (ns) passes: then it is killed. Either way it is reaped
** and its pidfd closed. Reported on stderr as '<who> <pid>': a close that
** timed out after 'secs', and, if 'report', one that left badly (exit
** status, signal) rather than by lpar's own kill. Once *stop is set (a
** signal, see lpar_proc_waituntil) it is killed at once, unreported.
*/
void lpar_worker_finish(Proc *p, long long deadline, double secs, int hasclose,
                        int report, const char *who,
                        volatile sig_atomic_t *stop);

/* Reseed math.random, so that every worker draws its own numbers. */
void lpar_worker_reseed(lua_State *L, lua_Integer place);

/*
** Push the message handler for serial runs, to be used from the calling C
** function's level: error -> "msg\ntraceback", the message as
** lpar_worker_describe gives it and the traceback of the user's function
** only (not of the caller that asked for the run, nor the 'extra' levels
** of C functions that call it); a table error value stays itself.
*/
void lpar_worker_pushtraceback(lua_State *L, int extra);

/*
** Push a description of the error value at 'idx': a string or number as
** its text, else what its __tostring gives (called under a protected call;
** it must give a string), else "(error object is a <type> value)". Raises
** only on memory errors.
*/
void lpar_worker_describe(lua_State *L, int idx);

/*
** Replace the error value and traceback (string or nil) at the top of the
** stack by the failure they make, "<prefix><description>\n<traceback>"
** (prefix NULL: none). A table error value stays the table; with a prefix
** it gets a __tostring that says the same, naming the failure.
*/
void lpar_worker_failure(lua_State *L, const char *prefix);

#endif
