/*
** run.h: the parent side of a run: workers started on demand, chunked
** adaptive scheduling, results gathered in item order.
*/
#ifndef lpar_run_h
#define lpar_run_h

#include "lua.h"

#define LPAR_RUNMT "lpar.Run"

typedef struct RunOpts {
  int nworkers;      /* most workers to start (>= 1) */
  lua_Integer chunk; /* fixed chunk size, 0 for adaptive */
  int collect;       /* on_error = "collect" */
  int unordered;     /* emit in completion order (lpar.imap) */
  double timeout;    /* seconds per item, 0 for none */
  int sigterm;       /* SIGTERM ends the run like SIGINT (the CLI) */
  int retries;       /* times a failed item is run again */
  size_t maxmem;     /* Lua heap limit per worker in bytes, 0 for none */
} RunOpts;

/*
** Replace the two values on top of the stack (the per-worker 'init' and
** 'close' functions, or nils) with a new run of the function at 'fidx'
** over 'iidx': a table of 'n' items (n >= 0), or an iterator function
** (n < 0) whose items travel to the workers. No worker starts before the
** first step.
*/
void lpar_run_new(lua_State *L, int fidx, int iidx, lua_Integer n,
                  const RunOpts *o);

/*
** lua_CFunction, run 1: steps until every item is done. Returns results,
** count, errors. Raises on the first failed item (unless collecting),
** "interrupted" on SIGINT. The caller must lpar_run_stop afterwards.
*/
int lpar_run_finish(lua_State *L);

/*
** lua_CFunction, run 1: steps until the next result may be emitted and
** returns index, value, error; nothing when all are done.
*/
int lpar_run_next(lua_State *L);

/* Stop the run at 'idx': close or kill every worker and reap it, restore
   the signal handling the run changed. Idempotent; never raises. */
void lpar_run_stop(lua_State *L, int idx);

/* Register the run metatable (with __gc and __close). */
void lpar_run_open(lua_State *L);

#endif
