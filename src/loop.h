/*
** loop.h: the event loop under the engine and the agent: fds watched with
** callbacks, one timer for the next deadline, the signals of a wait.
*/
#ifndef lpar_loop_h
#define lpar_loop_h

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

typedef struct Loop Loop;
typedef struct Watcher Watcher;

/* Called with the events (EPOLL*) that came for w, and the 'arg' given to
   lpar_loop_run. */
typedef void (*WatcherFn)(Loop *l, Watcher *w, uint32_t events, void *arg);

/* An fd watched for events; the owner embeds it and finds itself from it. */
struct Watcher {
  WatcherFn cb;
  int fd;          /* watched fd, -1: not in the loop */
  uint32_t events; /* what it waits for */
};

/* The struct of type t whose member m (a Watcher) is at p. */
#define LPAR_OWNER(p, t, m) ((t *)(void *)((char *)(p)-offsetof(t, m)))

/* the most signals a wait takes */
#define LPAR_LOOPNSIG 3

/* The signals a wait took: their actions before, and the caller's mask. */
typedef struct SignalHold {
  int n;
  int sigs[LPAR_LOOPNSIG];
  int taken[LPAR_LOOPNSIG]; /* caught (the caller did not ignore it) */
  struct sigaction old[LPAR_LOOPNSIG];
  int prior;     /* the signal caught before: a wait this one is inside of
                    has yet to see it (lpar_loop_holdsignals) */
  sigset_t mask; /* the caller's */
} SignalHold;

struct Loop {
  int epfd;                /* every watched fd, and the timer */
  int tfd;                 /* timerfd of the next deadline */
  long long armed;         /* when it fires (ns, monotonic), 0: never */
  struct epoll_event *evs; /* events of one wait */
  int nevs;
  int at, got;       /* the event handled, of those that came */
  int waiting;       /* a wait took signals (lpar_loop_takesignals) */
  int watching;      /* ... some: it waits with waitmask */
  sigset_t waitmask; /* the mask a wait takes signals with */
  SignalHold hold;   /* what the wait took; hold.mask: the caller's mask */
};

/* Make l, with room for 'nevs' events per wait. 0, or -errno with *call
   naming the call that failed; lpar_loop_free frees what was made. */
int lpar_loop_init(Loop *l, int nevs, const char **call);
void lpar_loop_free(Loop *l);

/* A watcher not in any loop, calling 'cb'. */
void lpar_watcher_init(Watcher *w, WatcherFn cb);

/* Watch 'fd' for 'events' with w (not yet watching): 0 or -errno
   (-EPERM: fd cannot be watched, a regular file). */
int lpar_loop_start(Loop *l, Watcher *w, int fd, uint32_t events);

/* Stop watching; events of the wait in hand for w are dropped. */
void lpar_loop_stop(Loop *l, Watcher *w);

/* Whether w is in the loop. */
#define lpar_loop_active(w) ((w)->fd >= 0)

/* Wake the loop at 'at' (ns, lpar_proc_now's clock); 0: never. 0, or
   -errno. */
int lpar_loop_arm(Loop *l, long long at);

/* Wait up to 'ms' (-1: until an event) and call the watchers of what came,
   with 'arg'. A signal caught (lpar_loop_caught) ends the wait, others are
   waited through. Returns how many events came, or -errno. */
int lpar_loop_run(Loop *l, int ms, void *arg);

/* Until lpar_loop_givesignals: each of the n signals (n <= LPAR_LOOPNSIG)
   the caller does not ignore is caught (lpar_loop_caught), blocked but
   while the loop waits. Returns whether any is taken. */
int lpar_loop_takesignals(Loop *l, const int *sigs, int n);
void lpar_loop_givesignals(Loop *l);

/* The signal mask children of the loop's process start with: the caller's,
   not the one a wait set; 'cur' receives the current one. */
const sigset_t *lpar_loop_callermask(Loop *l, sigset_t *cur);

/* For a wait outside the loop (close hooks: lpar_worker_finish watches
   lpar_loop_caughtflag): each of the n signals the caller does not ignore
   is caught, and unblocked (the CLI blocks them), so that one ends the
   wait at once, even one pending. */
void lpar_loop_holdsignals(SignalHold *h, const int *sigs, int n);

/* Put back the caller's mask and actions, and give it the signal caught,
   if any, as it would have had it without the wait (pending, if it blocks
   it). */
void lpar_loop_releasesignals(const SignalHold *h);

/* The flag a caught signal sets. */
volatile sig_atomic_t *lpar_loop_caughtflag(void);

/* Catch 'sig' for good (the agent's SIGTERM and SIGHUP): it ends a wait.
   0, or -errno. */
int lpar_loop_catch(int sig);

/* The last signal caught, 0 if none. */
int lpar_loop_caught(void);

#endif
