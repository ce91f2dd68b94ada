/*
** lpar.h: public header of lpar, a fork pool for Lua 5.4.
** Version, tunable limits and the C entry points an embedding host needs.
*/
#ifndef lpar_h
#define lpar_h

#include "lua.h"

#define LPAR_VERSION_MAJOR 0
#define LPAR_VERSION_MINOR 1
#define LPAR_VERSION_PATCH 0
#define LPAR_VERSION "lpar 0.1.0"

/* workers used when the caller gives no count */
#if !defined(LPAR_DEFWORKERS)
#define LPAR_DEFWORKERS 8
#endif

/* most workers one run may start */
#if !defined(LPAR_MAXWORKERS)
#define LPAR_MAXWORKERS 1024
#endif

/* deepest table nesting the codec accepts */
#if !defined(LPAR_MAXDEPTH)
#define LPAR_MAXDEPTH 200
#endif

/* a worker sends its buffered results once they exceed this many bytes */
#if !defined(LPAR_FLUSHSIZE)
#define LPAR_FLUSHSIZE (256 * 1024)
#endif

/* bytes of the ring each worker of a run shares with the caller; results
   frames of LPAR_RINGMIN bytes up to half of this travel through it */
#if !defined(LPAR_RINGSIZE)
#define LPAR_RINGSIZE (4 * 1024 * 1024)
#endif
#if !defined(LPAR_RINGMIN)
#define LPAR_RINGMIN (64 * 1024)
#endif

/* the scheduler aims for chunks that take at least this long (ns) */
#if !defined(LPAR_MINCHUNKNS)
#define LPAR_MINCHUNKNS 250000
#endif

/* another worker is forked only while the work not yet handed out would
   keep every worker busy at least this long (ns) */
#if !defined(LPAR_FORKWORTHNS)
#define LPAR_FORKWORTHNS 2000000
#endif

/* before the time per item is known, a first chunk gets this long (ns)
   to come back before another worker is started */
#if !defined(LPAR_SPAWNWAITNS)
#define LPAR_SPAWNWAITNS 1000000
#endif

/* most items one chunk of a streamed run may carry */
#if !defined(LPAR_MAXSTREAMCHUNK)
#define LPAR_MAXSTREAMCHUNK 4096
#endif

#if defined(__GNUC__)
#define LPAR_EXPORT __attribute__((visibility("default")))
#else
#define LPAR_EXPORT
#endif

/* Open the module: pushes the lpar table (for luaL_requiref). */
LPAR_EXPORT int luaopen_lpar(lua_State *L);

/* The library's version string, e.g. "lpar 0.1.0". */
const char *lpar_version(void);

/*
** Register lpar in a host's state: package.loaded.lpar and the global
** 'lpar', as luaL_requiref(L, "lpar", luaopen_lpar, 1) would. Leaves the
** stack as it was.
*/
void lpar_openlib(lua_State *L);

/*
** 1 if 'L' runs in an lpar worker (a forked child of the host), 0 in the
** host itself. A host's C functions that touch what only the host may
** touch (its other threads' data, a GPU context, a window) can check it
** and refuse to run in a worker.
*/
int lpar_inworker(lua_State *L);

/*
** 1 if 'L' runs in an lpar worker whose current item the engine asks to
** end early, else 0: an item of a batched job (a batch of records, see
** pool:imap's 'batched') that runs far past the time the policy gave it
** (lpar_policy_overdue). The function running the batch checks it between
** records and returns what it has run, leaving the rest to its caller.
*/
int lpar_overdue(lua_State *L);

#endif
