/*
** roundtrip_fuzz.c: libFuzzer target for decode -> encode -> decode.
** Whatever the decoder accepts, the encoder writes back, and decoding
** that gives the same value again: same shape, same shared tables and
** cycles, numbers and strings equal bit for bit. The same bytes, read as
** a program that builds a value, give a second value to round-trip.
**
** Why not compare the bytes of two encodings: pairs are written in
** lua_next order, and that order depends on how a table was filled and
** on its hash size, so the same value can be written with its pairs in
** another order. The check below is exact instead: it matches tables by
** the number the codec gives them (order of first appearance, which the
** encoder and the decoder share), so this file includes codec.c for its
** encoder and decoder states.
*/
#include "../src/codec.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Stack slots of one round: the value, the buffer of its encoding, the
   encoder's table -> id, the second decoding, the decoder's id -> table,
   and the two inverse maps made for the check. */
enum { V1 = 1, BUF1, SEEN1, V2, REFS2, RID2, REFS1 };

/*
** Encode the value at 'idx' into 'b' and push the encoder's table -> id
** map. Returns 0, or -1 with a message pushed instead.
*/
static int encodenumbered(lua_State *L, int idx, Buf *b) {
  EncState es;
  es.L = L;
  es.b = b;
  lua_newtable(L);
  es.seen = lua_gettop(L);
  es.ntab = 0;
  es.depth = 0;
  es.errrc = 0;
  if (encvalue(&es, idx) != 0) {
    if (es.errrc)
      lua_pushliteral(L, "not enough memory");
    return -1;
  }
  lua_settop(L, es.seen);
  return 0;
}

/*
** Decode p[0..len) and push the value and the decoder's id -> table map.
** Returns 0, or -1 with a message pushed; all bytes must be used.
*/
static int decodenumbered(lua_State *L, const char *p, size_t len) {
  DecState ds;
  lua_newtable(L);
  decbegin(&ds, L, p, len, 0, lua_gettop(L));
  if (decvalue(&ds) != 0 || ds.pos != len)
    return -1;
  lua_insert(L, -2); /* value below refs */
  return 0;
}

/* Whether the values at x (first decoding) and y (second) are the same:
   tables by number, the rest bit for bit. */
static int same(lua_State *L, int x, int y) {
  int t = lua_type(L, x);
  if (t != lua_type(L, y))
    return 0;
  if (t == LUA_TTABLE) {
    int ok;
    lua_pushvalue(L, x);
    lua_rawget(L, SEEN1);
    lua_pushvalue(L, y);
    lua_rawget(L, RID2);
    ok = lua_isinteger(L, -1) && lua_isinteger(L, -2) &&
         lua_tointeger(L, -1) == lua_tointeger(L, -2);
    lua_pop(L, 2);
    return ok;
  }
  if (t == LUA_TNUMBER) {
    double a, b;
    if (lua_isinteger(L, x) || lua_isinteger(L, y))
      return lua_isinteger(L, x) && lua_isinteger(L, y) &&
             lua_tointeger(L, x) == lua_tointeger(L, y);
    a = (double)lua_tonumber(L, x);
    b = (double)lua_tonumber(L, y);
    return memcmp(&a, &b, sizeof a) == 0;
  }
  return lua_rawequal(L, x, y);
}

static lua_Integer npairs(lua_State *L, int t) {
  lua_Integer n = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    n++;
    lua_pop(L, 1);
  }
  return n;
}

/* Whether table A (first decoding) and table B (second) hold the same
   pairs, keys and values matched by same(). */
static int sametable(lua_State *L, int a, int b) {
  if (npairs(L, a) != npairs(L, b))
    return 0;
  lua_pushnil(L);
  while (lua_next(L, a)) {
    int k = lua_gettop(L) - 1;
    if (lua_type(L, k) == LUA_TTABLE) { /* B's key: the table of that id */
      lua_pushvalue(L, k);
      lua_rawget(L, SEEN1);
      if (!lua_isinteger(L, -1))
        abort(); /* the encoder numbers every table it writes */
      lua_rawget(L, REFS2);
    }
    else
      lua_pushvalue(L, k);
    lua_rawget(L, b);
    if (!same(L, k + 1, k + 2))
      return 0;
    lua_pop(L, 2); /* pop B's value and A's value, keep the key */
  }
  return 1;
}

/* Check the second decoding against the first, table by table. */
static void check(lua_State *L) {
  lua_Integer id, ntab = npairs(L, SEEN1);
  luaL_checkstack(L, 12, "no room to check a value");
  if (npairs(L, REFS2) != ntab)
    abort();       /* as many tables decoded as were written */
  lua_newtable(L); /* RID2: table -> id of the second decoding */
  lua_newtable(L); /* REFS1: id -> table of the first decoding */
  for (id = 0; id < ntab; id++) {
    if (lua_rawgeti(L, REFS2, id) != LUA_TTABLE)
      abort();
    lua_pushinteger(L, id);
    lua_rawset(L, RID2);
  }
  lua_pushnil(L);
  while (lua_next(L, SEEN1)) {
    lua_pushvalue(L, -2);
    lua_rawset(L, REFS1);
  }
  if (!same(L, V1, V2))
    abort();
  for (id = 0; id < ntab; id++) {
    lua_rawgeti(L, REFS1, id);
    lua_rawgeti(L, REFS2, id);
    if (!sametable(L, lua_gettop(L) - 1, lua_gettop(L)))
      abort();
    lua_pop(L, 2);
  }
}

/*
** checkround(v) -> v2: encode v, decode that, check the two are the same
** value. Returns nothing if v cannot be encoded because of its depth.
*/
static int checkround(lua_State *L) {
  Buf *b;
  lua_settop(L, V1);
  b = lpar_codec_newbuf(L); /* BUF1 */
  if (encodenumbered(L, V1, b) != 0) {
    /* a value may decode whose first appearance of a shared table lies
       deeper on the walk the encoder takes: only depth may fail */
    if (strstr(lua_tostring(L, -1), "nested too deeply") == NULL)
      abort();
    return 0;
  }
  if (decodenumbered(L, b->p, b->n) != 0)
    abort(); /* the encoder's own bytes decode, all of them */
  check(L);
  lua_pushvalue(L, V2);
  return 1;
}

/*
** build(p, len) -> v: a value made by a small stack machine whose program
** is the bytes, so that the round trip also starts from values the
** decoder would never make (integral floats, boolean keys...). Tables
** made so far can be pushed again, which gives shared tables and cycles.
*/
static int build(lua_State *L) {
  const unsigned char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2), i = 0;
  int tables, base;
  lua_settop(L, 2);
  luaL_checkstack(L, 64 + 8, "no room to build a value");
  lua_newtable(L); /* 3: every table made, in order */
  tables = 3;
  base = lua_gettop(L); /* the machine's stack starts above */
  while (i < len) {
    int op = p[i++] % 13, n = lua_gettop(L) - base;
    if (n >= 64 && op <= 9)
      op = 12; /* stack full: drop instead of push */
    switch (op) {
    case 0:
      lua_pushnil(L);
      break;
    case 1:
    case 2:
      lua_pushboolean(L, op == 1);
      break;
    case 3:   /* integer: up to 8 bytes, any 64 bits */
    case 5: { /* float: 8 bytes of bits, any NaN, -0.0, denormals */
      uint64_t u = 0;
      double d;
      int k;
      for (k = 0; k < 8 && i < len; k++)
        u |= (uint64_t)p[i++] << (8 * k);
      memcpy(&d, &u, sizeof d);
      if (op == 3)
        lua_pushinteger(L, (lua_Integer)u);
      else
        lua_pushnumber(L, d);
      break;
    }
    case 4: /* small integer, or (6) the float of the same value */
    case 6: {
      int v = i < len ? (signed char)p[i++] : 0;
      if (op == 4)
        lua_pushinteger(L, v);
      else
        lua_pushnumber(L, v);
      break;
    }
    case 7: { /* string of the next k bytes */
      size_t k = i < len ? p[i++] : 0;
      if (k > len - i)
        k = len - i;
      lua_pushlstring(L, (const char *)p + i, k);
      i += k;
      break;
    }
    case 8: /* new table */
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawseti(L, tables, (lua_Integer)lua_rawlen(L, tables) + 1);
      break;
    case 9: { /* a table made before */
      lua_Unsigned nt = lua_rawlen(L, tables);
      if (nt == 0 || i >= len)
        lua_pushnil(L);
      else
        lua_rawgeti(L, tables, (lua_Integer)(p[i++] % nt) + 1);
      break;
    }
    case 10: /* t k v -> t, t[k] = v (if k can be a key) */
      if (n >= 3 && lua_istable(L, -3) && !lua_isnil(L, -2) &&
          !(lua_type(L, -2) == LUA_TNUMBER && !lua_isinteger(L, -2) &&
            isnan((double)lua_tonumber(L, -2))))
        lua_rawset(L, -3);
      else if (n >= 1)
        lua_pop(L, 1);
      break;
    case 11: /* t v -> t, t[#t + 1] = v */
      if (n >= 2 && lua_istable(L, -2))
        lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
      else if (n >= 1)
        lua_pop(L, 1);
      break;
    default: /* drop the top */
      if (n >= 2)
        lua_pop(L, 1);
      break;
    }
  }
  if (lua_gettop(L) == base)
    lua_pushnil(L);
  lua_settop(L, base + 1); /* the first value pushed */
  return 1;
}

/*
** roundtrip(p, len): if the bytes decode, two checked rounds of encode
** -> decode from that value; then the same from the value the bytes
** build as a program.
*/
static int roundtrip(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  size_t pos = 0;
  lua_settop(L, 2);
  if (lpar_codec_decode(L, p, len, &pos) == 0) {
    lua_pushcfunction(L, checkround);
    lua_insert(L, -2);
    lua_call(L, 1, LUA_MULTRET);
    if (lua_gettop(L) == 3) { /* a second round from the second decoding */
      lua_pushcfunction(L, checkround);
      lua_insert(L, -2);
      lua_call(L, 1, 0);
    }
  }
  lua_settop(L, 2);
  lua_pushcfunction(L, checkround);
  lua_pushcfunction(L, build);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_call(L, 2, 1);
  lua_call(L, 1, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = luaL_newstate();
  if (L == NULL)
    return 0;
  lua_pushcfunction(L, roundtrip);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK)
    abort(); /* only memory errors may raise */
  lua_close(L);
  return 0;
}
