/*
** codec.c: the compact binary encoding of Lua values used between the
** parent and its workers: written and read directly against the Lua C API.
*/
#include "codec.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "lpar.h"

#define LPAR_STR_(x) #x
#define LPAR_STR(x) LPAR_STR_(x)

#define BUFMT "lpar.Buf"

static int buf_gc(lua_State *L) {
  lpar_buf_free(lua_touserdata(L, 1));
  return 0;
}

Buf *lpar_codec_newbuf(lua_State *L) {
  Buf *b = lua_newuserdatauv(L, sizeof(Buf), 0);
  memset(b, 0, sizeof *b);
  if (luaL_newmetatable(L, BUFMT)) {
    lua_pushcfunction(L, buf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return b;
}

typedef struct EncState {
  lua_State *L;
  Buf *b;
  int seen;   /* stack index of the table -> id map, 0 until needed */
  int ntab;   /* tables numbered so far */
  int depth;  /* current nesting */
  int errrc;  /* buffer error (-ENOMEM) or 0 */
  int path[LPAR_MAXDEPTH + 1]; /* stack index of each level's key, or 0 */
  lua_Integer ipath[LPAR_MAXDEPTH + 1]; /* array index when path[i] == 0 */
} EncState;

int lpar_codec_putvarint(Buf *b, unsigned long long v) {
  unsigned char tmp[10];
  int n = 0;
  while (v >= 0x80) {
    tmp[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  tmp[n++] = (unsigned char)v;
  return lpar_buf_add(b, tmp, (size_t)n);
}

int lpar_codec_getvarint(const char *p, size_t len, size_t *pos,
                         unsigned long long *v) {
  unsigned long long r = 0;
  int shift = 0;
  size_t i = *pos;
  for (;;) {
    unsigned char c;
    if (i >= len || shift > 63)
      return -1;
    c = (unsigned char)p[i++];
    if (shift == 63 && (c & 0x7e))
      return -1; /* more than 64 bits */
    r |= (unsigned long long)(c & 0x7f) << shift;
    if (!(c & 0x80))
      break;
    shift += 7;
  }
  *pos = i;
  *v = r;
  return 0;
}

/* Append the path of the part being encoded (levels 1..depth) to B. */
static void addpath(EncState *es, luaL_Buffer *B) {
  lua_State *L = es->L;
  int i;
  for (i = 1; i <= es->depth; i++) {
    int k = es->path[i];
    if (i > 12 && i < es->depth - 2) {
      luaL_addstring(B, "...");
      i = es->depth - 3;
      continue;
    }
    if (k == 0)
      lua_pushfstring(L, "[%I]", (LUAI_UACINT)es->ipath[i]);
    else if (lua_type(L, k) == LUA_TSTRING) {
      const char *s = lua_tostring(L, k);
      size_t j, n = strlen(s);
      int ident = n > 0 && n == lua_rawlen(L, k) && !(s[0] >= '0' && s[0] <= '9');
      for (j = 0; ident && j < n; j++)
        ident = (s[j] == '_' || (s[j] >= 'a' && s[j] <= 'z') ||
                 (s[j] >= 'A' && s[j] <= 'Z') || (s[j] >= '0' && s[j] <= '9'));
      if (ident)
        lua_pushfstring(L, i == 1 ? "%s" : ".%s", s);
      else
        lua_pushfstring(L, "[%q]", s);
    }
    else if (lua_type(L, k) == LUA_TNUMBER) {
      lua_pushvalue(L, k);
      lua_pushfstring(L, "[%s]", lua_tostring(L, -1));
      lua_remove(L, -2);
    }
    else
      lua_pushfstring(L, "[%s key]", luaL_typename(L, k));
    luaL_addvalue(B);
  }
}

/* Push "<path> <what>" and return -1. */
static int encerror(EncState *es, const char *what) {
  luaL_Buffer B;
  lua_State *L = es->L;
  luaL_buffinit(L, &B);
  if (es->depth == 0)
    luaL_addstring(&B, "value");
  else
    addpath(es, &B);
  luaL_addchar(&B, ' ');
  luaL_addstring(&B, what);
  luaL_pushresult(&B);
  return -1;
}

static int putbyte(EncState *es, int c) {
  Buf *b = es->b;
  if (b->n < b->cap) {
    b->p[b->n++] = (char)c;
    return 0;
  }
  return (es->errrc = lpar_buf_add(b, &(char){(char)c}, 1));
}

static int encvalue(EncState *es, int idx);

static int enctable(EncState *es, int idx) {
  lua_State *L = es->L;
  lua_Integer n, i;
  int rc;
  if (es->depth >= LPAR_MAXDEPTH)
    return encerror(es, "is nested too deeply (limit " LPAR_STR(LPAR_MAXDEPTH)
                        " levels)");
  luaL_checkstack(L, 6, "value nested too deeply");
  if (es->seen == 0) {
    lua_newtable(L);
    es->seen = lua_gettop(L);
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, es->seen) == LUA_TNUMBER) { /* seen: back-reference */
    lua_Integer id = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (putbyte(es, LPAR_TREF) ||
        (es->errrc = lpar_codec_putvarint(es->b, (unsigned long long)id)))
      return -1;
    return 0;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, es->ntab++);
  lua_rawset(L, es->seen);
  n = (lua_Integer)lua_rawlen(L, idx);
  if (putbyte(es, LPAR_TTABLE) ||
      (es->errrc = lpar_codec_putvarint(es->b, (unsigned long long)n)))
    return -1;
  es->depth++;
  es->path[es->depth] = 0;
  for (i = 1; i <= n; i++) {
    es->ipath[es->depth] = i;
    lua_rawgeti(L, idx, i);
    rc = encvalue(es, lua_gettop(L));
    if (rc)
      return rc;
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int k = lua_gettop(L) - 1;
    if (lua_isinteger(L, k)) {
      lua_Integer ki = lua_tointeger(L, k);
      if (ki >= 1 && ki <= n) {
        lua_pop(L, 1);
        continue;
      }
    }
    es->path[es->depth] = k;
    if ((rc = encvalue(es, k)) != 0)
      return rc; /* key already names itself in the path */
    if ((rc = encvalue(es, k + 1)) != 0)
      return rc;
    lua_pop(L, 1);
  }
  es->depth--;
  return putbyte(es, LPAR_TEND);
}

static int encvalue(EncState *es, int idx) {
  lua_State *L = es->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return putbyte(es, LPAR_TNIL);
  case LUA_TBOOLEAN:
    return putbyte(es, lua_toboolean(L, idx) ? LPAR_TTRUE : LPAR_TFALSE);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      unsigned long long u = (unsigned long long)lua_tointeger(L, idx);
      u = (u << 1) ^ (0ULL - (u >> 63)); /* zigzag */
      if (putbyte(es, LPAR_TINT) ||
          (es->errrc = lpar_codec_putvarint(es->b, u)))
        return -1;
      return 0;
    }
    else {
      double d = (double)lua_tonumber(L, idx);
      uint64_t bits;
      unsigned char tmp[9];
      int i;
      memcpy(&bits, &d, sizeof bits);
      tmp[0] = LPAR_TFLOAT;
      for (i = 0; i < 8; i++)
        tmp[i + 1] = (unsigned char)(bits >> (8 * i));
      return (es->errrc = lpar_buf_add(es->b, tmp, sizeof tmp));
    }
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (putbyte(es, LPAR_TSTR) ||
        (es->errrc = lpar_codec_putvarint(es->b, len)) ||
        (es->errrc = lpar_buf_add(es->b, s, len)))
      return -1;
    return 0;
  }
  case LUA_TTABLE:
    return enctable(es, idx);
  default: {
    const char *what = lua_pushfstring(L, "is a %s", luaL_typename(L, idx));
    int rc = encerror(es, what);
    lua_remove(L, -2);
    return rc;
  }
  }
}

int lpar_codec_encode(lua_State *L, int idx, Buf *b) {
  EncState es;
  int top, rc;
  idx = lua_absindex(L, idx);
  top = lua_gettop(L);
  es.L = L;
  es.b = b;
  es.seen = 0;
  es.ntab = 0;
  es.depth = 0;
  es.errrc = 0;
  rc = encvalue(&es, idx);
  if (rc == 0) {
    lua_settop(L, top);
    return 0;
  }
  if (es.errrc) { /* out of memory in the buffer, no message pushed yet */
    lua_settop(L, top);
    lua_pushliteral(L, "not enough memory");
    return -1;
  }
  lua_replace(L, top + 1); /* keep the message only */
  lua_settop(L, top + 1);
  return -1;
}

typedef struct DecState {
  lua_State *L;
  const char *p;
  size_t len, pos;
  int refs;  /* stack index of id -> table, or the nil placeholder */
  int ntab;
  int depth;
} DecState;

static int decerror(DecState *ds, const char *what) {
  lua_pushfstring(ds->L, "%s at byte %I", what, (LUAI_UACINT)ds->pos);
  return -1;
}

static int decvalue(DecState *ds);

static int dectable(DecState *ds) {
  lua_State *L = ds->L;
  unsigned long long n, i;
  int t;
  if (ds->depth >= LPAR_MAXDEPTH)
    return decerror(ds, "value nested too deeply");
  if (lpar_codec_getvarint(ds->p, ds->len, &ds->pos, &n))
    return decerror(ds, "truncated table");
  if (n > ds->len - ds->pos) /* every element takes at least a byte */
    return decerror(ds, "table longer than its frame");
  if (!lua_checkstack(L, 4))
    return decerror(ds, "value nested too deeply for the C stack");
  lua_createtable(L, n > INT32_MAX ? INT32_MAX : (int)n, 0);
  t = lua_gettop(L);
  if (lua_isnil(L, ds->refs)) {
    lua_newtable(L);
    lua_replace(L, ds->refs);
  }
  lua_pushvalue(L, t);
  lua_rawseti(L, ds->refs, ds->ntab++);
  ds->depth++;
  for (i = 1; i <= n; i++) {
    if (decvalue(ds))
      return -1;
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (;;) {
    if (ds->pos >= ds->len)
      return decerror(ds, "truncated table");
    if ((unsigned char)ds->p[ds->pos] == LPAR_TEND) {
      ds->pos++;
      break;
    }
    if (decvalue(ds))
      return -1;
    if (lua_isnil(L, -1))
      return decerror(ds, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))
      return decerror(ds, "NaN table key");
    if (decvalue(ds))
      return -1;
    lua_rawset(L, t);
  }
  ds->depth--;
  return 0;
}

static int decvalue(DecState *ds) {
  lua_State *L = ds->L;
  unsigned long long u;
  int tag;
  if (ds->pos >= ds->len)
    return decerror(ds, "truncated value");
  tag = (unsigned char)ds->p[ds->pos++];
  switch (tag) {
  case LPAR_TNIL:
    lua_pushnil(L);
    return 0;
  case LPAR_TFALSE:
  case LPAR_TTRUE:
    lua_pushboolean(L, tag == LPAR_TTRUE);
    return 0;
  case LPAR_TINT:
    if (lpar_codec_getvarint(ds->p, ds->len, &ds->pos, &u))
      return decerror(ds, "truncated integer");
    lua_pushinteger(L, (lua_Integer)((u >> 1) ^ (0ULL - (u & 1))));
    return 0;
  case LPAR_TFLOAT: {
    uint64_t bits = 0;
    double d;
    int i;
    if (ds->len - ds->pos < 8)
      return decerror(ds, "truncated float");
    for (i = 0; i < 8; i++)
      bits |= (uint64_t)(unsigned char)ds->p[ds->pos + i] << (8 * i);
    ds->pos += 8;
    memcpy(&d, &bits, sizeof d);
    lua_pushnumber(L, (lua_Number)d);
    return 0;
  }
  case LPAR_TSTR:
    if (lpar_codec_getvarint(ds->p, ds->len, &ds->pos, &u))
      return decerror(ds, "truncated string length");
    if (u > ds->len - ds->pos)
      return decerror(ds, "truncated string");
    lua_pushlstring(L, ds->p + ds->pos, (size_t)u);
    ds->pos += (size_t)u;
    return 0;
  case LPAR_TTABLE:
    return dectable(ds);
  case LPAR_TREF:
    if (lpar_codec_getvarint(ds->p, ds->len, &ds->pos, &u))
      return decerror(ds, "truncated reference");
    if (u >= (unsigned long long)ds->ntab)
      return decerror(ds, "reference to an unknown table");
    lua_rawgeti(L, ds->refs, (lua_Integer)u);
    return 0;
  default:
    ds->pos--;
    return decerror(ds, "bad value tag");
  }
}

int lpar_codec_decode(lua_State *L, const char *p, size_t len, size_t *pos) {
  DecState ds;
  int base;
  luaL_checkstack(L, 4, "no room to decode a value");
  lua_pushnil(L); /* placeholder for the table of references */
  base = lua_gettop(L);
  ds.L = L;
  ds.p = p;
  ds.len = len;
  ds.pos = *pos;
  ds.refs = base;
  ds.ntab = 0;
  ds.depth = 0;
  if (decvalue(&ds)) {
    lua_replace(L, base); /* message replaces everything decoded */
    lua_settop(L, base);
    return -1;
  }
  lua_replace(L, base);
  lua_settop(L, base);
  *pos = ds.pos;
  return 0;
}
