/*
** proc.h: worker processes: fork with two channels, fd hygiene, waitpid,
** kill, shared status slots. Knows nothing about Lua.
*/
#ifndef lpar_proc_h
#define lpar_proc_h

#include <signal.h>
#include <stddef.h>
#include <sys/types.h>

/* One worker as the parent sees it (or, in the child, its own ends). */
typedef struct Proc {
  pid_t pid;
  int cmdfd; /* parent: socket end to send work; child: end to read it */
  int resfd; /* parent: pipe end to read results; child: end to write them */
  int pidfd; /* parent: readable once the worker has ended; -1 if the
                system has no pidfd (then end of file on resfd tells) */
} Proc;

/* What a worker's slot says while it runs its init or close hook. */
#define LPAR_SLOTHOOK (-1)

/* A worker still running its close hook this long (ns) after it was told
   to leave is killed, unless a timeout was given (then that applies). */
#if !defined(LPAR_CLOSEGRACENS)
#define LPAR_CLOSEGRACENS 10000000000LL
#endif

/* A worker without a close hook is given at least this long (ns) to
   leave, whatever the timeout. */
#define LPAR_LEAVENS 1000000000LL

/* A frame begun and left unfinished by a worker that is not running an
   item is a protocol error after this long (ns) without a byte, unless a
   timeout was given (then that applies). */
#if !defined(LPAR_STALLNS)
#define LPAR_STALLNS 10000000000LL
#endif

/*
** A word pair each worker updates as it runs items, in memory shared with
** the parent: which item it is on (0 between items) and since when.
*/
typedef struct Slot {
  volatile long long item;
  volatile long long since; /* CLOCK_MONOTONIC, ns */
  volatile long long cut;   /* written by the parent: the worker's items up
                               to this one are asked to end early (see
                               lpar_overdue); 0: none */
  volatile long long part;  /* written by the worker: records of its item
                               (a batch) done so far, or -1 if its function
                               does not say (see lpar_worker_progress) */
} Slot;

/* What the child does with SIGINT: the host's choice if it ignored it. */
typedef struct ChildSetup {
  const sigset_t *mask; /* signal mask the child starts with */
  int ignint;           /* keep SIGINT ignored */
} ChildSetup;

/*
** Fork a worker. Parent: returns the pid and fills 'p' with its ends
** (results end non-blocking) and a pidfd when the system has them. Child:
** returns 0 with 'p' holding the child's ends, every other fd lpar tracks
** closed, PR_SET_PDEATHSIG set, SIGINT/SIGTERM/SIGPIPE/SIGCHLD at their
** defaults, SIGTTIN/SIGTTOU ignored. The worker leads a process group of
** its own (set in both processes, so it exists when fork returns): what it
** starts is stopped with it, and a terminal's Ctrl-C reaches only the
** caller. -errno on failure, with nothing left open and *call naming the
** call that failed.
*/
pid_t lpar_proc_fork(Proc *p, const ChildSetup *cs, const char **call);

/* Close the parent's channel ends of 'p' (safe to call twice); the pidfd
   stays until lpar_proc_closepid. */
void lpar_proc_close(Proc *p);
void lpar_proc_closepid(Proc *p);

/* Send 'sig' to worker 'pid' and every process in its group (the worker
   itself too, should it have left the group). */
void lpar_proc_kill(pid_t pid, int sig);

/* The same for worker 'p', through its pidfd when it has one, and not at
   all once it was reaped (with SIGCHLD ignored, by the kernel): its pid
   could then be another process's. */
void lpar_proc_killproc(const Proc *p, int sig);

/*
** Reap 'pid' if it has ended: 1 and *status set, 0 if still running (only
** when !block), -errno (-ECHILD when someone else reaped it). What is left
** of its process group is killed first, while the pid cannot be reused.
*/
int lpar_proc_wait(pid_t pid, int *status, int block);

/* The same for worker 'p', through its pidfd when it has one: another
   process that got its pid once it was reaped elsewhere is never
   touched. */
int lpar_proc_waitproc(const Proc *p, int *status, int block);

/*
** Wait until worker 'p' ends or the monotonic clock reaches 'deadline'
** (ns), or *stop (if not NULL) is set (by a signal handler; looked at
** every 100 ms at most, and at once when the signal interrupts the
** wait), then reap it as lpar_proc_wait does: 1 and *status set, 0 if it
** still runs, -errno. Uses its pidfd when it has one.
*/
int lpar_proc_waituntil(const Proc *p, long long deadline,
                        volatile sig_atomic_t *stop, int *status);

/*
** Make SIGCHLD deliverable for the time lpar waits for its workers: when
** the caller ignores it (SIG_IGN or SA_NOCLDWAIT), children are reaped by
** the kernel and their exit status is lost. Returns 1 and saves the
** caller's action in *old if it changed it (restore it with sigaction).
*/
int lpar_proc_holdchld(struct sigaction *old);

/*
** Reap a worker whose channel reached end of file, so it is exiting: it
** gets up to 200 ms to finish, then SIGKILL (at once if 'force'). Returns
** as lpar_proc_wait when blocking.
*/
int lpar_proc_reap(const Proc *p, int force, int *status);

/*
** Whether a worker that was told to leave ended badly: it exited with a
** non-zero status (os.exit(7) in its close hook) or was killed by a
** signal other than SIGKILL (lpar's own) or SIGPIPE (its channel closed
** while it still wrote).
*/
int lpar_proc_leftbadly(int status);

/* Describe a wait status: "exited with status 3", "killed by signal 9
   (SIGKILL)". Returns 'buf'. */
const char *lpar_proc_describe(int status, char *buf, size_t size);

/* Seconds as every message of lpar writes them, the way Lua writes a
   float: "0.25", "2.0", "1e+09"; returns buf. */
const char *lpar_proc_secs(double secs, char *buf, size_t size);

/* Monotonic clock in nanoseconds. */
long long lpar_proc_now(void);

/* Shared anonymous memory for 'n' slots; NULL on failure. */
Slot *lpar_proc_slots(size_t n);
void lpar_proc_freeslots(Slot *s, size_t n);

/*
** Every fd lpar opens is tracked, so that a forked child can close the
** ones that are not its own.
*/
void lpar_proc_track(int fd);
void lpar_proc_closefd(int *fd); /* untrack and close; sets *fd = -1 */

#endif
