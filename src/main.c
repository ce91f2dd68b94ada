/*
** main.c: the lpar command: runs a Lua script with lpar preloaded.
** (Item streaming over a file is the CLI's own issue.)
*/
#include <stdio.h>
#include <stdlib.h>

#include "lauxlib.h"
#include "lpar.h"
#include "lualib.h"

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL)
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  int i;
  luaL_openlibs(L);
  lpar_openlib(L);
  lua_getglobal(L, "lpar");
  lua_getfield(L, -1, "parallel");
  lua_setglobal(L, "parallel");
  lua_pop(L, 1);
  if (argc < 2)
    return luaL_error(L, "usage: lpar script.lua [args]");
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  if (luaL_loadfile(L, argv[1]) != LUA_OK)
    return lua_error(L);
  lua_call(L, 0, 0);
  return 0;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int status;
  if (L == NULL) {
    fprintf(stderr, "lpar: cannot create Lua state: not enough memory\n");
    return 2;
  }
  lua_pushcfunction(L, msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 0, 1);
  if (status != LUA_OK) {
    fprintf(stderr, "lpar: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return 1;
  }
  lua_close(L);
  return 0;
}
