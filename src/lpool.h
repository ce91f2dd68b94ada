/*
** lpool.h: persistent pools (lpar.pool): workers forked once and reused,
** jobs a host polls without blocking.
*/
#ifndef lpar_lpool_h
#define lpar_lpool_h

#include "lua.h"

/* Register the pool and job metatables and set field 'pool' of the table
   at the top of the stack (the module table). */
void lpar_lpool_open(lua_State *L);

#endif
