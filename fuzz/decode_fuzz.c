/*
** decode_fuzz.c: libFuzzer target for the decoder. Any bytes, decoded in
** a fresh lua_State, give one value or an error: never a crash or a leak,
** and never more Lua heap than the bound README "Wire format" states.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "codec.h"
#include "lauxlib.h"
#include "lcompat.h"

/* the bound: DECMEM bytes of Lua heap per input byte, plus DECSLACK */
#define DECMEM 46
#define DECSLACK (64 * 1024)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Bytes of the Lua heap: now, when decoding began, and the most since. */
typedef struct Count {
  size_t used, base, peak;
} Count;

static Count count;

static void *countalloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  Count *c = ud;
  size_t old = ptr ? osize : 0;
  void *p;
  if (nsize == 0) {
    free(ptr);
    c->used -= old;
    return NULL;
  }
  p = realloc(ptr, nsize);
  if (p == NULL)
    return NULL;
  c->used = c->used - old + nsize;
  if (c->used > c->peak)
    c->peak = c->used;
  return p;
}

/* decode(p, len) -> ok, value or message. Aborts on a broken contract. */
static int decodeall(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  size_t pos = 0;
  int top = lua_gettop(L), rc;
  luaL_checkstack(L, 4, "no room");
  count.base = count.peak = count.used;
  rc = lpar_codec_decode(L, p, len, &pos);
  if (count.peak - count.base > DECMEM * len + DECSLACK)
    abort(); /* more memory than the bound */
  if (lua_gettop(L) != top + 1)
    abort(); /* exactly one value or one message */
  if (rc != 0) {
    if (lua_type(L, -1) != LUA_TSTRING || pos != 0)
      abort(); /* a message, and the position left alone */
    lua_pushboolean(L, 0);
  }
  else {
    size_t skipped = 0;
    if (pos == 0 || pos > len)
      abort(); /* a value takes at least its tag, and no more than given */
    if (lpar_codec_skip(p, len, &skipped) != 0 || skipped != pos)
      abort(); /* skipping a value ends where decoding it does */
    lua_pushboolean(L, 1);
  }
  return 2;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = lua_newstate(countalloc, &count);
  if (L == NULL)
    return 0;
  lua_gc(L, LUA_GCSTOP, 0); /* garbage counts too */
  lua_pushcfunction(L, decodeall);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  if (lua_pcall(L, 2, 2, 0) != LUA_OK)
    abort(); /* the decoder raised: only memory errors may, and these
                inputs are small */
  lua_close(L);
  return 0;
}
