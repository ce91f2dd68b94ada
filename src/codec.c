/*
** codec.c: the compact binary encoding of Lua values used between the
** parent and its workers: written and read directly against the Lua C API.
*/
#include "codec.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"

#define LPAR_STR_(x) #x
#define LPAR_STR(x) LPAR_STR_(x)

#define BUFMT "lpar.Buf"

/* longest varint: 64 bits in 7-bit groups */
#define MAXVARINT 10

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

/* Write 'v' as a varint at 'p' (room for MAXVARINT bytes); returns the
   number of bytes written. */
static inline size_t putuv(char *p, unsigned long long v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (char)v;
  return n;
}

int lpar_codec_putvarint(Buf *b, unsigned long long v) {
  int rc = lpar_buf_reserve(b, MAXVARINT);
  if (rc == 0)
    b->n += putuv(b->p + b->n, v);
  return rc;
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

static inline unsigned long long zigzag(lua_Integer i) {
  unsigned long long u = (unsigned long long)i;
  return (u << 1) ^ (0ULL - (u >> 63));
}

static inline lua_Integer unzigzag(unsigned long long u) {
  return (lua_Integer)((u >> 1) ^ (0ULL - (u & 1)));
}

/*
** Encoder. The value is walked depth first; tables are numbered in the
** order they are first met, which is the order the decoder creates them,
** so a table met again is written as a reference to its number.
*/
typedef struct EncState {
  lua_State *L;
  Buf *b;
  int seen;  /* stack index of the table -> id map, 0 until needed */
  int ntab;  /* tables numbered so far */
  int depth; /* current nesting */
  int errrc; /* buffer error (-ENOMEM) or 0 */
  int path[LPAR_MAXDEPTH + 1]; /* stack index of each level's key, or 0 */
  lua_Integer ipath[LPAR_MAXDEPTH + 1]; /* array index when path[i] == 0 */
} EncState;

/* Append the string key at 'k' to B as a quoted Lua string, the first
   40 bytes of it. */
static void addquoted(lua_State *L, luaL_Buffer *B, int k) {
  size_t i, n;
  const unsigned char *s = (const unsigned char *)lua_tolstring(L, k, &n);
  luaL_addchar(B, '"');
  for (i = 0; i < n && i < 40; i++) {
    if (s[i] == '"' || s[i] == '\\') {
      luaL_addchar(B, '\\');
      luaL_addchar(B, (char)s[i]);
    }
    else if (s[i] < 0x20 || s[i] >= 0x7f) {
      char esc[8];
      snprintf(esc, sizeof esc, "\\%03d", s[i]);
      luaL_addstring(B, esc);
    }
    else
      luaL_addchar(B, (char)s[i]);
  }
  if (n > 40)
    luaL_addstring(B, "...");
  luaL_addchar(B, '"');
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
      int ident = n > 0 && n <= 40 && n == lua_rawlen(L, k) &&
                  !(s[0] >= '0' && s[0] <= '9');
      for (j = 0; ident && j < n; j++)
        ident = (s[j] == '_' || (s[j] >= 'a' && s[j] <= 'z') ||
                 (s[j] >= 'A' && s[j] <= 'Z') || (s[j] >= '0' && s[j] <= '9'));
      if (ident)
        lua_pushfstring(L, i == 1 ? "%s" : ".%s", s);
      else {
        luaL_addchar(B, '[');
        addquoted(L, B, k);
        luaL_addchar(B, ']');
        continue;
      }
    }
    else if (lua_type(L, k) == LUA_TBOOLEAN)
      lua_pushstring(L, lua_toboolean(L, k) ? "[true]" : "[false]");
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

/* Make room for 'n' more bytes: 0, or -1 with errrc set. */
static inline int room(EncState *es, size_t n) {
  Buf *b = es->b;
  if (n <= b->cap - b->n)
    return 0;
  return (es->errrc = lpar_buf_reserve(b, n)) != 0 ? -1 : 0;
}

static inline int putbyte(EncState *es, int c) {
  if (room(es, 1))
    return -1;
  es->b->p[es->b->n++] = (char)c;
  return 0;
}

static int enctable(EncState *es, int idx);

/*
** Append the value at stack index 'idx'. Returns 0, or -1 with either
** errrc set (out of memory) or a message pushed.
*/
static int encvalue(EncState *es, int idx) {
  lua_State *L = es->L;
  Buf *b;
#if LPAR_DOUBLES
  /* doubles only: an integral one travels as an integer (a Lua with
     integers gets one), all others and -0.0 as a float */
  if (lua_isinteger(L, idx) &&
      !(lua_tonumber(L, idx) == 0 && signbit(lua_tonumber(L, idx)))) {
#else
  if (lua_isinteger(L, idx)) { /* the common case first */
#endif
    if (room(es, 1 + MAXVARINT))
      return -1;
    b = es->b;
    b->p[b->n] = LPAR_TINT;
    b->n += 1 + putuv(b->p + b->n + 1, zigzag(lua_tointeger(L, idx)));
    return 0;
  }
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return putbyte(es, LPAR_TNIL);
  case LUA_TBOOLEAN:
    return putbyte(es, lua_toboolean(L, idx) ? LPAR_TTRUE : LPAR_TFALSE);
  case LUA_TNUMBER: { /* a float */
    double d = (double)lua_tonumber(L, idx);
    uint64_t bits;
    char *p;
    int i;
    if (room(es, 9))
      return -1;
    b = es->b;
    p = b->p + b->n;
    memcpy(&bits, &d, sizeof bits);
    p[0] = LPAR_TFLOAT;
    for (i = 0; i < 8; i++)
      p[i + 1] = (char)(bits >> (8 * i));
    b->n += 9;
    return 0;
  }
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (room(es, 1 + MAXVARINT + len))
      return -1;
    b = es->b;
    b->p[b->n] = LPAR_TSTR;
    b->n += 1 + putuv(b->p + b->n + 1, len);
    memcpy(b->p + b->n, s, len);
    b->n += len;
    return 0;
  }
  case LUA_TTABLE:
    return enctable(es, idx);
  default: {
    const char *what = lua_pushfstring(L, "is a %s", luaL_typename(L, idx));
    int rc = encerror(es, what);
    lua_remove(L, -2); /* remove 'what' */
    return rc;
  }
  }
}

/*
** Append the table at 'idx' (an absolute index): a reference if it was
** met before, else n = #t, the values t[1..n], the other pairs and an
** end tag. Stack effect: none on success.
*/
static int enctable(EncState *es, int idx) {
  lua_State *L = es->L;
  lua_Integer n, i;
  int rc, top, restart;
  if (es->depth >= LPAR_MAXDEPTH)
    return encerror(
        es, "is nested too deeply (limit " LPAR_STR(LPAR_MAXDEPTH) " levels)");
  luaL_checkstack(L, 6, "value nested too deeply");
  if (es->seen == 0) {
    lua_newtable(L);
    es->seen = lua_gettop(L);
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, es->seen) == LUA_TNUMBER) { /* seen: back-reference */
    lua_Integer id = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (room(es, 1 + MAXVARINT))
      return -1;
    es->b->p[es->b->n] = LPAR_TREF;
    es->b->n += 1 + putuv(es->b->p + es->b->n + 1, (unsigned long long)id);
    return 0;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, es->ntab++);
  lua_rawset(L, es->seen);
  n = (lua_Integer)lua_rawlen(L, idx);
  if (room(es, 1 + MAXVARINT))
    return -1;
  es->b->p[es->b->n] = LPAR_TTABLE;
  es->b->n += 1 + putuv(es->b->p + es->b->n + 1, (unsigned long long)n);
  es->depth++;
  es->path[es->depth] = 0;
  /* lua_next gives the array part first, in order: while its keys are
     1, 2, 3..., one traversal serves both the array values and the
     pairs. If it strays (a hole, or part of 1..n in the hash part), the
     rest of 1..n is read by index and the pairs restart from the top,
     skipping 1..n; the bytes are the same either way. */
  restart = 0;
  top = lua_gettop(L);
  lua_pushnil(L);
  for (i = 1; i <= n; i++) {
    if (!lua_next(L, idx)) { /* cannot happen with t[n] ~= nil; be safe */
      restart = 1;
      break;
    }
    if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) != i) {
      lua_settop(L, top); /* pop key and value */
      restart = 1;
      break;
    }
    es->ipath[es->depth] = i;
    if ((rc = encvalue(es, top + 2)) != 0)
      return rc;
    lua_pop(L, 1); /* pop value, keep key */
  }
  if (restart) {
    for (; i <= n; i++) {
      es->ipath[es->depth] = i;
      lua_rawgeti(L, idx, i);
      if ((rc = encvalue(es, top + 1)) != 0)
        return rc;
      lua_pop(L, 1);
    }
    lua_pushnil(L);
  }
  while (lua_next(L, idx)) {
    if (restart && lua_isinteger(L, top + 1)) {
      lua_Integer ki = lua_tointeger(L, top + 1);
      if (ki >= 1 && ki <= n) {
        lua_pop(L, 1);
        continue;
      }
    }
    es->path[es->depth] = top + 1;
    if ((rc = encvalue(es, top + 1)) != 0)
      return rc; /* key already names itself in the path */
    if ((rc = encvalue(es, top + 2)) != 0)
      return rc;
    lua_pop(L, 1); /* pop value, keep key */
  }
  es->depth--;
  return putbyte(es, LPAR_TEND);
}

int lpar_codec_encode(lua_State *L, int idx, Buf *b) {
  EncState es;
  int top, rc, t = lua_type(L, idx);
  es.L = L;
  es.b = b;
  es.seen = 0;
  es.ntab = 0;
  es.depth = 0;
  es.errrc = 0;
  if (t == LUA_TNIL || t == LUA_TBOOLEAN || t == LUA_TNUMBER ||
      t == LUA_TSTRING) { /* the common case, with no stack to restore */
    if (encvalue(&es, idx) == 0)
      return 0;
    lua_pushliteral(L, "not enough memory");
    return -1;
  }
  idx = lua_absindex(L, idx);
  top = lua_gettop(L);
  rc = encvalue(&es, idx);
  if (rc == 0) {
    lua_settop(L, top);
    return 0;
  }
  if (es.errrc) { /* out of memory in the buffer, no message pushed */
    lua_settop(L, top);
    lua_pushliteral(L, "not enough memory");
    return -1;
  }
  if (lua_gettop(L) > top + 1) {
    lua_replace(L, top + 1); /* keep the message only */
    lua_settop(L, top + 1);
  }
  return -1;
}

/*
** Decoder. Every count and length is checked against the bytes left
** before anything is allocated for it. An announced array part is
** preallocated only from a budget of one slot per PRESHARE input bytes,
** shared by the tables open at a time: a table gives its slots back when
** it ends, all of them filled. A table that announces more values than
** follow (the decoding then fails) has preallocated slots nobody fills,
** and the budget bounds them: tables nested inside each other that all
** announce the rest of the input cannot multiply the memory, and slots
** wasted cost at most 16 / PRESHARE bytes per input byte on top of what
** the values decoded cost (README "Wire format" states the whole bound).
** Values past the preallocated part go in as Lua grows the table.
*/
#if !defined(PRESHARE)
#define PRESHARE 4
#endif

typedef struct DecState {
  lua_State *L;
  const char *p;
  size_t len, pos;
  size_t budget; /* array slots that may be preallocated now */
  size_t scan;   /* bytes countpairs() may still look at */
  int refs;      /* stack index of id -> table, or the nil placeholder */
  int ntab;
  int depth;
} DecState;

static int decerror(DecState *ds, const char *what) {
  lua_pushfstring(ds->L, "%s at byte %I", what, (LUAI_UACINT)ds->pos);
  return -1;
}

/* Whether the integer 'i' has a double of the same value (always, within
   2^53): a Lua with doubles only takes no other. */
static inline int exactdouble(lua_Integer i) {
  double d = (double)i;
  return (i >= -(1LL << 53) && i <= (1LL << 53)) ||
         (d < 0x1p63 && (lua_Integer)d == i);
}

/* Push the message for an integer that the doubles of this Lua cannot
   hold exactly (sent by a Lua with integers, 5.3 or 5.4). */
static int inexact(DecState *ds, lua_Integer i) {
  lua_pushfstring(ds->L,
                  "integer %I (from a Lua with integers, 5.3 or 5.4) has no "
                  "exact value in " LPAR_LUANAME "'s numbers (doubles) at "
                  "byte %I",
                  (LUAI_UACINT)i, (LUAI_UACINT)ds->pos);
  return -1;
}

/* Push the message for a varint that could not be read at ds->pos:
   cut short by the end of the input, or longer than 64 bits. */
static int varerror(DecState *ds, const char *what) {
  size_t i = ds->pos;
  while (i < ds->len && i - ds->pos < MAXVARINT &&
         ((unsigned char)ds->p[i] & 0x80))
    i++;
  if (i >= ds->len)
    lua_pushfstring(ds->L, "truncated %s at byte %I", what,
                    (LUAI_UACINT)ds->pos);
  else
    lua_pushfstring(ds->L, "%s longer than 64 bits at byte %I", what,
                    (LUAI_UACINT)ds->pos);
  return -1;
}

/* Read a varint at ds->pos: 0, or -1 if it is truncated or too long.
   Up to three bytes are read inline, longer ones by the general loop. */
static inline int getuv(DecState *ds, unsigned long long *v) {
  const unsigned char *q = (const unsigned char *)ds->p + ds->pos;
  size_t left = ds->len - ds->pos;
  if (left >= 1 && q[0] < 0x80) {
    *v = q[0];
    ds->pos += 1;
    return 0;
  }
  if (left >= 2 && q[1] < 0x80) {
    *v = (q[0] & 0x7fu) | (unsigned long long)q[1] << 7;
    ds->pos += 2;
    return 0;
  }
  if (left >= 3 && q[1] >= 0x80 && q[2] < 0x80) {
    *v = (q[0] & 0x7fu) | (unsigned long long)(q[1] & 0x7fu) << 7 |
         (unsigned long long)q[2] << 14;
    ds->pos += 3;
    return 0;
  }
  return lpar_codec_getvarint(ds->p, ds->len, &ds->pos, v);
}

static int dectable(DecState *ds);

/* how far ahead, and how deep, countpairs() looks for a table's end, and
   the longest array part it looks past (longer ones rarely have pairs) */
#define LOOKAHEAD 4096
#define SCANDEPTH 16
#define SCANARRAY 64

/*
** The number of key/value pairs of the table whose 'n' array values start
** at ds->pos, found by skipping ahead without decoding; 0 when it cannot
** tell within LOOKAHEAD bytes and SCANDEPTH levels, when n > SCANARRAY, or
** when the bytes are bad (decoding will say so). Only sizes the table's
** hash part. All scans of one decoding together look at no more bytes
** than the input has, plus LOOKAHEAD.
*/
static size_t countpairs(DecState *ds, unsigned long long n) {
  const unsigned char *p = (const unsigned char *)ds->p;
  unsigned long long left[SCANDEPTH]; /* per level: array values to skip */
  unsigned char inpairs[SCANDEPTH], iskey[SCANDEPTH];
  size_t pos = ds->pos, end, pairs = 0;
  int d = 0;
  if (n > SCANARRAY)
    return 0;
  end = ds->len - pos < LOOKAHEAD ? ds->len : pos + LOOKAHEAD;
  if (end - pos > ds->scan)
    end = pos + ds->scan;
  left[0] = n;
  inpairs[0] = 0;
  for (;;) {
    unsigned long long u;
    int tag;
    if (!inpairs[d] && left[d] == 0) { /* array done: pairs follow */
      inpairs[d] = 1;
      iskey[d] = 1;
    }
    if (pos >= end)
      break;
    tag = p[pos++];
    if (inpairs[d] && iskey[d] && tag == LPAR_TEND) { /* end of a table */
      if (d-- == 0) {
        ds->scan -= pos - ds->pos;
        return pairs;
      }
    }
    else {
      if (d == 0 && inpairs[0] && iskey[0])
        pairs++;
      switch (tag) {
      case LPAR_TNIL:
      case LPAR_TFALSE:
      case LPAR_TTRUE:
        break;
      case LPAR_TFLOAT:
        if (end - pos < 8)
          goto giveup;
        pos += 8;
        break;
      case LPAR_TINT:
      case LPAR_TREF:
      case LPAR_TSTR:
        if (pos < end && p[pos] < 0x80)
          u = p[pos++];
        else if (lpar_codec_getvarint(ds->p, end, &pos, &u) != 0)
          goto giveup;
        if (tag == LPAR_TSTR) {
          if (u > end - pos)
            goto giveup;
          pos += (size_t)u;
        }
        break;
      case LPAR_TTABLE:
        if (d + 1 >= SCANDEPTH ||
            lpar_codec_getvarint(ds->p, end, &pos, &u) != 0)
          goto giveup;
        d++;
        left[d] = u;
        inpairs[d] = 0;
        continue; /* the table counts as a value at its end */
      default:
        goto giveup;
      }
    }
    if (inpairs[d]) /* one value done at level d */
      iskey[d] = !iskey[d];
    else
      left[d]--;
  }
giveup:
  ds->scan -= pos - ds->pos;
  return 0;
}

/* Push the value at ds->pos and move past it: 0, or -1 with a message
   pushed. */
static int decvalue(DecState *ds) {
  lua_State *L = ds->L;
  unsigned long long u;
  int tag;
  if (ds->pos >= ds->len)
    return decerror(ds, "truncated value");
  tag = (unsigned char)ds->p[ds->pos++];
  switch (tag) {
  case LPAR_TINT:
    if (getuv(ds, &u))
      return varerror(ds, "integer");
    if (LPAR_DOUBLES && !exactdouble(unzigzag(u)))
      return inexact(ds, unzigzag(u));
    lua_pushinteger(L, unzigzag(u));
    return 0;
  case LPAR_TSTR:
    if (getuv(ds, &u))
      return varerror(ds, "string length");
    if (u > ds->len - ds->pos)
      return decerror(ds, "truncated string");
    lua_pushlstring(L, ds->p + ds->pos, (size_t)u);
    ds->pos += (size_t)u;
    return 0;
  case LPAR_TNIL:
    lua_pushnil(L);
    return 0;
  case LPAR_TFALSE:
  case LPAR_TTRUE:
    lua_pushboolean(L, tag == LPAR_TTRUE);
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
  case LPAR_TTABLE:
    return dectable(ds);
  case LPAR_TREF:
    if (getuv(ds, &u))
      return varerror(ds, "reference");
    if (u >= (unsigned long long)ds->ntab)
      return decerror(ds, "reference to an unknown table");
    lua_rawgeti(L, ds->refs, (lua_Integer)u);
    return 0;
  default:
    ds->pos--;
    return decerror(ds, "bad value tag");
  }
}

/* Decode a table after its tag: push it, or push a message and return
   -1. */
static int dectable(DecState *ds) {
  lua_State *L = ds->L;
  unsigned long long n, i;
  size_t pre;
  int t;
  if (ds->depth >= LPAR_MAXDEPTH)
    return decerror(ds, "value nested too deeply (limit " LPAR_STR(
                            LPAR_MAXDEPTH) " levels)");
  if (getuv(ds, &n))
    return varerror(ds, "table length");
  if (n > ds->len - ds->pos) /* every element takes at least a byte */
    return decerror(ds, "table longer than its frame");
  if (!lua_checkstack(L, 4))
    return decerror(ds, "value nested too deeply for the Lua stack");
  pre = n < ds->budget ? (size_t)n : ds->budget;
  if (pre > INT_MAX)
    pre = INT_MAX;
  ds->budget -= pre;
  lua_createtable(L, (int)pre, (int)countpairs(ds, n));
  t = lua_gettop(L);
  if (lua_isnil(L, ds->refs)) {
    lua_newtable(L);
    lua_replace(L, ds->refs);
  }
  lua_pushvalue(L, t);
  lua_rawseti(L, ds->refs, ds->ntab++);
  ds->depth++;
  for (i = 1; i <= n; i++) {
    if (ds->pos < ds->len && (unsigned char)ds->p[ds->pos] == LPAR_TINT) {
      unsigned long long u;
      ds->pos++;
      if (getuv(ds, &u))
        return varerror(ds, "integer");
      if (LPAR_DOUBLES && !exactdouble(unzigzag(u)))
        return inexact(ds, unzigzag(u));
      lua_pushinteger(L, unzigzag(u));
    }
    else if (decvalue(ds))
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
    if (lua_type(L, -1) == LUA_TNIL)
      return decerror(ds, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
        isnan((double)lua_tonumber(L, -1)))
      return decerror(ds, "NaN table key");
    if (decvalue(ds))
      return -1;
    lua_rawset(L, t);
  }
  ds->depth--;
  ds->budget += pre; /* every preallocated slot is filled */
  return 0;
}

/* Set up 'ds' to decode p[pos .. len) with the table of references at
   stack index 'refs' (a nil placeholder until the first table). */
static void decbegin(DecState *ds, lua_State *L, const char *p, size_t len,
                     size_t pos, int refs) {
  ds->L = L;
  ds->p = p;
  ds->len = len;
  ds->pos = pos;
  ds->budget = pos <= len ? (len - pos) / PRESHARE : 0;
  ds->scan = (pos <= len ? len - pos : 0) + LOOKAHEAD;
  ds->refs = refs;
  ds->ntab = 0;
  ds->depth = 0;
}

int lpar_codec_decode(lua_State *L, const char *p, size_t len, size_t *pos) {
  DecState ds;
  int base;
  if (*pos < len && (unsigned char)p[*pos] != LPAR_TTABLE &&
      (unsigned char)p[*pos] != LPAR_TREF) {
    /* a scalar: no table of references, no stack to tidy */
    luaL_checkstack(L, 1, "no room to decode a value");
    decbegin(&ds, L, p, len, *pos, 0);
    if (decvalue(&ds))
      return -1; /* the message is pushed */
    *pos = ds.pos;
    return 0;
  }
  luaL_checkstack(L, 4, "no room to decode a value");
  lua_pushnil(L); /* placeholder for the table of references */
  base = lua_gettop(L);
  decbegin(&ds, L, p, len, *pos, base);
  if (ds.pos > len) {
    decerror(&ds, "start past the end");
    lua_replace(L, base);
    return -1;
  }
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

/* lpar_codec_skip at nesting 'depth'. */
static int skipvalue(const char *p, size_t len, size_t *pos, int depth) {
  unsigned long long v;
  if (*pos >= len || depth > LPAR_MAXDEPTH)
    return -1;
  switch ((unsigned char)p[(*pos)++]) {
  case LPAR_TNIL:
  case LPAR_TFALSE:
  case LPAR_TTRUE:
    return 0;
  case LPAR_TINT:
  case LPAR_TREF:
    return lpar_codec_getvarint(p, len, pos, &v);
  case LPAR_TFLOAT:
    if (len - *pos < 8)
      return -1;
    *pos += 8;
    return 0;
  case LPAR_TSTR:
    if (lpar_codec_getvarint(p, len, pos, &v) != 0 || v > len - *pos)
      return -1;
    *pos += (size_t)v;
    return 0;
  case LPAR_TTABLE: /* each value takes a byte at least: n is bounded */
    if (lpar_codec_getvarint(p, len, pos, &v) != 0)
      return -1;
    for (; v > 0; v--)
      if (skipvalue(p, len, pos, depth + 1) != 0)
        return -1;
    while (*pos < len && (unsigned char)p[*pos] != LPAR_TEND)
      if (skipvalue(p, len, pos, depth + 1) != 0 ||
          skipvalue(p, len, pos, depth + 1) != 0)
        return -1;
    if (*pos >= len)
      return -1;
    (*pos)++;
    return 0;
  default:
    return -1;
  }
}

int lpar_codec_skip(const char *p, size_t len, size_t *pos) {
  size_t at = *pos;
  if (skipvalue(p, len, &at, 0) != 0)
    return -1;
  *pos = at;
  return 0;
}
