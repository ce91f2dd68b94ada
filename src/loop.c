/*
** loop.c: epoll with watchers that carry a callback, a timerfd for the
** next deadline, and the signal mask of a wait; knows nothing of items.
*/
#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "proc.h"

#define NSPERSEC 1000000000LL

/* the signal that ended a wait */
static volatile sig_atomic_t caught;

static void oncatch(int sig) {
  caught = sig;
}

static int ctl(Loop *l, int op, int fd, uint32_t events, void *ptr) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.ptr = ptr;
  return epoll_ctl(l->epfd, op, fd, &ev) == -1 ? -errno : 0;
}

int lpar_loop_init(Loop *l, int nevs, const char **call) {
  memset(l, 0, sizeof *l);
  l->epfd = l->tfd = -1;
  l->nevs = nevs;
  l->evs = calloc((size_t)nevs, sizeof(struct epoll_event));
  if (l->evs == NULL) {
    *call = "calloc";
    return -ENOMEM;
  }
  l->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (l->epfd < 0) {
    *call = "epoll_create1";
    return -errno;
  }
  lpar_proc_track(l->epfd);
  l->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (l->tfd < 0) {
    *call = "timerfd_create";
    return -errno;
  }
  lpar_proc_track(l->tfd);
  *call = "epoll_ctl";
  return ctl(l, EPOLL_CTL_ADD, l->tfd, EPOLLIN, l); /* the loop: the timer */
}

void lpar_loop_free(Loop *l) {
  lpar_proc_closefd(&l->epfd);
  lpar_proc_closefd(&l->tfd);
  free(l->evs);
  l->evs = NULL;
}

void lpar_watcher_init(Watcher *w, WatcherFn cb) {
  w->cb = cb;
  w->fd = -1;
  w->events = 0;
}

int lpar_loop_start(Loop *l, Watcher *w, int fd, uint32_t events) {
  int rc = ctl(l, EPOLL_CTL_ADD, fd, events, w);
  if (rc == 0) {
    w->fd = fd;
    w->events = events;
  }
  return rc;
}

void lpar_loop_stop(Loop *l, Watcher *w) {
  int i;
  if (w->fd < 0)
    return;
  ctl(l, EPOLL_CTL_DEL, w->fd, 0, NULL);
  w->fd = -1;
  for (i = l->at + 1; i < l->got; i++) /* its events still in hand */
    if (l->evs[i].data.ptr == w)
      l->evs[i].data.ptr = NULL;
}

int lpar_loop_arm(Loop *l, long long at) {
  struct itimerspec its;
  if (at == l->armed)
    return 0;
  memset(&its, 0, sizeof its);
  if (at > 0) {
    its.it_value.tv_sec = at / NSPERSEC;
    its.it_value.tv_nsec = at % NSPERSEC;
  }
  if (timerfd_settime(l->tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
    return -errno;
  l->armed = at;
  return 0;
}

/* The timer fired: clear it. */
static void fired(Loop *l) {
  uint64_t ticks;
  if (read(l->tfd, &ticks, sizeof ticks) < 0) { /* just clearing it */
  }
  l->armed = 0;
}

int lpar_loop_run(Loop *l, int ms, void *arg) {
  int n;
  do
    n = epoll_pwait(l->epfd, l->evs, l->nevs, ms,
                    l->waiting && l->watching ? &l->waitmask : NULL);
  while (n == -1 && errno == EINTR && !caught);
  if (n == -1)
    return errno == EINTR ? 0 : -errno;
  l->got = n;
  for (l->at = 0; l->at < n; l->at++) {
    void *p = l->evs[l->at].data.ptr;
    Watcher *w = p;
    if (p == l)
      fired(l);
    else if (p != NULL)
      w->cb(l, w, l->evs[l->at].events, arg);
  }
  l->at = l->got = 0;
  return n;
}

int lpar_loop_takesignals(Loop *l, const int *sigs, int n) {
  struct sigaction sa;
  sigset_t block;
  int k;
  /* not one the caller ignores (blocked, it would be left pending for the
     caller to find) */
  sigemptyset(&block);
  for (k = 0; k < n; k++) {
    l->sigs[k] = sigs[k];
    l->taken[k] = sigaction(sigs[k], NULL, &l->oldact[k]) == 0 &&
                  l->oldact[k].sa_handler != SIG_IGN;
    if (l->taken[k])
      sigaddset(&block, sigs[k]);
  }
  for (; k < LPAR_LOOPNSIG; k++)
    l->taken[k] = 0;
  sigprocmask(SIG_BLOCK, &block, &l->oldmask);
  l->waitmask = l->oldmask;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = oncatch;
  sigemptyset(&sa.sa_mask);
  l->watching = 0;
  for (k = 0; k < n; k++)
    if (l->taken[k]) {
      sigaction(sigs[k], &sa, NULL);
      sigdelset(&l->waitmask, sigs[k]);
      l->watching = 1;
    }
  caught = 0;
  l->waiting = 1;
  return l->watching;
}

void lpar_loop_givesignals(Loop *l) {
  int k;
  l->waiting = 0;
  for (k = 0; k < LPAR_LOOPNSIG; k++)
    if (l->taken[k]) {
      sigaction(l->sigs[k], &l->oldact[k], NULL);
      l->taken[k] = 0;
    }
  sigprocmask(SIG_SETMASK, &l->oldmask, NULL);
}

const sigset_t *lpar_loop_callermask(Loop *l, sigset_t *cur) {
  sigprocmask(SIG_BLOCK, NULL, cur);
  return l->waiting ? &l->oldmask : cur;
}

int lpar_loop_catch(int sig) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = oncatch;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, NULL) == 0 ? 0 : -errno;
}

int lpar_loop_caught(void) {
  return caught;
}

void lpar_loop_holdsignals(SignalHold *h, const int *sigs, int n) {
  struct sigaction sa;
  sigset_t set;
  int k;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = oncatch;
  sigemptyset(&sa.sa_mask);
  h->n = n;
  h->prior = caught;
  caught = 0;
  sigemptyset(&set);
  for (k = 0; k < n; k++) {
    h->sigs[k] = sigs[k];
    h->taken[k] = sigaction(sigs[k], NULL, &h->old[k]) == 0 &&
                  h->old[k].sa_handler != SIG_IGN &&
                  sigaction(sigs[k], &sa, NULL) == 0;
    if (h->taken[k])
      sigaddset(&set, sigs[k]);
  }
  sigprocmask(SIG_UNBLOCK, &set, &h->mask);
}

void lpar_loop_releasesignals(const SignalHold *h) {
  int k, sig;
  sigprocmask(SIG_SETMASK, &h->mask, NULL);
  sig = caught;
  for (k = 0; k < h->n; k++)
    if (h->taken[k])
      sigaction(h->sigs[k], &h->old[k], NULL);
  caught = h->prior;
  if (sig != 0)
    raise(sig);
}

volatile sig_atomic_t *lpar_loop_caughtflag(void) {
  return &caught;
}
