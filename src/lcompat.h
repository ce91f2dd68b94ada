/*
** lcompat.h: the Lua C API of 5.4 over the Lua lpar is built for (5.1,
** 5.2, 5.3, 5.4 or LuaJIT). Every source that speaks to Lua includes it
** after lauxlib.h; under 5.4 it adds nothing but the names of the Lua.
** Before 5.3, lua-compat53 supplies most of the 5.3 API.
*/
#ifndef lcompat_h
#define lcompat_h

#include "lauxlib.h"
#include "lua.h"

#if LUA_VERSION_NUM == 501 && defined(__has_include)
#if __has_include("luajit.h") /* on the include path of LuaJIT builds only */
#include "luajit.h"
#endif
#endif
#if defined(LUAJIT_VERSION_NUM)
#define LPAR_LUAJIT 1
#else
#define LPAR_LUAJIT 0
#endif

/* the Lua lpar runs on, for people ("Lua 5.4", "LuaJIT 2.1") and for
   the HELLO of remote hosts (LuaJIT apart from 5.1: its bytecode is its
   own) */
#if LPAR_LUAJIT
#define LPAR_LUANAME "LuaJIT 2.1"
#define LPAR_LUANUM (9000 + LUA_VERSION_NUM)
#else
#define LPAR_LUANAME "Lua " LUA_VERSION_MAJOR "." LUA_VERSION_MINOR
#define LPAR_LUANUM LUA_VERSION_NUM
#endif

/* numbers are doubles only (no integer subtype): 5.1, 5.2, LuaJIT */
#define LPAR_DOUBLES (LUA_VERSION_NUM < 503)

/* whether a level of lua_getstack was reached by a tail call (5.1 shows
   those as levels of their own) */
#if LUA_VERSION_NUM == 501
#define LPAR_ISTAILCALL(ar) ((void)(ar), 0)
#else
#define LPAR_ISTAILCALL(ar) ((ar)->istailcall)
#endif

/* whether the file of a luaL_Stream is closed (5.1 and LuaJIT: its FILE
   pointer is cleared; they have no closef) */
#if LUA_VERSION_NUM == 501
#define LPAR_STREAMCLOSED(s) ((s)->f == NULL)
#else
#define LPAR_STREAMCLOSED(s) ((s)->closef == NULL)
#endif

#if LUA_VERSION_NUM < 503
#if !defined(LUA_VERSION_MAJOR) /* 5.1 and LuaJIT */
#define LUA_VERSION_MAJOR "5"
#define LUA_VERSION_MINOR "1"
#endif
#define COMPAT53_PREFIX lpar_compat53
#include "compat-5.3.h"

/* a number with an integral value in the range of 64-bit integers (the
   integers of 5.3 and 5.4): compat53's test converts out of range ones */
int lpar_compat_isinteger(lua_State *L, int idx);
#undef lua_isinteger
#define lua_isinteger lpar_compat_isinteger

/* lua_rawgeti and lua_rawseti with keys of lua_Integer (5.1 and 5.2 take
   an int: keys past 2^31, such as the engine's parts, were cut) */
int lpar_compat_rawgeti(lua_State *L, int idx, lua_Integer n);
void lpar_compat_rawseti(lua_State *L, int idx, lua_Integer n);
#undef lua_rawgeti
#undef lua_rawseti
#define lua_rawgeti lpar_compat_rawgeti
#define lua_rawseti lpar_compat_rawseti

#if !defined(LUA_LOADED_TABLE)
#define LUA_LOADED_TABLE "_LOADED"
#endif

/* lua_pushfstring before 5.3 knows no %I: these add it (LUAI_UACINT) */
#define LUAI_UACINT long long
const char *lpar_compat_pushvfstring(lua_State *L, const char *fmt, va_list ap);
const char *lpar_compat_pushfstring(lua_State *L, const char *fmt, ...);
int lpar_compat_error(lua_State *L, const char *fmt, ...);
#undef lua_pushvfstring
#undef lua_pushfstring
#undef luaL_error
#define lua_pushvfstring lpar_compat_pushvfstring
#define lua_pushfstring lpar_compat_pushfstring
#define luaL_error lpar_compat_error

/* 5.1 has no upvalue identities (LuaJIT and 5.2 have): every upvalue of
   a function that travels is its own */
#if LUA_VERSION_NUM == 501 && !LPAR_LUAJIT
#define lua_upvalueid(L, f, n)                                                 \
  ((void *)((const char *)lua_topointer((L), (f)) + (n)))
#define lua_upvaluejoin(L, f1, n1, f2, n2)                                     \
  ((void)(L), (void)(f1), (void)(n1), (void)(f2), (void)(n2))
#endif
#endif /* LUA_VERSION_NUM < 503 */

#if LUA_VERSION_NUM < 504
/* user values (the first 'nuv'), kept in a table that is the userdata's
   environment (5.1) or user value (5.2, 5.3) */
void *lpar_compat_newuserdatauv(lua_State *L, size_t size, int nuv);
int lpar_compat_getiuservalue(lua_State *L, int idx, int n);
int lpar_compat_setiuservalue(lua_State *L, int idx, int n);
#define lua_newuserdatauv lpar_compat_newuserdatauv
#define lua_getiuservalue lpar_compat_getiuservalue
#define lua_setiuservalue lpar_compat_setiuservalue

/* "bad argument #1 to 'f' (function expected, got nil)", as in 5.4 */
int lpar_compat_typeerror(lua_State *L, int arg, const char *tname);
#define luaL_typeerror lpar_compat_typeerror
#define luaL_pushfail(L) lua_pushnil(L)
#define luaL_argexpected(L, cond, arg, tname)                                  \
  ((void)((cond) || luaL_typeerror((L), (arg), (tname))))
#endif

#endif
