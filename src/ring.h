/*
** ring.h: a ring of bytes in memory shared by the parent and one worker.
** A big results frame is copied into the ring once, and only its place
** travels through the pipe: the parent decodes it where it lies and then
** hands the space back. This saves the copy into the pipe, the copy out of
** it, and the pipe's lock, which the two sides otherwise take turns on.
*/
#ifndef lpar_ring_h
#define lpar_ring_h

#include <stddef.h>
#include <stdint.h>

typedef struct Ring {
  char *base;    /* a control page, then 'size' bytes; NULL: no ring */
  size_t size;   /* bytes for frames */
  uint64_t head; /* worker: where the next frame goes (grows forever) */
  uint64_t tail; /* parent: end of the frames handed back */
} Ring;

/* Map a ring of 'size' bytes (parent, before the fork): 0 or -errno. */
int lpar_ring_map(Ring *g, size_t size);

/* Unmap it (safe on a ring never mapped, or unmapped already). */
void lpar_ring_unmap(Ring *g);

/* Parent, after the fork: workers forked later do not inherit the ring. */
void lpar_ring_keep(Ring *g);

/*
** Worker: room for a frame of 'n' bytes, waiting until the parent has
** handed back enough; *pos is the place to send on. NULL when the ring is
** missing or 'n' is more than half of it (such a frame goes through the
** pipe), or when the parent closed 'fd', the pipe the place would be sent
** on, while the worker waited.
*/
char *lpar_ring_put(Ring *g, size_t n, int fd, uint64_t *pos);

/*
** Parent: the frame a worker says it put at 'pos', 'n' bytes long, or
** NULL if that is not a place the worker could have used. Frames are
** taken in the order they were put.
*/
const char *lpar_ring_get(const Ring *g, uint64_t pos, uint64_t n);

/* Parent: the frames up to 'end' are done with; wake the worker if it
   waits for room. */
void lpar_ring_release(Ring *g, uint64_t end);

#endif
