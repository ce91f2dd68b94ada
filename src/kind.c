/*
** kind.c: the kinds of failure: their names, the codes of wait statuses
** and frames, and the failure lpar gave the caller last.
*/
#include <stdint.h>
#include <sys/wait.h>

#include "kind.h"
#include "lauxlib.h"
#include "lcompat.h"

static const char *const names[] = {
    NULL,       "error", "timeout", "signal",    "exit",        "memory",
    "protocol", "init",  "lost",    "cancelled", "interrupted", "output"};

#define NKINDS ((int)(sizeof names / sizeof names[0]))

/* registry key of {value, code}: the failure given last */
static const char lastkey = 0;

int lpar_kind_fromstatus(int status) {
  if (WIFSIGNALED(status))
    return LPAR_KINDCODE(LPAR_KSIGNAL, WTERMSIG(status));
  if (WIFEXITED(status))
    return LPAR_KINDCODE(LPAR_KEXIT, WEXITSTATUS(status));
  return LPAR_KLOST;
}

int lpar_kind_fromwire(uint32_t count) {
  int kind = (int)(count & 0xff);
  if (kind < LPAR_KERROR || kind >= NKINDS)
    return LPAR_KERROR;
  return (int)(count & 0xffffff);
}

void lpar_kind_push(lua_State *L, int code) {
  int kind = LPAR_KINDOF(code);
  if (kind <= 0 || kind >= NKINDS) {
    lua_pushnil(L);
    lua_pushnil(L);
    return;
  }
  lua_pushstring(L, names[kind]);
  if (LPAR_KINDDETAIL(code) > 0)
    lua_pushinteger(L, LPAR_KINDDETAIL(code));
  else
    lua_pushnil(L);
}

void lpar_kind_mark(lua_State *L, int code) {
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, code);
  lua_rawseti(L, -2, 2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &lastkey);
}

/* The code marked for the value at 'idx' if it is the failure given
   last, else 0. */
static int marked(lua_State *L, int idx) {
  int code = 0;
  idx = lua_absindex(L, idx);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &lastkey) == LUA_TTABLE) {
    lua_rawgeti(L, -1, 1);
    if (lua_rawequal(L, -1, idx)) {
      lua_rawgeti(L, -2, 2);
      code = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return code;
}

int lpar_kind_code(lua_State *L, int idx) {
  int code = marked(L, idx);
  return code != 0 ? code : LPAR_KERROR;
}

int lpar_kind_raise(lua_State *L, int code) {
  lpar_kind_mark(L, code);
  return lua_error(L);
}

int lpar_kind_errkind(lua_State *L) {
  int code;
  luaL_checkany(L, 1);
  code = marked(L, 1);
  if (code == 0)
    return 0;
  lpar_kind_push(L, code);
  if (lua_isnil(L, -1)) { /* no detail: the kind alone */
    lua_pop(L, 1);
    return 1;
  }
  return 2;
}
