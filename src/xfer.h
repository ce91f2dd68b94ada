/*
** xfer.h: Lua functions as bytes, for workers that did not inherit them:
** bytecode from lua_dump plus the function's upvalues.
*/
#ifndef lpar_xfer_h
#define lpar_xfer_h

#include <stddef.h>

#include "buf.h"
#include "lua.h"

/*
** Append the encoding of the function at 'idx' to 'b'. What travels:
**  - Lua functions as bytecode (with debug information), recursively for
**    upvalues that are Lua functions; shared upvalues stay shared;
**  - an upvalue named _ENV, or holding the global table, becomes the
**    worker's global table (a custom environment does not travel);
**  - tables found in package.loaded (modules) and C functions found in
**    them (string.format) travel by name, and the worker uses its own;
**  - other upvalues travel as values, through the codec, all in one value
**    (tables shared between upvalues stay shared).
** Returns 0, or -1 with a message pushed naming the upvalue that cannot
** travel ("upvalue 'fh' is a userdata"). Raises only on memory errors.
*/
int lpar_xfer_encode(lua_State *L, int idx, Buf *b);

/*
** Rebuild a function from p[*pos .. len) and push it, advancing *pos.
** Modules named in it are taken from package.loaded, or required. Raises
** on bad bytes or a missing module (run it under lua_pcall).
*/
void lpar_xfer_decode(lua_State *L, const char *p, size_t len, size_t *pos);

#endif
