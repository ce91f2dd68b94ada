/*
** wire.c: framed send and receive on a pipe or socket; EINTR-safe full
** reads and writes, non-blocking variants for the parent's poll loop.
*/
#include "wire.h"

#include <string.h>

#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

void lpar_wire_put64(char *p, uint64_t v) {
  int i;
  for (i = 0; i < 8; i++)
    p[i] = (char)(v >> (8 * i));
}

uint64_t lpar_wire_get64(const char *p) {
  uint64_t v = 0;
  int i;
  for (i = 0; i < 8; i++)
    v |= (uint64_t)(unsigned char)p[i] << (8 * i);
  return v;
}

void lpar_wire_put32(char *p, uint32_t v) {
  int i;
  for (i = 0; i < 4; i++)
    p[i] = (char)(v >> (8 * i));
}

uint32_t lpar_wire_get32(const char *p) {
  uint32_t v = 0;
  int i;
  for (i = 0; i < 4; i++)
    v |= (uint32_t)(unsigned char)p[i] << (8 * i);
  return v;
}

void lpar_wire_putheader(char *h, const Frame *f) {
  lpar_wire_put32(h, f->type);
  lpar_wire_put32(h + 4, f->count);
  lpar_wire_put64(h + 8, f->len);
}

int lpar_wire_addframe(Buf *b, uint32_t type, uint32_t count, const char *p,
                       size_t len) {
  Frame f;
  if (lpar_buf_reserve(b, LPAR_HDRSIZE + len) != 0)
    return -1;
  f.type = type;
  f.count = count;
  f.len = len;
  lpar_wire_putheader(b->p + b->n, &f);
  if (len > 0)
    memcpy(b->p + b->n + LPAR_HDRSIZE, p, len);
  b->n += LPAR_HDRSIZE + len;
  return 0;
}

int lpar_wire_getheader(const char *h, Frame *f) {
  f->type = lpar_wire_get32(h);
  f->count = lpar_wire_get32(h + 4);
  f->len = lpar_wire_get64(h + 8);
  if (f->type < LPAR_FWORK || f->type >= LPAR_FLAST ||
      f->type == LPAR_FNEWLINE || f->len > LPAR_MAXFRAME)
    return -EPROTO;
  return 0;
}

int lpar_wire_write(int fd, const void *p, size_t n) {
  const char *s = p;
  while (n > 0) {
    ssize_t k;
    do
      k = write(fd, s, n);
    while (k == -1 && errno == EINTR);
    if (k == -1)
      return -errno;
    s += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Blocking full read: 0, 1 if end of file came before any byte, -EPROTO
   if it came after some, -errno. */
static int readfull(int fd, char *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t k;
    do
      k = read(fd, p + got, n - got);
    while (k == -1 && errno == EINTR);
    if (k == -1)
      return -errno;
    if (k == 0)
      return got == 0 ? 1 : -EPROTO;
    got += (size_t)k;
  }
  return 0;
}

int lpar_wire_recv(int fd, Frame *f, Buf *b) {
  char h[LPAR_HDRSIZE];
  int rc = readfull(fd, h, sizeof h);
  if (rc != 0)
    return rc;
  if ((rc = lpar_wire_getheader(h, f)) != 0)
    return rc;
  b->n = 0;
  if ((rc = lpar_buf_reserve(b, (size_t)f->len)) != 0)
    return rc;
  if (f->len > 0 && (rc = readfull(fd, b->p, (size_t)f->len)) != 0)
    return rc == 1 ? -EPROTO : rc;
  b->n = (size_t)f->len;
  return 0;
}

/* Write what fd takes now: bytes written (maybe 0) or -errno. */
static long trywrite(int fd, const void *p, size_t n) {
  ssize_t k;
  do
    k = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (k == -1 && errno == EINTR);
  if (k == -1 && errno == ENOTSOCK) {
    do
      k = write(fd, p, n);
    while (k == -1 && errno == EINTR);
  }
  if (k == -1)
    return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
  return (long)k;
}

long lpar_wire_tryread(int fd, Buf *b) {
  ssize_t k;
  size_t want = 0;
  int rc;
  if (b->n >= LPAR_HDRSIZE) { /* the partial frame ends the buffer */
    Frame f;
    if (lpar_wire_getheader(b->p, &f) == 0 && f.len + LPAR_HDRSIZE > b->n)
      want = (size_t)(f.len + LPAR_HDRSIZE - b->n);
  }
  if (want < 65536)
    want = 65536;
  if ((rc = lpar_buf_reserve(b, want)) != 0)
    return rc;
  do
    k = read(fd, b->p + b->n, b->cap - b->n);
  while (k == -1 && errno == EINTR);
  if (k == -1)
    return (errno == EAGAIN || errno == EWOULDBLOCK) ? -EAGAIN : -errno;
  b->n += (size_t)k;
  return (long)k;
}

const char *lpar_wire_toolong(const Buf *b, char *buf, size_t size) {
  Frame f;
  if (b->n >= LPAR_HDRSIZE && lpar_wire_getheader(b->p, &f) == 0)
    snprintf(buf, size, "frame too long to take (%llu bytes)",
             (unsigned long long)f.len + LPAR_HDRSIZE);
  else
    snprintf(buf, size, "no memory to read a frame");
  return buf;
}

int lpar_wire_sendsome(int fd, const Buf *b, size_t *pos) {
  while (*pos < b->n) {
    long k = trywrite(fd, b->p + *pos, b->n - *pos);
    if (k < 0)
      return (int)k;
    if (k == 0)
      break;
    *pos += (size_t)k;
  }
  return 0;
}
