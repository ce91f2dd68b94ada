/*
** kind.h: what kind of failure an error is, as a code made where the
** failure happens, carried in ERROR frames and given to Lua by name.
*/
#ifndef lpar_kind_h
#define lpar_kind_h

#include <stdint.h>

#include "lua.h"

/* The kinds (see docs/module.md, "Kinds of failure"). A code is a kind
   plus a detail: the signal for LPAR_KSIGNAL and LPAR_KINTERRUPTED, the
   exit status for LPAR_KEXIT, else 0. */
enum {
  LPAR_KERROR = 1,   /* "error": the function (or the iterator) raised */
  LPAR_KTIMEOUT,     /* "timeout": an item ran past its timeout */
  LPAR_KSIGNAL,      /* "signal": its worker was killed by a signal */
  LPAR_KEXIT,        /* "exit": its worker exited */
  LPAR_KMEMORY,      /* "memory": past max_memory, or max_memory too low */
  LPAR_KPROTOCOL,    /* "protocol": a worker or agent broke the protocol */
  LPAR_KINIT,        /* "init": a worker's init failed, or none started */
  LPAR_KLOST,        /* "lost": a host, or a worker reaped elsewhere */
  LPAR_KCANCELLED,   /* "cancelled": job:cancel, or its pool closed */
  LPAR_KINTERRUPTED, /* "interrupted": SIGINT, SIGTERM or SIGHUP */
  LPAR_KOUTPUT       /* "output": the CLI's output was closed */
};

#define LPAR_KINDCODE(kind, detail) ((int)(kind) | ((int)(detail) << 8))
#define LPAR_KINDOF(code) ((code)&0xff)
#define LPAR_KINDDETAIL(code) ((code) >> 8)

/* The code of a worker's wait status: signal or exit. */
int lpar_kind_fromstatus(int status);

/* The code an ERROR frame's count carries (0 and 1: a Lua error, as
   from lpar before kinds). */
int lpar_kind_fromwire(uint32_t count);

/* Push the name of the kind of 'code' and its detail (nil if none): 2
   values; with code 0, nil and nil. */
void lpar_kind_push(lua_State *L, int code);

/* Remember the value on top (left there) as the failure of kind 'code'
   that lpar gave the caller last, for lpar.errkind. */
void lpar_kind_mark(lua_State *L, int code);

/* The kind code of the error value at 'idx': the one lpar marked for it
   (a failure of lpar's own raised through a caller's function, say a
   write of the output from on_event), else LPAR_KERROR. */
int lpar_kind_code(lua_State *L, int idx);

/* lpar_kind_mark, then raise the value on top. */
int lpar_kind_raise(lua_State *L, int code);

/* lua_CFunction: lpar.errkind(e) -> kind [, detail] of the failure lpar
   raised or returned last, if e is it; else nil. */
int lpar_kind_errkind(lua_State *L);

#endif
