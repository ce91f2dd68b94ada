/*
** buf.h: a growable byte buffer shared by the codec, the wire layer and
** the worker. Plain C; the owner frees it (often from a userdata's __gc)
** with lpar_buf_free. A buffer of LPAR_BUFMAP bytes or more is a mapping
** of its own (told by its cap), so that lpar_buf_nofork can leave it out
** of a fork: once it is unmapped, nothing else lives at its pages.
*/
#ifndef lpar_buf_h
#define lpar_buf_h

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* a buffer at least this large is its own mapping */
#if !defined(LPAR_BUFMAP)
#define LPAR_BUFMAP ((size_t)16 * 1024 * 1024)
#endif

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
    if (want < LPAR_BUFMAP)
      p = realloc(b->p, want);
    else if (b->cap >= LPAR_BUFMAP) {
      p = mremap(b->p, b->cap, want, MREMAP_MAYMOVE);
      p = p == MAP_FAILED ? NULL : p;
    }
    else {
      p = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
               -1, 0);
      p = p == MAP_FAILED ? NULL : p;
      if (p != NULL) {
        if (b->n > 0)
          memcpy(p, b->p, b->n);
        free(b->p);
      }
    }
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

/*
** A process forked from now on does not get b's bytes (a buffer of
** LPAR_BUFMAP bytes or more; a smaller one shares the heap and is left
** alone). The child must not use b: it sees b's fields, not its pages.
*/
static inline void lpar_buf_nofork(Buf *b) {
#if defined(MADV_DONTFORK)
  if (b->cap >= LPAR_BUFMAP)
    madvise(b->p, b->cap, MADV_DONTFORK);
#else
  (void)b;
#endif
}

static inline void lpar_buf_free(Buf *b) {
  if (b->cap >= LPAR_BUFMAP)
    munmap(b->p, b->cap);
  else
    free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
}

/* a buffer that grew past this is freed once its bytes are done with,
   not kept for the next frame (so that a long item or result is not
   held twice) */
#if !defined(LPAR_KEEPBUF)
#define LPAR_KEEPBUF ((size_t)4 * 1024 * 1024)
#endif

/* Free b, whose bytes are done with, if it grew past LPAR_KEEPBUF: 1 if
   it did, else 0 (kept as it is). */
static inline int lpar_buf_shed(Buf *b) {
  if (b->cap <= LPAR_KEEPBUF)
    return 0;
  lpar_buf_free(b);
  return 1;
}

#endif
