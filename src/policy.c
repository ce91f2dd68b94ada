/*
** policy.c: the scheduling policy. Chunk sizes, when to start a worker,
** when to queue a second chunk, which item killed a worker. Pure.
*/
#include "policy.h"

/*
** Chunk size for the next hand-out: the fixed size if there is one (capped
** by max), else guided self-scheduling (a share of what is left, about
** left / 2 places) raised so that a chunk takes at least minns once the
** time per item is known, and kept to 'probe' items until it is. With no
** known total (a stream), a chunk is sized by time alone. Never below 1.
*/
long long lpar_policy_chunk(const SchedChunk *s) {
  long long c;
  int places = s->places > 0 ? s->places : 1;
  if (s->fixed > 0)
    c = s->fixed;
  else {
    c = s->left < 0 ? 1 : (s->left + 2LL * places - 1) / (2LL * places);
    if (s->tns > 0) {
      double lo = s->minns / s->tns;
      if (lo > (double)c)
        c = lo > 1e15 ? (long long)1e15 : (long long)lo;
    }
    else if (s->probe > 0 && c > s->probe)
      c = s->probe;
  }
  if (s->max > 0 && c > s->max)
    c = s->max;
  return c < 1 ? 1 : c;
}

double lpar_policy_hostwork(double floor, long long rtt) {
  double w = (double)rtt * LPAR_HOSTRTTS;
  if (w > LPAR_HOSTMAXWORKNS)
    w = LPAR_HOSTMAXWORKNS;
  return w > floor ? w : floor;
}

long long lpar_policy_hostchunk(const SchedChunk *s, int hostn) {
  SchedChunk t = *s;
  long long c;
  /* a fixed size is the least a worker gets: a round trip is costly */
  t.fixed = 0;
  c = lpar_policy_chunk(&t);
  if (c < s->fixed)
    c = s->fixed;
  c *= hostn > 1 ? hostn : 1;
  if (s->left > 0 && c > s->left)
    c = s->left;
  if (s->max > 0 && c > s->max)
    c = s->max;
  return c < 1 ? 1 : c;
}

/*
** Whether to start another worker now that all 'live' are busy: 0 yes, -1
** no, else ask again in this many ms (what is left of the wait, rounded
** up).
**
** Once the time per item is known, another worker starts only while the
** items left would keep each worker busy for worthns (always while a
** stream may bring more), and while the caller takes results faster than
** the workers make them: when taking results is what limits the run,
** another worker would only take processor time from the caller.
**
** Until then (every worker still on its first item), workers start in
** waves wavegap apart, each wave doubling their number; w is updated.
*/
int lpar_policy_spawn(const SchedSpawn *s, SchedWave *w) {
  if (s->tns > 0) {
    if (s->pitems > 0 && (double)s->pns / (double)s->pitems * s->live >= s->tns)
      return -1;
    if (s->left < 0)
      return 0;
    return (double)s->left * s->tns > (double)s->worthns * s->live ? 0 : -1;
  }
  if (s->live < w->cap)
    return 0;
  if (s->now - w->at < s->wavegap)
    return (int)((s->wavegap - (s->now - w->at) + 999999) / 1000000);
  w->at = s->now;
  w->cap = 2 * s->live;
  return 0;
}

/* A worker has started and 'live' run now: the first one opens the first
   wave. */
void lpar_policy_started(SchedWave *w, int live, long long now) {
  if (live == 1 && w->cap == 0) {
    w->at = now;
    w->cap = 1;
  }
}

/* Time per item of a chunk that began at item 'first' 'elapsed' ns ago,
   whose worker is now on item 'at' (from the shared slots); 0 until it is
   past the first. */
double lpar_policy_slotrate(long long elapsed, long long first, long long at) {
  if (at <= first)
    return 0;
  return (double)elapsed / (double)(at - first);
}

/*
** Whether a busy worker should get a second chunk now, to start it as soon
** as it is done with its first ('queued' items, out for 'elapsed' ns)
** rather than wait for the parent: only when items are known to be quick
** (the queued chunk is expected to take under 10 chunkns), the chunk is on
** time (under twice what it should take, plus chunkns), and never for a
** job's last chunks: after this one of 'nextchunk' items, what is 'left'
** must still give each of the job's 'places' another chunk. A chunk queued
** behind an item that turns out slow waits while others could run it.
*/
int lpar_policy_prefetch(double tns, long long queued, long long elapsed,
                         double chunkns, long long left, int places,
                         long long nextchunk) {
  double expected;
  if (tns <= 0 || queued <= 0 || nextchunk <= 0)
    return 0;
  if (left - nextchunk < (long long)places * nextchunk)
    return 0;
  expected = tns * (double)queued;
  return expected < 10.0 * chunkns && (double)elapsed < 2 * expected + chunkns;
}

/*
** The item that a lost worker was running, of its chunk [first, first +
** count) of which 'got' were reported: the item it timed out on if any,
** else the one the shared slot names. Failing those, a suspect it held
** alone ('alone': an item of a chunk lost before without a culprit), even
** if the worker was past running it (sending its result, or garbage).
** 0 otherwise (the worker died between items, or had no chunk).
*/
long long lpar_policy_culprit(long long first, long long count, long long got,
                              long long slotitem, long long timedout,
                              int alone) {
  long long c = timedout ? timedout : slotitem;
  if (count <= 0)
    return 0;
  if (c >= first + got && c < first + count)
    return c;
  if (alone && count - got == 1)
    return first + got;
  return 0;
}

/* Whether an item that failed, and was run again 'tries' times so far,
   is run once more, with 'retries' allowed. */
int lpar_policy_retry(long long tries, int retries) {
  return tries >= 0 && tries < retries;
}

/*
** The time per item learnt from a chunk of 'count' items that took busyns
** in its worker, with tns learnt from 'basis' items before (0: not
** known): the old estimate weighs as its items do, but never more than
** the new chunk's (half and half for chunks alike), so a first guess from
** one item gives way at once to a chunk of many, and a change of pace
** shows in the next chunk.
*/
double lpar_policy_learn(double tns, long long basis, long long busyns,
                         long long count) {
  double per = (double)(busyns > 0 ? busyns : 1) / (double)count;
  double w = (double)(basis > 0 && basis < count ? basis : count);
  if (tns <= 0)
    return per;
  return (tns * w + per * (double)count) / (w + (double)count);
}

/*
** The time per item to size a stream's next chunk by, given a chunk of
** 'count' items out for 'elapsed' ns: once that chunk is overdue (see
** lpar_policy_overdue, with floorns), it will have taken at least elapsed
** / count per item, so it raises the estimate at once, before it reports.
** A chunk merely late (its worker waiting for a processor, more workers
** than cores) leaves tns as it is. Until tns is measured (0), nothing is
** inferred.
*/
double lpar_policy_pace(double tns, long long elapsed, long long count,
                        long long floorns) {
  double least;
  if (tns <= 0 || count <= 0 ||
      elapsed < lpar_policy_overdue(tns, count, floorns))
    return tns;
  least = (double)elapsed / (double)count;
  return least > tns ? least : tns;
}

/*
** How long (ns) a chunk of 'count' items, at tns each, may run before it
** is overdue and asked to end early (a batch of records gives back those
** it has not run, to be spread over the workers): 8 times what it should
** take, and never under floorns, so that a pause of the machine does not
** cut batches that are on time. Items that turn slow after many quick ones
** so do not queue behind each other in a batch sized for quick ones.
*/
long long lpar_policy_overdue(double tns, long long count, long long floorns) {
  double t = 8.0 * tns * (double)(count > 0 ? count : 1);
  if (t > 1e18)
    return (long long)1e18;
  return t > (double)floorns ? (long long)t : floorns;
}
