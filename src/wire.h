/*
** wire.h: framed messages on pipes and sockets. A frame is a 16-byte
** header (type, count, payload length; little-endian) and its payload.
*/
#ifndef lpar_wire_h
#define lpar_wire_h

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define LPAR_HDRSIZE 16

/* largest payload a frame may announce (1 TiB: a sanity bound) */
#if !defined(LPAR_MAXFRAME)
#define LPAR_MAXFRAME ((uint64_t)1 << 40)
#endif

/* most items one WORK or ITEMS frame hands out (its count is a u32; a
   larger chunksize is cut to this) */
#if !defined(LPAR_MAXFRAMECOUNT)
#define LPAR_MAXFRAMECOUNT (1 << 30)
#endif

enum {
  LPAR_FWORK = 1, /* parent -> worker: u64 first index; count items */
  LPAR_FITEMS,    /* parent -> worker: u64 first index, count encoded items */
  LPAR_FRESULT,   /* worker -> parent: u64 first index, count encoded values */
  LPAR_FERROR,    /* worker -> parent: u64 index, error value, traceback */
  LPAR_FREADY,    /* worker -> parent: started (count = 1) or init failed */
  LPAR_FCALL,     /* parent -> worker: a function and its upvalues (pools) */
  LPAR_FRING,     /* worker -> parent: u64 place, u64 length of a frame put
                     in the shared ring (see ring.h) */
  LPAR_FHELLO,    /* agent -> parent, first: versions (hosts.h); count =
                     the agent's workers */
  LPAR_FSETUP,    /* parent -> agent, first: versions, engine options and
                     what the workers hold (hosts.h) */
  LPAR_FNEWLINE,  /* never a frame: a header cannot begin with '\n', the
                     byte an agent writes after each frame */
  LPAR_FBEAT,     /* either way between a parent and an agent: still
                     there (no payload) */
  LPAR_FCANCEL,   /* parent -> agent: the chunks it holds are not wanted
                     (their job ended): stop them, say READY for each */
  LPAR_FLAST
};

typedef struct Frame {
  uint32_t type;
  uint32_t count;
  uint64_t len; /* payload bytes */
} Frame;

/* Write the header of 'f' into h[0..LPAR_HDRSIZE). */
void lpar_wire_putheader(char *h, const Frame *f);

/* Append a frame (type, count) with payload p[0..len) to b; 0, or -1 out
   of memory. */
int lpar_wire_addframe(Buf *b, uint32_t type, uint32_t count, const char *p,
                       size_t len);

/* Parse a header; 0, or -EPROTO for a bad type or length. */
int lpar_wire_getheader(const char *h, Frame *f);

/* Little-endian u64 and u32 helpers for payloads. */
void lpar_wire_put64(char *p, uint64_t v);
uint64_t lpar_wire_get64(const char *p);
void lpar_wire_put32(char *p, uint32_t v);
uint32_t lpar_wire_get32(const char *p);

/* Blocking full write; 0 or -errno. EINTR-safe, SIGPIPE is the caller's. */
int lpar_wire_write(int fd, const void *p, size_t n);

/*
** Blocking read of one whole frame into 'b' (payload only, b->n = len).
** 0, 1 on end of file at a frame boundary, -EPROTO on a bad header or
** end of file inside a frame, -errno on a failed read.
*/
int lpar_wire_recv(int fd, Frame *f, Buf *b);

/*
** Non-blocking read appending to 'b', which holds whole frames and then
** maybe the start of one: room is made for the rest of that frame (and
** at least 64 KiB). Returns bytes read, 0 at end of file, -EAGAIN when
** nothing is there, or -errno.
*/
long lpar_wire_tryread(int fd, Buf *b);

/*
** What to say when lpar_wire_tryread could not make room for the frame
** that begins 'b' (-ENOMEM): "frame too long to take (N bytes)", written
** into buf[0..size). Returns buf.
*/
const char *lpar_wire_toolong(const Buf *b, char *buf, size_t size);

/*
** Non-blocking: send b's bytes from *pos on, as far as 'fd' takes them,
** advancing *pos. 0 (maybe with some left), or -errno. Uses
** send(MSG_NOSIGNAL) on sockets, so a dead peer is -EPIPE, never a signal.
*/
int lpar_wire_sendsome(int fd, const Buf *b, size_t *pos);

#endif
