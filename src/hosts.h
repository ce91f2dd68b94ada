/*
** hosts.h: workers on other machines. A host is a command (ssh, srun,
** kubectl exec, ...) that runs an lpar agent, `lpar --worker -j N`, at the
** far end of its stdin and stdout. The parent's engine sees a host as one
** place whose chunks run on the agent's N workers (engine.c); the agent is
** a pool of its own behind that one stream (agent.c).
**
** The conversation, on top of the workers' frames (worker.h):
**   agent:  HELLO (count = its workers; payload: versions), first;
**   parent: SETUP (versions, u64 max_memory, u64 timeout in ns, u64 the
**           silence the agent takes as the parent's end in ns (0: its
**           default), u32 kind,
**           then kind 0: u32 flags (1 init, 2 close), u32 functions, and
**           as many xfer encodings; kind 1: a codec table the CLI builds
**           its functions from, see lpar.cli's agent()). The agent refuses
**           other versions with ERROR 0, and says READY (count 1) once its
**           workers run;
**   parent: CALL with a u64 timeout per item in ns before the worker's
**           payload (the agent enforces it), then ITEMS; the agent answers
**           as a worker does: RESULT and ERROR frames in item order, then
**           READY (count 0). Two chunks may be in flight;
**   both:   BEAT when nothing else was sent for LPAR_BEATNS; a side that
**           hears nothing for its limit takes the other as gone. The
**           parent's BEAT carries its clock (u64 ns), every LPAR_BEATNS,
**           and the agent sends it back at once (count 1): the round trip
**           sizes the host's chunks;
**   parent: CANCEL when the job of the chunks a host holds ended (failed,
**           cancelled): the agent stops them (killing the workers that
**           run them) and says READY for each, with no results.
** The agent writes '\n' after each frame (line-buffered relays pass whole
** frames on); the parent skips it.
*/
#ifndef lpar_hosts_h
#define lpar_hosts_h

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "lua.h"

#define LPAR_PROTOCOL 1

/* what the workers of a host hold, as SETUP says (its kind) */
#define LPAR_SETUPPOOL 0 /* a pool's functions, xfer-encoded */
#define LPAR_SETUPCLI 1  /* the CLI's script and options, one codec table */

/* flags of a pool's SETUP: which hooks follow */
#define LPAR_SETUPINIT 1  /* an init function */
#define LPAR_SETUPCLOSE 2 /* a close function */

/* bytes of the versions block that opens HELLO and SETUP */
#define LPAR_VERSIONSIZE 52

/* a side sends BEAT when it sent nothing for this long (ns) */
#if !defined(LPAR_BEATNS)
#define LPAR_BEATNS 1000000000LL
#endif

/* the parent takes a host that sent nothing for this long as lost (ns) */
#if !defined(LPAR_HOSTSILENCENS)
#define LPAR_HOSTSILENCENS 5000000000LL
#endif

/* ... and one that has not said READY for this long (ns): ssh and srun
   take their time to connect, and the CLI's script loads there */
#if !defined(LPAR_HOSTSTARTNS)
#define LPAR_HOSTSTARTNS 60000000000LL
#endif

/* an agent that heard nothing from its parent for this long leaves (ns):
   a parent blocked on its output (a pager) or not pumping its pool stays
   silent, and its hosts' work is redone when it comes back */
#if !defined(LPAR_AGENTIDLENS)
#define LPAR_AGENTIDLENS 60000000000LL
#endif

/* at most this many hosts are starting (no HELLO yet) at once: ssh
   refuses bursts of connections (MaxStartups) */
#if !defined(LPAR_HOSTWAVE)
#define LPAR_HOSTWAVE 32
#endif

/* ... and one that got no SETUP for this long, after its HELLO (the
   parent sends it at once) */
#if !defined(LPAR_AGENTSETUPNS)
#define LPAR_AGENTSETUPNS 10000000000LL
#endif

/* a host lost this many times in a row (no chunk done in between) is
   left out */
#if !defined(LPAR_HOSTFAILS)
#define LPAR_HOSTFAILS 3
#endif

/* Append this side's versions block (LPAR_VERSIONSIZE bytes). */
int lpar_hosts_putversions(Buf *b);

/* Check the versions block at p[0..len) against this side's: 0, or -1
   with "<theirs>" and "<ours>" written into why as a sentence. */
int lpar_hosts_checkversions(const char *p, size_t len, const char *who,
                             char *why, size_t size);

/*
** Push a table describing the host SPEC at 'idx' ("[N/]PREFIX"), with
** 'remote' the agent's command: {spec = SPEC, n = N (0: not given),
** argv = {PREFIX words..., remote words..., "--worker" [, "-j", N]}}, or
** {spec = SPEC, n = N, here = true} for ":". Raises naming the spec when
** it is malformed (bad count, unbalanced quotes, nothing to run).
*/
void lpar_hosts_parse(lua_State *L, int idx, const char *remote);

/* Split 's' into words as a POSIX shell would (blanks separate; '...'
   and "..." quote, backslash escapes; no expansion) and push them as a
   sequence; 0, or -1 with a message pushed. */
int lpar_hosts_words(lua_State *L, const char *s);

#endif
