/*
** hosts.c: what a parent and an agent agree on (versions), and host specs
** ("4/ssh node1") turned into the command that starts an agent.
*/
#include "hosts.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "lauxlib.h"
#include "lcompat.h"
#include "lpar.h"
#include "wire.h"

#define MAGIC "LPAR"
#define NAMESIZE 32

int lpar_hosts_putversions(Buf *b) {
  char *p;
  if (lpar_buf_reserve(b, LPAR_VERSIONSIZE) != 0)
    return -1;
  p = b->p + b->n;
  memset(p, 0, LPAR_VERSIONSIZE);
  memcpy(p, MAGIC, 4);
  lpar_wire_put32(p + 4, LPAR_PROTOCOL);
  lpar_wire_put32(p + 8, LPAR_LUANUM);
  lpar_wire_put32(p + 12, (uint32_t)sizeof(lua_Integer));
  lpar_wire_put32(p + 16, (uint32_t)sizeof(lua_Number));
  snprintf(p + 20, NAMESIZE, "%s", LPAR_VERSION);
  b->n += LPAR_VERSIONSIZE;
  return 0;
}

/* "lpar 0.1.0 (protocol 1, Lua 5.4, 8-byte integers, 8-byte floats)" */
static void describe(const char *p, char *buf, size_t size) {
  uint32_t lua = lpar_wire_get32(p + 8);
  char name[NAMESIZE + 1], luaname[24];
  memcpy(name, p + 20, NAMESIZE);
  name[NAMESIZE] = '\0';
  for (char *s = name; *s; s++)
    if (!isprint((unsigned char)*s))
      *s = '?';
  if (lua >= 9000) /* LPAR_LUANUM of LuaJIT */
    snprintf(luaname, sizeof luaname, "LuaJIT");
  else
    snprintf(luaname, sizeof luaname, "Lua %u.%u", (unsigned)(lua / 100 % 100),
             (unsigned)(lua % 100));
  snprintf(buf, size, "%s (protocol %u, %s, %u-byte integers, %u-byte floats)",
           name, (unsigned)lpar_wire_get32(p + 4), luaname,
           (unsigned)lpar_wire_get32(p + 12),
           (unsigned)lpar_wire_get32(p + 16));
}

int lpar_hosts_checkversions(const char *p, size_t len, const char *who,
                             char *why, size_t size) {
  Buf mine = {0};
  char theirs[160], ours[160];
  int rc = 0;
  if (len < LPAR_VERSIONSIZE || memcmp(p, MAGIC, 4) != 0) {
    snprintf(why, size, "%s did not speak lpar's protocol", who);
    return -1;
  }
  if (lpar_hosts_putversions(&mine) != 0) {
    snprintf(why, size, "not enough memory");
    return -1;
  }
  /* the version name is for people: only the rest must agree */
  if (memcmp(p, mine.p, 20) != 0) {
    describe(p, theirs, sizeof theirs);
    describe(mine.p, ours, sizeof ours);
    snprintf(why, size, "%s is %s; this is %s", who, theirs, ours);
    rc = -1;
  }
  lpar_buf_free(&mine);
  return rc;
}

int lpar_hosts_words(lua_State *L, const char *s) {
  luaL_Buffer b;
  lua_Integer n = 0;
  lua_newtable(L);
  for (;;) {
    int inword = 0;
    while (*s == ' ' || *s == '\t' || *s == '\n')
      s++;
    if (*s == '\0')
      return 0;
    luaL_buffinit(L, &b);
    while (*s && !(*s == ' ' || *s == '\t' || *s == '\n')) {
      inword = 1;
      if (*s == '\'') {
        const char *e = strchr(s + 1, '\'');
        if (e == NULL) {
          lua_pushliteral(L, "unbalanced ' quote");
          return -1;
        }
        luaL_addlstring(&b, s + 1, (size_t)(e - s - 1));
        s = e + 1;
      }
      else if (*s == '"') {
        s++;
        while (*s && *s != '"') {
          if (*s == '\\' && s[1] && strchr("\\\"$`", s[1]))
            s++;
          luaL_addchar(&b, *s++);
        }
        if (*s != '"') {
          lua_pushliteral(L, "unbalanced \" quote");
          return -1;
        }
        s++;
      }
      else if (*s == '\\') {
        if (s[1] == '\0') {
          lua_pushliteral(L, "a backslash at the end");
          return -1;
        }
        luaL_addchar(&b, s[1]);
        s += 2;
      }
      else
        luaL_addchar(&b, *s++);
    }
    luaL_pushresult(&b);
    if (inword)
      lua_rawseti(L, -2, ++n);
    else
      lua_pop(L, 1);
  }
}

void lpar_hosts_parse(lua_State *L, int idx, const char *remote) {
  const char *spec = luaL_checkstring(L, idx), *s = spec, *slash;
  lua_Integer n = 0, k, nw;
  int top = lua_gettop(L);
  while (*s == ' ' || *s == '\t')
    s++;
  slash = strchr(s, '/');
  if (slash != NULL && slash > s) {
    const char *d = s;
    while (d < slash && isdigit((unsigned char)*d))
      d++;
    if (d == slash) { /* N/PREFIX */
      if (slash - s > 6 || (n = (lua_Integer)strtol(s, NULL, 10)) < 1 ||
          n > LPAR_MAXWORKERS) {
        lua_pushfstring(L, "host '%s': the worker count must be 1 to %d", spec,
                        LPAR_MAXWORKERS);
        lua_error(L); /* a spec's fault: no code position */
      }
      s = slash + 1;
    }
  }
  lua_createtable(L, 0, 4);
  lua_pushstring(L, spec);
  lua_setfield(L, -2, "spec");
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  while (*s == ' ' || *s == '\t')
    s++;
  if (strcmp(s, ":") == 0 || (s[0] == ':' && s[1] == ' ')) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "here");
    return;
  }
  if (lpar_hosts_words(L, s) != 0) {
    lua_pushfstring(L, "host '%s': %s", spec, lua_tostring(L, -1));
    lua_error(L); /* a spec's fault: no code position */
  }
  nw = (lua_Integer)lua_rawlen(L, -1);
  if (nw == 0) {
    lua_pushfstring(L, "host '%s': no command to run", spec);
    lua_error(L); /* a spec's fault: no code position */
  }
  if (lpar_hosts_words(L, remote) != 0) {
    lua_pushfstring(L, "remote lpar '%s': %s", remote, lua_tostring(L, -1));
    lua_error(L); /* a spec's fault: no code position */
  }
  if (lua_rawlen(L, -1) == 0) {
    lua_pushliteral(L, "remote lpar is empty");
    lua_error(L); /* a spec's fault: no code position */
  }
  for (k = 1; k <= (lua_Integer)lua_rawlen(L, -1); k++) {
    lua_rawgeti(L, -1, k);
    lua_rawseti(L, -3, ++nw);
  }
  lua_pop(L, 1);
  lua_pushliteral(L, "--worker");
  lua_rawseti(L, -2, ++nw);
  if (n > 0) {
    lua_pushliteral(L, "-j");
    lua_rawseti(L, -2, ++nw);
    lua_pushfstring(L, "%I", (LUAI_UACINT)n);
    lua_rawseti(L, -2, ++nw);
  }
  lua_setfield(L, -2, "argv");
  lua_settop(L, top + 1);
}
