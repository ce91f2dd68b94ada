/*
** opts.h: reading the arguments and option tables of lpar.parallel,
** lpar.imap and pools, with the same checks and messages everywhere.
*/
#ifndef lpar_opts_h
#define lpar_opts_h

#include <stddef.h>

#include "lua.h"

/* Raise unless the table at 'arg' has only string keys from 'names'. */
void lpar_opts_checkkeys(lua_State *L, int arg, const char *const names[]);

/* A non-negative integer from the value at the top (popped), or raise
   naming 'what' as argument 'arg'. */
lua_Integer lpar_opts_count(lua_State *L, int arg, const char *what);

/* The bytes of a memory size written as digits with an optional
   fraction, then an optional unit K, M, G or T (any case, powers of
   1024), "i" and "B" ("512M", "1.5g", "2GiB", "1048576"), in *bytes; NULL,
   or what is wrong with it ("is below 1 MiB"), to be followed by
   LPAR_SIZEHINT. The parser of max_memory for the module, pools and the
   CLI's --max-memory. */
#define LPAR_SIZEHINT "bytes or like '512M', from 1 MiB to 1 PiB"
const char *lpar_opts_parsesize(const char *s, size_t *bytes);

/* A memory size from the value at the top (left there): bytes as a
   number, or a string lpar_opts_parsesize takes; raise naming the value
   as argument 'arg' otherwise. */
size_t lpar_opts_size(lua_State *L, int arg);

/* Push field 'name' of the table at 'arg' if it is a function, nil if
   absent or 'arg' is not a table; raise otherwise. */
void lpar_opts_hook(lua_State *L, int arg, const char *name);

/* Number of items of the table at 'idx': items.n if it is an integer (as
   table.pack makes), else its length. */
lua_Integer lpar_opts_itemcount(lua_State *L, int idx);

/* Push the progress function of the options at 'arg' (nil if not a
   table): the function given, nil for none (or false, or true when stderr
   is not a terminal), or for true a function that draws the CLI's
   progress line on stderr. Raises on any other value. */
void lpar_opts_progress(lua_State *L, int arg);

/* most times a failed item is run again */
#if !defined(LPAR_MAXRETRIES)
#define LPAR_MAXRETRIES 1000000
#endif

/* The options every kind of run has, from the table at 'arg': chunksize
   (0 when absent), on_error ("collect" sets *collect), timeout (seconds,
   0 when absent) and retries (raises above LPAR_MAXRETRIES). Fields not
   there leave the outputs as they are. */
void lpar_opts_run(lua_State *L, int arg, lua_Integer *chunk, int *collect,
                   double *timeout, int *retries);

#endif
