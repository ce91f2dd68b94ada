/*
** pool.h: worker processes: fork with two channels, fd hygiene, waitpid,
** kill, shared status slots. Knows nothing about Lua.
*/
#ifndef lpar_pool_h
#define lpar_pool_h

#include <signal.h>
#include <stddef.h>
#include <sys/types.h>

/* One worker as the parent sees it (or, in the child, its own ends). */
typedef struct Proc {
  pid_t pid;
  int cmdfd; /* parent: socket end to send work; child: end to read it */
  int resfd; /* parent: pipe end to read results; child: end to write them */
} Proc;

/*
** A word pair each worker updates as it runs items, in memory shared with
** the parent: which item it is on (0 between items) and since when.
*/
typedef struct Slot {
  volatile long long item;
  volatile long long since; /* CLOCK_MONOTONIC, ns */
} Slot;

/* What the child does with SIGINT: the host's choice if it ignored it. */
typedef struct ChildSetup {
  const sigset_t *mask; /* signal mask the child starts with */
  int ignint;           /* keep SIGINT ignored */
} ChildSetup;

/*
** Fork a worker. Parent: returns the pid and fills 'p' with its ends
** (results end non-blocking). Child: returns 0 with 'p' holding the
** child's ends, every other fd lpar tracks closed, PR_SET_PDEATHSIG set,
** SIGINT/SIGTERM/SIGPIPE/SIGCHLD at their defaults. -errno on failure,
** with nothing left open and *call naming the call that failed.
*/
pid_t lpar_pool_fork(Proc *p, const ChildSetup *cs, const char **call);

/* Close the parent's ends of 'p' (safe to call twice). */
void lpar_pool_close(Proc *p);

/*
** Reap 'pid' if it has ended: 1 and *status set, 0 if still running (only
** when !block), -errno (-ECHILD when someone else reaped it).
*/
int lpar_pool_wait(pid_t pid, int *status, int block);

/*
** Reap a worker whose channel reached end of file, so it is exiting: it
** gets up to 200 ms to finish, then SIGKILL (at once if 'force'). Returns
** as lpar_pool_wait when blocking.
*/
int lpar_pool_reap(pid_t pid, int force, int *status);

/* Describe a wait status: "exited with status 3", "killed by signal 9
   (SIGKILL)". Returns 'buf'. */
const char *lpar_pool_describe(int status, char *buf, size_t size);

/* Monotonic clock in nanoseconds. */
long long lpar_pool_now(void);

/* Shared anonymous memory for 'n' slots; NULL on failure. */
Slot *lpar_pool_slots(size_t n);
void lpar_pool_freeslots(Slot *s, size_t n);

/*
** Every fd lpar opens is tracked, so that a forked child can close the
** ones that are not its own.
*/
void lpar_pool_track(int fd);
void lpar_pool_closefd(int *fd); /* untrack and close; sets *fd = -1 */

#endif
