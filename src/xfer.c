/*
** xfer.c: Lua functions as bytes, for workers that did not inherit them:
** bytecode from lua_dump plus the function's upvalues.
*/
#include "xfer.h"

#include <string.h>

#include "codec.h"
#include "lauxlib.h"
#include "lcompat.h"

/*
** The encoding, in order:
**   varint nfun                   functions, the one to call first
**   nfun times: kind byte, then
**     XF_LUA:  varint len, bytecode
**     XF_NAMED: varint len, module name, varint len, field name
**   one codec value               table of the upvalues that travel as
**                                 values (nil when there are none)
**   for each XF_LUA function, in order:
**     varint nups, then per upvalue a kind byte and its operands:
**     UV_NIL, UV_ENV, UV_VALUE k, UV_FUNC id, UV_JOIN id n, UV_MODULE name
*/
enum { XF_LUA = 1, XF_NAMED };
enum { UV_NIL = 1, UV_ENV, UV_VALUE, UV_FUNC, UV_JOIN, UV_MODULE };

/* What the encoder keeps: buffers are userdata, tables live on the stack. */
typedef struct XState {
  lua_State *L;
  Buf *hdr;  /* function headers */
  Buf *ups;  /* upvalue records */
  int fns;   /* id + 1 -> function */
  int ids;   /* function -> id */
  int upids; /* upvalue id (light userdata) -> id * 256 + n */
  int vals;  /* k -> value travelling through the codec */
  int vdesc; /* k -> "upvalue 'x'" (for messages) */
  int paths; /* id -> names of the upvalues that lead to it ("" at first) */
  int names; /* module or C function -> name; nil until needed */
  int havenames;
  int nfun, nval;
} XState;

static void check(lua_State *L, int rc) {
  if (rc != 0)
    luaL_error(L, "not enough memory");
}

static void putbyte(XState *xs, Buf *b, int c) {
  char ch = (char)c;
  check(xs->L, lpar_buf_add(b, &ch, 1));
}

static void putvarint(XState *xs, Buf *b, size_t v) {
  check(xs->L, lpar_codec_putvarint(b, v));
}

static void putstring(XState *xs, Buf *b, const char *s, size_t len) {
  putvarint(xs, b, len);
  check(xs->L, lpar_buf_add(b, s, len));
}

static int writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  return lpar_buf_add(ud, p, sz);
}

/*
** Map every module in package.loaded to its name, and every C function
** that is a field of one to "module\0field", in the names slot.
*/
static void buildnames(XState *xs) {
  lua_State *L = xs->L;
  int loaded;
  lua_newtable(L);
  lua_replace(L, xs->names);
  xs->havenames = 1;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  loaded = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) { /* module name, module */
    int mod = lua_gettop(L);
    if (lua_type(L, mod - 1) != LUA_TSTRING || !lua_istable(L, mod)) {
      lua_pop(L, 1);
      continue;
    }
    lua_pushvalue(L, mod);
    if (lua_rawget(L, xs->names) == LUA_TNIL) {
      lua_pushvalue(L, mod);
      lua_pushvalue(L, mod - 1);
      lua_rawset(L, xs->names);
    }
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, mod)) { /* field name, value */
      if (lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1)) {
        lua_pushvalue(L, -1);
        if (lua_rawget(L, xs->names) == LUA_TNIL) {
          lua_pushvalue(L, -2);
          lua_pushvalue(L, mod - 1);
          lua_pushlstring(L, "", 1); /* the separator: a zero byte */
          lua_pushvalue(L, -6);      /* field name */
          lua_concat(L, 3);
          lua_rawset(L, xs->names);
        }
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1); /* module */
  }
  lua_pop(L, 1); /* package.loaded */
}

/* Push the name the value at 'idx' travels by, or nil. */
static int getname(XState *xs, int idx) {
  idx = lua_absindex(xs->L, idx);
  if (!xs->havenames)
    buildnames(xs);
  lua_pushvalue(xs->L, idx);
  return lua_rawget(xs->L, xs->names) == LUA_TSTRING;
}

/* Push the message "upvalue 'name'[ of 'path']" for upvalue 'name' of
   function 'id'. */
static void pushdesc(XState *xs, int id, const char *name) {
  lua_State *L = xs->L;
  lua_rawgeti(L, xs->paths, id);
  if (lua_rawlen(L, -1) == 0)
    lua_pushfstring(L, "upvalue '%s'", name);
  else
    lua_pushfstring(L, "upvalue '%s' of '%s'", name, lua_tostring(L, -1));
  lua_remove(L, -2);
}

/*
** The id of the function at 'idx', giving it one (and writing its
** header) if it is new. 'from' and 'name' say where it was found (for
** its path); from < 0 for the first function. Returns -1 with a message
** pushed if it cannot travel.
*/
static int funcid(XState *xs, int idx, int from, const char *name) {
  lua_State *L = xs->L;
  int id;
  idx = lua_absindex(L, idx);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, xs->ids) == LUA_TNUMBER) {
    id = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return id;
  }
  lua_pop(L, 1);
  if (lua_iscfunction(L, idx)) {
    const char *s;
    size_t len, mlen;
    if (!getname(xs, idx) || lua_type(L, -1) != LUA_TSTRING) {
      lua_pop(L, 1);
      if (from < 0)
        lua_pushliteral(L, "it is a C function outside the loaded modules");
      else {
        pushdesc(xs, from, name);
        lua_pushliteral(L, " is a C function outside the loaded modules");
        lua_concat(L, 2);
      }
      return -1;
    }
    s = lua_tolstring(L, -1, &len);
    mlen = strlen(s);
    putbyte(xs, xs->hdr, XF_NAMED);
    putstring(xs, xs->hdr, s, mlen);
    putstring(xs, xs->hdr, s + mlen + 1, len - mlen - 1);
    lua_pop(L, 1);
  }
  else {
    size_t at;
    putbyte(xs, xs->hdr, XF_LUA);
    at = xs->hdr->n;
    lua_pushvalue(L, idx);
    check(L, lua_dump(L, writer, xs->hdr, 0));
    lua_pop(L, 1);
    {
      /* the length goes before the code: move the code up to make room */
      size_t len = xs->hdr->n - at;
      char tmp[10];
      Buf vb = {tmp, 0, sizeof tmp};
      check(L, lpar_codec_putvarint(&vb, len));
      check(L, lpar_buf_reserve(xs->hdr, vb.n));
      memmove(xs->hdr->p + at + vb.n, xs->hdr->p + at, len);
      memcpy(xs->hdr->p + at, tmp, vb.n);
      xs->hdr->n += vb.n;
    }
  }
  id = xs->nfun++;
  lua_pushvalue(L, idx);
  lua_rawseti(L, xs->fns, id + 1);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, id);
  lua_rawset(L, xs->ids);
  if (from < 0)
    lua_pushliteral(L, "");
  else {
    lua_rawgeti(L, xs->paths, from);
    if (lua_rawlen(L, -1) == 0)
      lua_pushstring(L, name);
    else
      lua_pushfstring(L, "%s.%s", lua_tostring(L, -1), name);
    lua_remove(L, -2);
  }
  lua_rawseti(L, xs->paths, id);
  return id;
}

/*
** Write the upvalue records of Lua function 'id', giving ids to the
** functions they hold. 0, or -1 with a message pushed.
*/
static int upvalues(XState *xs, int id) {
  lua_State *L = xs->L;
  lua_Debug ar;
  int f, n;
  lua_rawgeti(L, xs->fns, id + 1);
  f = lua_gettop(L);
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  putvarint(xs, xs->ups, ar.nups);
  for (n = 1; n <= ar.nups; n++) {
    const char *name = lua_getupvalue(L, f, n); /* pushes the value */
    int v = lua_gettop(L);
    lua_pushlightuserdata(L, lua_upvalueid(L, f, n));
    if (lua_rawget(L, xs->upids) == LUA_TNUMBER) { /* shared: join */
      lua_Integer at = lua_tointeger(L, -1);
      putbyte(xs, xs->ups, UV_JOIN);
      putvarint(xs, xs->ups, (size_t)(at / 256));
      putvarint(xs, xs->ups, (size_t)(at % 256));
      lua_settop(L, f);
      continue;
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, lua_upvalueid(L, f, n));
    lua_pushinteger(L, (lua_Integer)id * 256 + n);
    lua_rawset(L, xs->upids);
    if (strcmp(name, "_ENV") == 0) { /* whatever it was: the worker's */
      putbyte(xs, xs->ups, UV_ENV);
      lua_settop(L, f);
      continue;
    }
    switch (lua_type(L, v)) {
    case LUA_TNIL:
      putbyte(xs, xs->ups, UV_NIL);
      break;
    case LUA_TTABLE:
      lua_pushglobaltable(L);
      if (lua_rawequal(L, v, -1)) {
        putbyte(xs, xs->ups, UV_ENV);
        break;
      }
      if (getname(xs, v)) {
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        putbyte(xs, xs->ups, UV_MODULE);
        putstring(xs, xs->ups, s, len);
        break;
      }
      /* FALLTHROUGH */
    case LUA_TBOOLEAN:
    case LUA_TNUMBER:
    case LUA_TSTRING:
      lua_pushvalue(L, v);
      lua_rawseti(L, xs->vals, ++xs->nval);
      pushdesc(xs, id, name);
      lua_rawseti(L, xs->vdesc, xs->nval);
      putbyte(xs, xs->ups, UV_VALUE);
      putvarint(xs, xs->ups, (size_t)xs->nval);
      break;
    case LUA_TFUNCTION: {
      int fid = funcid(xs, v, id, name);
      if (fid < 0)
        return -1;
      putbyte(xs, xs->ups, UV_FUNC);
      putvarint(xs, xs->ups, (size_t)fid);
      break;
    }
    default:
      pushdesc(xs, id, name);
      lua_pushfstring(L, "%s is a %s", lua_tostring(L, -1),
                      luaL_typename(L, v));
      return -1;
    }
    lua_settop(L, f);
  }
  lua_pop(L, 1); /* function */
  return 0;
}

/* The codec refused the values table with 'msg' ("[k].path what"): name
   the upvalue. Pushes the message. */
static void valueerror(XState *xs, const char *msg) {
  lua_State *L = xs->L;
  lua_Integer k = 0;
  const char *p = msg;
  if (*p == '[') {
    for (p++; *p >= '0' && *p <= '9'; p++)
      k = k * 10 + (*p - '0');
  }
  if (*p != ']' || k < 1 || k > xs->nval) {
    lua_pushstring(L, msg);
    return;
  }
  lua_rawgeti(L, xs->vdesc, k);
  if (p[1] == ' ') /* the value itself: "[k] is nested too deeply" */
    lua_pushfstring(L, "%s%s", lua_tostring(L, -1), p + 1);
  else /* "[k].a.b is ..." or "[k][2] is ...": the path inside it */
    lua_pushfstring(L, "%s cannot travel: %s", lua_tostring(L, -1),
                    p + 1 + (p[1] == '.'));
  lua_remove(L, -2);
}

int lpar_xfer_encode(lua_State *L, int idx, Buf *b) {
  XState xs;
  int top, id, rc = 0;
  idx = lua_absindex(L, idx);
  top = lua_gettop(L);
  luaL_checkstack(L, 20, "no room to send a function");
  memset(&xs, 0, sizeof xs);
  xs.L = L;
  xs.hdr = lpar_codec_newbuf(L);
  xs.ups = lpar_codec_newbuf(L);
  lua_newtable(L);
  xs.fns = lua_gettop(L);
  lua_newtable(L);
  xs.ids = lua_gettop(L);
  lua_newtable(L);
  xs.upids = lua_gettop(L);
  lua_newtable(L);
  xs.vals = lua_gettop(L);
  lua_newtable(L);
  xs.vdesc = lua_gettop(L);
  lua_newtable(L);
  xs.paths = lua_gettop(L);
  lua_pushnil(L);
  xs.names = lua_gettop(L);
  if (funcid(&xs, idx, -1, NULL) < 0)
    rc = -1;
  for (id = 0; rc == 0 && id < xs.nfun; id++) {
    lua_rawgeti(L, xs.fns, id + 1);
    if (lua_iscfunction(L, -1)) {
      lua_pop(L, 1);
      continue;
    }
    lua_pop(L, 1);
    rc = upvalues(&xs, id);
  }
  if (rc == 0) {
    size_t start = b->n;
    check(L, lpar_codec_putvarint(b, (unsigned long long)xs.nfun));
    check(L, lpar_buf_add(b, xs.hdr->p, xs.hdr->n));
    if (xs.nval == 0)
      lua_pushnil(L);
    else
      lua_pushvalue(L, xs.vals);
    if (lpar_codec_encode(L, -1, b) != 0) {
      b->n = start;
      valueerror(&xs, lua_tostring(L, -1));
      rc = -1;
    }
    else
      check(L, lpar_buf_add(b, xs.ups->p, xs.ups->n));
  }
  if (rc == 0) {
    lua_settop(L, top);
    return 0;
  }
  lua_copy(L, -1, top + 1); /* keep the message only */
  lua_settop(L, top + 1);
  return -1;
}

/* ---- decoding ---- */

typedef struct XDec {
  lua_State *L;
  const char *p;
  size_t len, pos;
} XDec;

static size_t getvarint(XDec *xd) {
  unsigned long long v;
  if (lpar_codec_getvarint(xd->p, xd->len, &xd->pos, &v) != 0 || v > xd->len)
    luaL_error(xd->L, "bad function encoding (at byte %I)",
               (LUAI_UACINT)xd->pos);
  return (size_t)v;
}

static int getbyte(XDec *xd) {
  if (xd->pos >= xd->len)
    luaL_error(xd->L, "bad function encoding (truncated)");
  return (unsigned char)xd->p[xd->pos++];
}

/* Bounds-checked string of the encoding: pointer, length in *len. */
static const char *getstring(XDec *xd, size_t *len) {
  const char *s;
  *len = getvarint(xd);
  if (*len > xd->len - xd->pos)
    luaL_error(xd->L, "bad function encoding (truncated)");
  s = xd->p + xd->pos;
  xd->pos += *len;
  return s;
}

/* Push module 'name': from package.loaded, or by require. */
static void pushmodule(lua_State *L, const char *name, size_t len) {
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushlstring(L, name, len);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pop(L, 1);
    if (lua_getglobal(L, "require") != LUA_TFUNCTION)
      luaL_error(L, "module '%s' is not loaded in the worker", name);
    lua_pushlstring(L, name, len);
    lua_call(L, 1, 1);
  }
  lua_remove(L, -2); /* package.loaded */
}

/* Number of upvalues of the function at 'idx'. */
static int nups(lua_State *L, int idx) {
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  return ar.nups;
}

void lpar_xfer_decode(lua_State *L, const char *p, size_t len, size_t *pos) {
  XDec xd;
  size_t nfun, i;
  int fns, vals;
  xd.L = L;
  xd.p = p;
  xd.len = len;
  xd.pos = *pos;
  nfun = getvarint(&xd);
  if (nfun == 0 || nfun > len - xd.pos)
    luaL_error(L, "bad function encoding (function count)");
  luaL_checkstack(L, 8, "no room to load a function");
  lua_createtable(L, nfun > 1024 ? 1024 : (int)nfun, 0);
  fns = lua_gettop(L);
  for (i = 0; i < nfun; i++) {
    size_t n;
    const char *s;
    if (getbyte(&xd) == XF_LUA) {
      s = getstring(&xd, &n);
      if (luaL_loadbufferx(L, s, n, "=(function)", "b") != LUA_OK)
        lua_error(L);
    }
    else {
      size_t flen;
      const char *field;
      xd.pos--;
      if (getbyte(&xd) != XF_NAMED)
        luaL_error(L, "bad function encoding (function kind)");
      s = getstring(&xd, &n);
      field = getstring(&xd, &flen);
      lua_pushlstring(L, s, n); /* zero-terminated copies */
      lua_pushlstring(L, field, flen);
      pushmodule(L, lua_tostring(L, -2), n); /* name, field, module */
      if (lua_istable(L, -1))
        lua_getfield(L, -1, lua_tostring(L, -2));
      else
        lua_pushnil(L);
      if (lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "function '%s.%s' is not in the worker",
                   lua_tostring(L, -4), lua_tostring(L, -3));
      lua_replace(L, -4);
      lua_pop(L, 2); /* field, module */
    }
    lua_rawseti(L, fns, (lua_Integer)i + 1);
  }
  if (lpar_codec_decode(L, p, len, &xd.pos) != 0)
    luaL_error(L, "bad function encoding (%s)", lua_tostring(L, -1));
  vals = lua_gettop(L);
  for (i = 0; i < nfun; i++) {
    int f, n, k;
    lua_rawgeti(L, fns, (lua_Integer)i + 1);
    f = lua_gettop(L);
    if (lua_iscfunction(L, f)) {
      lua_pop(L, 1);
      continue;
    }
    n = nups(L, f);
    if (getvarint(&xd) != (size_t)n)
      luaL_error(L, "bad function encoding (upvalue count)");
    for (k = 1; k <= n; k++) {
      size_t id, at, slen;
      const char *s;
      switch (getbyte(&xd)) {
      case UV_NIL:
        lua_pushnil(L);
        break;
      case UV_ENV:
        lua_pushglobaltable(L);
        break;
      case UV_VALUE:
        if (!lua_istable(L, vals))
          luaL_error(L, "bad function encoding (no values)");
        lua_rawgeti(L, vals, (lua_Integer)getvarint(&xd));
        break;
      case UV_FUNC:
        id = getvarint(&xd);
        if (id >= nfun)
          luaL_error(L, "bad function encoding (function id)");
        lua_rawgeti(L, fns, (lua_Integer)id + 1);
        break;
      case UV_JOIN:
        id = getvarint(&xd);
        at = getvarint(&xd);
        if (id >= nfun)
          luaL_error(L, "bad function encoding (function id)");
        lua_rawgeti(L, fns, (lua_Integer)id + 1);
        if (lua_iscfunction(L, -1) || at < 1 || (int)at > nups(L, -1))
          luaL_error(L, "bad function encoding (shared upvalue)");
        lua_upvaluejoin(L, f, k, -1, (int)at);
        lua_pop(L, 1);
        continue;
      case UV_MODULE:
        s = getstring(&xd, &slen);
        lua_pushlstring(L, s, slen);
        pushmodule(L, lua_tostring(L, -1), slen);
        lua_remove(L, -2);
        break;
      default:
        luaL_error(L, "bad function encoding (upvalue kind)");
      }
      lua_setupvalue(L, f, k);
    }
    lua_pop(L, 1); /* function */
  }
  lua_rawgeti(L, fns, 1);
  lua_replace(L, fns);
  lua_settop(L, fns);
  *pos = xd.pos;
}
