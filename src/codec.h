/*
** codec.h: Lua values <-> bytes. Knows nothing about fds or frames.
*/
#ifndef lpar_codec_h
#define lpar_codec_h

#include <stddef.h>

#include "buf.h"
#include "lua.h"

/* value tags of the encoding; see README "Wire format" */
enum {
  LPAR_TNIL = 0,
  LPAR_TFALSE,
  LPAR_TTRUE,
  LPAR_TINT,   /* zigzag varint */
  LPAR_TFLOAT, /* 8 bytes, little-endian IEEE 754 bits */
  LPAR_TSTR,   /* varint length, bytes */
  LPAR_TTABLE, /* varint n, n array values, key/value pairs, LPAR_TEND */
  LPAR_TREF,   /* varint id of a table seen earlier in the same value */
  LPAR_TEND
};

/*
** Append the encoding of the value at 'idx' to 'b'. Returns 0, or -1 with
** a message pushed on the stack naming the path of the bad part
** ("[2].cb is a function"). Stack effect: none on success, +1 on error.
** Raises only on Lua memory errors; 'b' must be owned by something the
** garbage collector frees (a userdata) if the caller cannot leak it.
*/
int lpar_codec_encode(lua_State *L, int idx, Buf *b);

/*
** Decode one value from p[*pos .. len), push it and advance *pos.
** Returns 0, or -1 with a message pushed instead ("truncated string at
** byte 17"). Never reads outside the buffer.
*/
int lpar_codec_decode(lua_State *L, const char *p, size_t len, size_t *pos);

/* Move *pos past the value encoded at p[*pos .. len) without making it
   (nothing is allocated): 0, or -1 if it is not a whole value. */
int lpar_codec_skip(const char *p, size_t len, size_t *pos);

/* Push a userdata holding an empty Buf that its __gc frees. */
Buf *lpar_codec_newbuf(lua_State *L);

/* Varints, shared with the frame layer. */
int lpar_codec_putvarint(Buf *b, unsigned long long v);
int lpar_codec_getvarint(const char *p, size_t len, size_t *pos,
                         unsigned long long *v);

#endif
