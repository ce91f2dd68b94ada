/*
** pworker.h: the child side of a persistent pool: a worker that lives
** across jobs, loads each job's function once and runs the items it is sent.
*/
#ifndef lpar_pworker_h
#define lpar_pworker_h

#include "lua.h"
#include "pool.h"
#include "ring.h"

/* flags of an LPAR_FCALL frame (its count field) */
#define LPAR_CALLCOLLECT 1 /* go on with a chunk after an item fails */
#define LPAR_CALLTIMED 2   /* note when each item starts (timeouts) */

typedef struct PWorkerArgs {
  int cmdfd;     /* read frames from here */
  int resfd;     /* write frames here */
  int initidx;   /* stack index of a function run once first, or 0 */
  int closeidx;  /* stack index of a function run once last, or 0 */
  int place;     /* the worker's place in the pool (seeds math.random) */
  size_t maxmem; /* Lua heap limit in bytes, 0 for none */
  Ring ring;     /* where big results frames go; ring.base NULL: none */
  Slot *slot;    /* this worker's shared status */
} PWorkerArgs;

/*
** Serve a pool in a freshly forked child: run init, say READY, then serve
** FCALL and FITEMS frames until the command channel closes; run close and
** leave with _exit (no atexit handler or finalizer of the host runs).
*/
_Noreturn void lpar_pworker_run(lua_State *L, const PWorkerArgs *a);

#endif
