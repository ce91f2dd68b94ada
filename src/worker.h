/*
** worker.h: the child side of a run: its own copy of the caller's Lua
** state, serving work frames until its command channel closes.
*/
#ifndef lpar_worker_h
#define lpar_worker_h

#include "lua.h"
#include "pool.h"

typedef struct WorkerArgs {
  int cmdfd;       /* read work from here */
  int resfd;       /* write results here */
  int fidx;        /* stack index of the function */
  int itemsidx;    /* stack index of the items table, 0 when items travel */
  int initidx;     /* stack index of a function run once first, or 0 */
  int closeidx;    /* stack index of a function run once last, or 0 */
  int stoponerror; /* leave a chunk at its first failed item */
  int timed;       /* note when each item starts (for timeouts) */
  size_t maxmem;   /* Lua heap limit in bytes, 0 for none */
  Slot *slot;      /* this worker's shared status */
} WorkerArgs;

/* Mark 'L' as living in a worker (a nested parallel runs serially). */
void lpar_worker_mark(lua_State *L);
int lpar_worker_inside(lua_State *L);

/*
** Serve work frames in a freshly forked child; never returns (the child
** leaves with _exit, so no atexit handler or finalizer of the host runs).
*/
_Noreturn void lpar_worker_run(lua_State *L, const WorkerArgs *a);

/*
** Push the message handler a worker runs user code under: it turns an
** error into {error, traceback}, the traceback holding only the levels
** above the caller of this function (not the parent's code the worker was
** forked inside).
*/
void lpar_worker_pushmsgh(lua_State *L);

/* Replace the {error, traceback} pair at the top of the stack by its two
   values (error, then traceback or nil). */
void lpar_worker_unpackerror(lua_State *L);

/* Message handler for serial runs: error -> "msg\ntraceback". */
int lpar_worker_traceback(lua_State *L);

#endif
