/*
** decode_fuzz.c: libFuzzer target for the decoder. Any bytes, decoded in
** a fresh lua_State, give one value or an error: never a crash or a leak.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "codec.h"
#include "lauxlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* decode(p, len) -> ok, value or message. Aborts on a broken contract. */
static int decodeall(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  size_t pos = 0;
  int top = lua_gettop(L);
  int rc = lpar_codec_decode(L, p, len, &pos);
  if (lua_gettop(L) != top + 1)
    abort(); /* exactly one value or one message */
  if (rc != 0) {
    if (lua_type(L, -1) != LUA_TSTRING || pos != 0)
      abort(); /* a message, and the position left alone */
    lua_pushboolean(L, 0);
  }
  else {
    if (pos == 0 || pos > len)
      abort(); /* a value takes at least its tag, and no more than given */
    lua_pushboolean(L, 1);
  }
  return 2;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = luaL_newstate();
  if (L == NULL)
    return 0;
  lua_pushcfunction(L, decodeall);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  if (lua_pcall(L, 2, 2, 0) != LUA_OK)
    abort(); /* the decoder raised: only memory errors may, and these
                inputs are small */
  lua_close(L);
  return 0;
}
