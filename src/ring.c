/*
** ring.c: the shared ring of ring.h. Positions grow forever and are taken
** modulo the size; a frame never wraps: one that would is put at the
** start of the next lap, and the space skipped counts as used. The
** worker waits for room on a futex word the parent bumps each time it
** hands space back.
*/
#include "ring.h"

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CTLSIZE 4096

typedef struct Control {
  _Atomic uint64_t tail;    /* parent: end of the frames handed back */
  _Atomic uint32_t seq;     /* bumped at each hand-back (the futex word) */
  _Atomic uint32_t waiting; /* the worker sleeps on 'seq' */
} Control;

static Control *control(const Ring *g) {
  return (Control *)(void *)g->base;
}

int lpar_ring_map(Ring *g, size_t size) {
  void *p = mmap(NULL, CTLSIZE + size, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return -errno;
  g->base = p; /* fresh shared memory reads as zeros: tail = seq = 0 */
  g->size = size;
  g->head = g->tail = 0;
  return 0;
}

void lpar_ring_unmap(Ring *g) {
  if (g->base != NULL)
    munmap(g->base, CTLSIZE + g->size);
  g->base = NULL;
}

void lpar_ring_keep(Ring *g) {
#if defined(MADV_DONTFORK)
  if (g->base != NULL)
    madvise(g->base, CTLSIZE + g->size, MADV_DONTFORK);
#else
  (void)g;
#endif
}

static int roomfor(Control *c, uint64_t end, size_t size) {
  return end - atomic_load(&c->tail) <= size;
}

/* Whether the reader of the pipe 'fd' is gone. */
static int closed(int fd) {
  struct pollfd p;
  p.fd = fd;
  p.events = 0;
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLERR | POLLHUP)) != 0;
}

char *lpar_ring_put(Ring *g, size_t n, int fd, uint64_t *pos) {
  Control *c;
  uint64_t at;
  size_t off;
  if (g->base == NULL || n > g->size / 2)
    return NULL;
  c = control(g);
  at = g->head;
  off = (size_t)(at % g->size);
  if (off + n > g->size)
    at += g->size - off; /* to the start of the next lap */
  while (!roomfor(c, at + n, g->size)) {
    struct timespec wait = {0, 100000000}; /* then look at the pipe */
    uint32_t seq = atomic_load(&c->seq);
    atomic_store(&c->waiting, 1);
    if (roomfor(c, at + n, g->size))
      break;
    if (syscall(SYS_futex, &c->seq, FUTEX_WAIT, seq, &wait, NULL, 0) == -1 &&
        errno == ETIMEDOUT && closed(fd))
      return NULL; /* writing to the pipe reports it */
  }
  g->head = at + n;
  *pos = at;
  return g->base + CTLSIZE + at % g->size;
}

const char *lpar_ring_get(const Ring *g, uint64_t pos, uint64_t n) {
  size_t off;
  if (g->base == NULL || pos < g->tail || n > g->size / 2 ||
      pos - g->tail > g->size)
    return NULL;
  off = (size_t)(pos % g->size);
  if (off + n > g->size || pos + n - g->tail > g->size)
    return NULL;
  return g->base + CTLSIZE + off;
}

void lpar_ring_release(Ring *g, uint64_t end) {
  Control *c = control(g);
  g->tail = end;
  atomic_store(&c->tail, end);
  atomic_fetch_add(&c->seq, 1);
  if (atomic_exchange(&c->waiting, 0))
    syscall(SYS_futex, &c->seq, FUTEX_WAKE, 1, NULL, NULL, 0);
}
