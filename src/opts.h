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

/* A memory size from the value at the top (left there): bytes as a
   number, or a string with a K, M or G suffix ("512M", "2GiB"). */
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

/* Push opts.on_event of the options at 'arg' (nil if none, or if they are
   not a table); raises if it is not a function. */
void lpar_opts_onevent(lua_State *L, int arg);

/* most times a failed item is run again */
#if !defined(LPAR_MAXRETRIES)
#define LPAR_MAXRETRIES 1000000
#endif

/* The options every kind of run has, from the table at 'arg': chunksize
   (0 when absent), on_error ("collect" sets *collect), timeout (seconds,
   0 when absent) and retries (at most LPAR_MAXRETRIES). Fields not there
   leave the outputs as they are. */
void lpar_opts_run(lua_State *L, int arg, lua_Integer *chunk, int *collect,
                   double *timeout, int *retries);

#endif
