/*
** opts.c: the arguments and option tables of lpar.parallel, lpar.imap
** and pools, read with the same checks and messages everywhere.
*/
#include "opts.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lauxlib.h"
#include "lcompat.h"
#include "proc.h"

void lpar_opts_checkkeys(lua_State *L, int arg, const char *const names[]) {
  lua_pushnil(L);
  while (lua_next(L, arg)) {
    int i;
    const char *name =
        lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    lua_pop(L, 1);
    for (i = 0; name && names[i] && strcmp(names[i], name) != 0; i++)
      ;
    if (name == NULL || names[i] == NULL)
      luaL_argerror(L, arg,
                    lua_pushfstring(L, "unknown option '%s'",
                                    name ? name : luaL_typename(L, -1)));
  }
}

lua_Integer lpar_opts_count(lua_State *L, int arg, const char *what) {
  lua_Integer v;
  int isnum;
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_argerror(L, arg,
                  lua_pushfstring(L, "%s must be a number, got %s", what,
                                  luaL_typename(L, -1)));
  v = lua_tointegerx(L, -1, &isnum);
  if (!isnum || v < 0)
    luaL_argerror(
        L, arg, lua_pushfstring(L, "%s must be a non-negative integer", what));
  lua_pop(L, 1);
  return v;
}

/* largest max_memory taken: 1 PiB (LPAR_SIZEHINT says so) */
#define MAXSIZE ((double)(1ULL << 50))

const char *lpar_opts_parsesize(const char *s, size_t *bytes) {
  static const char units[] = "KMGT";
  double v = 0, scale = 1;
  const char *p = s, *u;
  if (*p < '0' || *p > '9')
    return "is not a size";
  for (; *p >= '0' && *p <= '9'; p++)
    v = v * 10 + (*p - '0');
  if (*p == '.' && p[1] >= '0' && p[1] <= '9')
    for (p++; *p >= '0' && *p <= '9'; p++)
      v += (*p - '0') * (scale /= 10);
  if (*p != '\0' && (u = strchr(units, *p & ~0x20)) != NULL && *u != '\0') {
    v *= (double)(1ULL << (10 * (u - units + 1))); /* then rounded down */
    p++;
    if ((*p & ~0x20) == 'I')
      p++;
  }
  else if (scale < 1) /* a count of bytes is whole */
    return "is a fraction of a byte";
  if ((*p & ~0x20) == 'B')
    p++;
  if (*p != '\0')
    return "is not a size";
  if (v < 1024 * 1024)
    return "is below 1 MiB";
  if (v > MAXSIZE)
    return "is above 1 PiB";
  *bytes = (size_t)v;
  return NULL;
}

size_t lpar_opts_size(lua_State *L, int arg) {
  size_t bytes = 0;
  const char *why = NULL;
  if (lua_type(L, -1) == LUA_TNUMBER) {
    double v = (double)lua_tonumber(L, -1);
    if (!(v >= 1024 * 1024))
      why = "is below 1 MiB";
    else if (v > MAXSIZE)
      why = "is above 1 PiB";
    else if (v != (double)(size_t)v) /* within 1 PiB: exact */
      why = "is a fraction of a byte";
    else
      bytes = (size_t)v;
  }
  else if (lua_type(L, -1) == LUA_TSTRING)
    why = lpar_opts_parsesize(lua_tostring(L, -1), &bytes);
  else
    luaL_argerror(L, arg,
                  lua_pushfstring(L, "max_memory must be a size, got %s",
                                  luaL_typename(L, -1)));
  if (why != NULL)
    luaL_argerror(L, arg,
                  lua_pushfstring(L, "max_memory '%s' %s (expected %s)",
                                  luaL_tolstring(L, -1, NULL), why,
                                  LPAR_SIZEHINT));
  return bytes;
}

void lpar_opts_hook(lua_State *L, int arg, const char *name) {
  if (lua_type(L, arg) != LUA_TTABLE)
    lua_pushnil(L);
  else if (lua_getfield(L, arg, name) != LUA_TNIL &&
           lua_type(L, -1) != LUA_TFUNCTION)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a function", name));
}

lua_Integer lpar_opts_itemcount(lua_State *L, int idx) {
  lua_Integer n;
  int isint;
  int t = lua_getfield(L, idx, "n");
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return luaL_len(L, idx);
  }
  /* a count: a whole number (2.0 too, as the options take it) */
  n = lua_tointegerx(L, -1, &isint);
  if (t != LUA_TNUMBER || !isint)
    luaL_argerror(L, idx,
                  lua_pushfstring(L,
                                  "'n' must be a whole number of items, not %s",
                                  t == LUA_TNUMBER ? lua_tostring(L, -1)
                                                   : luaL_typename(L, -1)));
  lua_pop(L, 1);
  if (n < 0)
    luaL_argerror(L, idx, "'n' must not be negative");
  return n;
}

void lpar_opts_run(lua_State *L, int arg, lua_Integer *chunk, int *collect,
                   double *timeout, int *retries) {
  if (lua_getfield(L, arg, "chunksize") != LUA_TNIL) {
    *chunk = lpar_opts_count(L, arg, "chunksize");
    if (*chunk == 0)
      luaL_argerror(L, arg, "chunksize must be at least 1");
  }
  else
    lua_pop(L, 1);
  if (lua_getfield(L, arg, "on_error") != LUA_TNIL) {
    const char *s = lua_tostring(L, -1);
    if (s == NULL || (strcmp(s, "raise") != 0 && strcmp(s, "collect") != 0))
      luaL_argerror(L, arg, "on_error must be 'raise' or 'collect'");
    *collect = s[0] == 'c';
  }
  lua_pop(L, 1);
  if (lua_getfield(L, arg, "timeout") != LUA_TNIL) {
    int isnum;
    double t = (double)lua_tonumberx(L, -1, &isnum);
    if (!isnum || !(t > 0))
      luaL_argerror(L, arg, "timeout must be a positive number of seconds");
    if (t > 1e9) { /* about 31 years: its nanoseconds fit the wire */
      char why[80];
      snprintf(why, sizeof why,
               "timeout must be at most 1e9 seconds, not %.17g", t);
      luaL_argerror(L, arg, why);
    }
    *timeout = t;
  }
  lua_pop(L, 1);
  if (lua_getfield(L, arg, "retries") != LUA_TNIL) {
    lua_Integer n = lpar_opts_count(L, arg, "retries");
    if (n > LPAR_MAXRETRIES)
      luaL_argerror(L, arg,
                    lua_pushfstring(L, "retries must be at most %d, not %I",
                                    LPAR_MAXRETRIES, (LUAI_UACINT)n));
    *retries = (int)n;
  }
  else
    lua_pop(L, 1);
}

/* the files of lua/lpar, built in (embedded.c in the build tree) */
const char *lpar_embedded(const char *name, size_t *len);

/*
** lua_CFunction: (done, total, failed): draw the progress line of the
** CLI (lpar.cli's progressline) in place on stderr, ended by a newline
** once done reaches total. Upvalues: when it was made (ns), then
** progressline, loaded on the first call.
*/
static int drawbar(lua_State *L) {
  lua_Integer done = luaL_checkinteger(L, 1);
  int known = !lua_isnil(L, 2);
  lua_Integer total = known ? luaL_checkinteger(L, 2) : 0;
  if (lua_isnil(L, lua_upvalueindex(2))) {
    size_t len;
    const char *src = lpar_embedded("lpar.cli", &len);
    if (src == NULL)
      return luaL_error(L, "lpar.cli is not built in");
    if (luaL_loadbufferx(L, src, len, "=lpar.cli", "t") != LUA_OK)
      return lua_error(L);
    lua_call(L, 0, 1);
    lua_getfield(L, -1, "progressline");
    lua_replace(L, lua_upvalueindex(2));
    lua_pop(L, 1);
  }
  lua_settop(L, 3);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_insert(L, 1);
  lua_pushnumber(
      L, (lua_Number)(lpar_proc_now() - lua_tointeger(L, lua_upvalueindex(1))) /
             1e9);
  lua_call(L, 4, 1);
  fprintf(stderr, "\r%s\033[K%s", luaL_checkstring(L, -1),
          known && done >= total ? "\n" : "");
  fflush(stderr);
  return 0;
}

void lpar_opts_progress(lua_State *L, int arg) {
  int t;
  if (lua_type(L, arg) != LUA_TTABLE) {
    lua_pushnil(L);
    return;
  }
  t = lua_getfield(L, arg, "progress");
  if (t == LUA_TNIL || t == LUA_TFUNCTION)
    return;
  if (t != LUA_TBOOLEAN)
    luaL_argerror(L, arg, "progress must be a boolean or a function");
  t = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (!t || !isatty(2)) {
    lua_pushnil(L);
    return;
  }
  lua_pushinteger(L, lpar_proc_now());
  lua_pushnil(L);
  lua_pushcclosure(L, drawbar, 2);
}
