/*
** mkcorpus.c: writes the seed corpus of the fuzz targets: each value of
** a Lua file (seeds.lua) encoded into a file of its own.
** Usage: mkcorpus seeds.lua outdir
*/
#include <stdio.h>
#include <stdlib.h>

#include "codec.h"
#include "lauxlib.h"
#include "lcompat.h"
#include "lualib.h"

/* Write the encoding of list[i] to dir/seed-<i>. */
static int writeseed(lua_State *L, int list, lua_Integer i, const char *dir) {
  Buf *b = lpar_codec_newbuf(L);
  char name[4096];
  FILE *f;
  lua_rawgeti(L, list, i);
  if (lpar_codec_encode(L, -1, b) != 0) {
    fprintf(stderr, "mkcorpus: value %d: %s\n", (int)i, lua_tostring(L, -1));
    return -1;
  }
  snprintf(name, sizeof name, "%s/seed-%03d", dir, (int)i);
  f = fopen(name, "wb");
  if (f == NULL || fwrite(b->p, 1, b->n, f) != b->n || fclose(f) != 0) {
    perror(name);
    return -1;
  }
  lua_pop(L, 2); /* pop value and buffer */
  return 0;
}

int main(int argc, char **argv) {
  lua_State *L;
  lua_Integer i, n;
  if (argc != 3) {
    fprintf(stderr, "usage: mkcorpus seeds.lua outdir\n");
    return 2;
  }
  L = luaL_newstate();
  luaL_openlibs(L);
  if (luaL_dofile(L, argv[1]) != LUA_OK) {
    fprintf(stderr, "mkcorpus: %s\n", lua_tostring(L, -1));
    return 1;
  }
  /* the file returns table.pack(...) of the values */
  lua_getfield(L, -1, "n");
  n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  for (i = 1; i <= n; i++)
    if (writeseed(L, lua_gettop(L), i, argv[2]) != 0)
      return 1;
  lua_close(L);
  printf("%d seeds in %s\n", (int)n, argv[2]);
  return 0;
}
