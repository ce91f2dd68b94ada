/*
** lcompat.c: what lcompat.h declares for the Luas before 5.4.
*/
#include "lcompat.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if LUA_VERSION_NUM < 503
#undef lua_isinteger /* compat53's own, under its prefix */
#define lua_isinteger COMPAT53_CONCAT(COMPAT53_PREFIX, _isinteger)
#include "compat-5.3.c" /* once, under the prefix of lcompat.h */
#undef lua_isinteger
#define lua_isinteger lpar_compat_isinteger
#undef lua_rawgeti
#undef lua_rawseti

int lpar_compat_rawgeti(lua_State *L, int idx, lua_Integer n) {
  if (n >= INT_MIN && n <= INT_MAX)
    lua_rawgeti(L, idx, (int)n);
  else {
    idx = lua_absindex(L, idx);
    lua_pushnumber(L, (lua_Number)n);
    lua_rawget(L, idx);
  }
  return lua_type(L, -1);
}

void lpar_compat_rawseti(lua_State *L, int idx, lua_Integer n) {
  if (n >= INT_MIN && n <= INT_MAX)
    lua_rawseti(L, idx, (int)n);
  else {
    idx = lua_absindex(L, idx);
    lua_pushnumber(L, (lua_Number)n);
    lua_insert(L, -2);
    lua_rawset(L, idx);
  }
}

#define lua_rawgeti lpar_compat_rawgeti
#define lua_rawseti lpar_compat_rawseti
#endif

#if LUA_VERSION_NUM < 503
#undef lua_pushvfstring
#undef lua_pushfstring
#undef luaL_error

int lpar_compat_isinteger(lua_State *L, int idx) {
  double d;
  if (lua_type(L, idx) != LUA_TNUMBER)
    return 0;
  d = (double)lua_tonumber(L, idx);
  return d >= -0x1p63 && d < 0x1p63 && d == floor(d);
}

/* Push the formatted 'fmt' as lua_pushvfstring would, with %I (a
   LUAI_UACINT) as well. */
const char *lpar_compat_pushvfstring(lua_State *L, const char *fmt,
                                     va_list ap) {
  luaL_Buffer B;
  const char *p;
  char num[64];
  luaL_buffinit(L, &B);
  for (p = fmt; *p; p++) {
    if (*p != '%') {
      luaL_addchar(&B, *p);
      continue;
    }
    switch (*++p) {
    case 's': {
      const char *s = va_arg(ap, const char *);
      luaL_addstring(&B, s ? s : "(null)");
      break;
    }
    case 'd':
      snprintf(num, sizeof num, "%d", va_arg(ap, int));
      luaL_addstring(&B, num);
      break;
    case 'I':
      snprintf(num, sizeof num, "%lld", va_arg(ap, long long));
      luaL_addstring(&B, num);
      break;
    case 'c':
      luaL_addchar(&B, (char)va_arg(ap, int));
      break;
    case 'f':
      snprintf(num, sizeof num, "%.14g", va_arg(ap, double));
      luaL_addstring(&B, num);
      break;
    case 'p':
      snprintf(num, sizeof num, "%p", va_arg(ap, void *));
      luaL_addstring(&B, num);
      break;
    case '%':
      luaL_addchar(&B, '%');
      break;
    default: /* as Lua does: the rest verbatim */
      luaL_addchar(&B, '%');
      if (*p == '\0')
        p--;
      else
        luaL_addchar(&B, *p);
      break;
    }
  }
  luaL_pushresult(&B);
  return lua_tostring(L, -1);
}

const char *lpar_compat_pushfstring(lua_State *L, const char *fmt, ...) {
  const char *s;
  va_list ap;
  va_start(ap, fmt);
  s = lpar_compat_pushvfstring(L, fmt, ap);
  va_end(ap);
  return s;
}

int lpar_compat_error(lua_State *L, const char *fmt, ...) {
  va_list ap;
  luaL_where(L, 1);
  va_start(ap, fmt);
  lpar_compat_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_concat(L, 2);
  return lua_error(L);
}
#endif

#if LUA_VERSION_NUM < 504
void *lpar_compat_newuserdatauv(lua_State *L, size_t size, int nuv) {
  void *p = lua_newuserdata(L, size);
  if (nuv > 0) {
    lua_createtable(L, nuv, 0);
    lua_setuservalue(L, -2);
  }
  return p;
}

int lpar_compat_getiuservalue(lua_State *L, int idx, int n) {
  idx = lua_absindex(L, idx);
  lua_getuservalue(L, idx);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_pushnil(L);
    return LUA_TNONE;
  }
  lua_rawgeti(L, -1, n);
  lua_remove(L, -2);
  return lua_type(L, -1);
}

int lpar_compat_setiuservalue(lua_State *L, int idx, int n) {
  idx = lua_absindex(L, idx);
  lua_getuservalue(L, idx);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 2);
    return 0;
  }
  lua_insert(L, -2);
  lua_rawseti(L, -2, n);
  lua_pop(L, 1);
  return 1;
}

int lpar_compat_typeerror(lua_State *L, int arg, const char *tname) {
  const char *got = luaL_typename(L, arg);
  if (luaL_getmetafield(L, arg, "__name") && lua_type(L, -1) == LUA_TSTRING)
    got = lua_tostring(L, -1);
  else if (lua_type(L, arg) == LUA_TLIGHTUSERDATA)
    got = "light userdata";
  return luaL_argerror(L, arg,
                       lua_pushfstring(L, "%s expected, got %s", tname, got));
}
#endif
