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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* a buffer at least this large is its own mapping */
#if !defined(LPAR_BUFMAP)
#define LPAR_BUFMAP ((size_t)16 * 1024 * 1024)
#endif

typedef struct Buf {
  char *p;
  size_t n;   /* bytes in use */
  size_t cap; /* bytes allocated */
} Buf;

/*
** Resize block p of osize bytes to nsize (0: free it; p NULL: a new one),
** keeping its bytes: the block, or NULL (p as it was). A block of
** LPAR_BUFMAP bytes or more is a mapping of its own, grown by mremap
** (which moves pages, never copies them); smaller ones come from malloc.
** Only such a mapping may be left out of a fork (lpar_buf_dontfork): once
** it is unmapped nothing else lives at its pages, whereas memory from
** malloc is handed out again, and a worker forked later would miss what
** was put there.
*/
static inline void *lpar_buf_realloc(void *p, size_t osize, size_t nsize) {
  int wasbig = p != NULL && osize >= LPAR_BUFMAP, big = nsize >= LPAR_BUFMAP;
  void *q;
  if (nsize == 0) {
    if (wasbig)
      munmap(p, osize);
    else
      free(p);
    return NULL;
  }
  if (!wasbig && !big)
    return realloc(p, nsize);
  if (wasbig && big) {
    q = mremap(p, osize, nsize, MREMAP_MAYMOVE);
    return q == MAP_FAILED ? NULL : q;
  }
  if (big) {
    q = mmap(NULL, nsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
             -1, 0);
    if (q == MAP_FAILED)
      return NULL;
  }
  else if ((q = malloc(nsize)) == NULL)
    return NULL;
  if (p != NULL) {
    memcpy(q, p, osize < nsize ? osize : nsize);
    lpar_buf_realloc(p, osize, 0);
  }
  return q;
}

/*
** A process forked from now on does not get the whole pages of
** [p, p + n), a block of LPAR_BUFMAP bytes or more made by
** lpar_buf_realloc (a smaller one shares the heap and is left alone). The
** partial pages at both ends stay: a Lua string's header lies before its
** bytes. The child must not use the block.
*/
static inline void lpar_buf_dontfork(const void *p, size_t n) {
#if defined(MADV_DONTFORK)
  uintptr_t page, from, to;
  if (n < LPAR_BUFMAP)
    return;
  page = (uintptr_t)sysconf(_SC_PAGESIZE);
  from = ((uintptr_t)p + page - 1) & ~(page - 1);
  to = ((uintptr_t)p + n) & ~(page - 1);
  if (to > from)
    madvise((void *)from, to - from, MADV_DONTFORK);
#else
  (void)p;
  (void)n;
#endif
}

/* Make room for 'extra' more bytes; 0 or -ENOMEM. */
static inline int lpar_buf_reserve(Buf *b, size_t extra) {
  if (extra > b->cap - b->n) {
    size_t want = b->cap ? b->cap : 256;
    char *p;
    if (extra > (size_t)-1 / 2 - b->n)
      return -ENOMEM;
    while (want - b->n < extra)
      want *= 2;
    if ((p = lpar_buf_realloc(b->p, b->cap, want)) == NULL)
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

/* A process forked from now on does not get b's bytes (see
   lpar_buf_dontfork). The child must not use b: it sees b's fields, not
   its pages. */
static inline void lpar_buf_nofork(Buf *b) {
  lpar_buf_dontfork(b->p, b->cap);
}

static inline void lpar_buf_free(Buf *b) {
  lpar_buf_realloc(b->p, b->cap, 0);
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
