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

/* Catch 'sig'; its action before goes to *old unless NULL. 0, or -errno. */
static int catchsig(int sig, struct sigaction *old) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = oncatch;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, old) == 0 ? 0 : -errno;
}

/* Give back the action of signal k of h, one the caller ignores. Ignoring
   drops a pending signal: one the caller blocks stays pending, as it was
   (Linux keeps a blocked signal pending even when it is ignored). */
static void giveignored(const SignalHold *h, int k) {
  sigset_t pend;
  int keep = sigismember(&h->mask, h->sigs[k]) && sigpending(&pend) == 0 &&
             sigismember(&pend, h->sigs[k]);
  sigaction(h->sigs[k], &h->old[k], NULL);
  if (keep)
    raise(h->sigs[k]);
}

/*
** Take the n signals for h: each the caller does not ignore is caught and
** 'how' (SIG_BLOCK or SIG_UNBLOCK) is done to it in the caller's mask,
** which h->mask receives. One sigaction swaps each action (it returns the
** one before), with the signals blocked meanwhile: one the caller ignores,
** its action given back, is dropped as it would have been. Returns how
** many are taken.
*/
static int takeactions(SignalHold *h, const int *sigs, int n, int how) {
  sigset_t all, mask;
  int k, ntaken = 0;
  sigemptyset(&all);
  for (k = 0; k < n; k++)
    sigaddset(&all, sigs[k]);
  sigprocmask(SIG_BLOCK, &all, &h->mask);
  mask = h->mask;
  h->n = n;
  for (k = 0; k < n; k++) {
    h->sigs[k] = sigs[k];
    h->taken[k] = catchsig(sigs[k], &h->old[k]) == 0;
    if (h->taken[k] && h->old[k].sa_handler == SIG_IGN) {
      giveignored(h, k);
      h->taken[k] = 0;
    }
    if (!h->taken[k])
      continue;
    ntaken++;
    if (how == SIG_BLOCK)
      sigaddset(&mask, sigs[k]);
    else
      sigdelset(&mask, sigs[k]);
  }
  if (how != SIG_BLOCK || ntaken < n) /* else it is the mask set above */
    sigprocmask(SIG_SETMASK, &mask, NULL);
  return ntaken;
}

/* Give back the actions h took. */
static void giveactions(const SignalHold *h) {
  int k;
  for (k = 0; k < h->n; k++)
    if (h->taken[k])
      sigaction(h->sigs[k], &h->old[k], NULL);
}

int lpar_loop_takesignals(Loop *l, const int *sigs, int n) {
  int k;
  l->watching = takeactions(&l->hold, sigs, n, SIG_BLOCK) > 0;
  l->waitmask = l->hold.mask;
  for (k = 0; k < n; k++)
    if (l->hold.taken[k])
      sigdelset(&l->waitmask, sigs[k]);
  caught = 0;
  l->waiting = 1;
  return l->watching;
}

void lpar_loop_givesignals(Loop *l) {
  l->waiting = 0;
  giveactions(&l->hold);
  l->hold.n = 0;
  sigprocmask(SIG_SETMASK, &l->hold.mask, NULL);
}

const sigset_t *lpar_loop_callermask(Loop *l, sigset_t *cur) {
  sigprocmask(SIG_BLOCK, NULL, cur);
  return l->waiting ? &l->hold.mask : cur;
}

int lpar_loop_catch(int sig) {
  return catchsig(sig, NULL);
}

int lpar_loop_caught(void) {
  return caught;
}

void lpar_loop_holdsignals(SignalHold *h, const int *sigs, int n) {
  h->prior = caught;
  caught = 0;
  takeactions(h, sigs, n, SIG_UNBLOCK);
}

void lpar_loop_releasesignals(const SignalHold *h) {
  int sig;
  sigprocmask(SIG_SETMASK, &h->mask, NULL);
  sig = caught;
  giveactions(h);
  caught = h->prior;
  if (sig != 0)
    raise(sig);
}

volatile sig_atomic_t *lpar_loop_caughtflag(void) {
  return &caught;
}
