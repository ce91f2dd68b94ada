/*
** buf.h: a growable byte buffer shared by the codec, the wire layer and
** the worker. Plain C; the owner frees it (often from a userdata's __gc).
*/
#ifndef lpar_buf_h
#define lpar_buf_h

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct Buf {
  char *p;
  size_t n;   /* bytes in use */
  size_t cap; /* bytes allocated */
} Buf;

/* Make room for 'extra' more bytes; 0 or -ENOMEM. */
static inline int lpar_buf_reserve(Buf *b, size_t extra) {
  if (extra > b->cap - b->n) {
    size_t want = b->cap ? b->cap : 256;
    char *p;
    if (extra > (size_t)-1 / 2 - b->n)
      return -ENOMEM;
    while (want - b->n < extra)
      want *= 2;
    p = realloc(b->p, want);
    if (p == NULL)
      return -ENOMEM;
    b->p = p;
    b->cap = want;
  }
  return 0;
}

static inline int lpar_buf_add(Buf *b, const void *s, size_t len) {
  int rc = lpar_buf_reserve(b, len);
  if (rc == 0) {
    if (len > 0)
      memcpy(b->p + b->n, s, len);
    b->n += len;
  }
  return rc;
}

/* Drop the first 'n' bytes (those handled), keeping the rest. */
static inline void lpar_buf_drop(Buf *b, size_t n) {
  if (n > 0) {
    memmove(b->p, b->p + n, b->n - n);
    b->n -= n;
  }
}

static inline void lpar_buf_free(Buf *b) {
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
}

#endif
