/*
** policy_test.c: unit tests of the scheduling policy (src/policy.c), with
** synthetic clocks and counts. Run by ctest as 'policy_test'.
*/
#include <stdio.h>

#include "policy.h"
#include "ranges.h"

static int passed, failed;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond)                                                                  \
      passed++;                                                                \
    else {                                                                     \
      failed++;                                                                \
      fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);       \
    }                                                                          \
  } while (0)

#define MS 1000000LL

static SchedChunk chunkof(long long left, int places, double tns) {
  SchedChunk s = {0};
  s.left = left;
  s.places = places;
  s.tns = tns;
  s.minns = 250000;
  return s;
}

static void test_chunk(void) {
  SchedChunk s = chunkof(1000, 8, 0);
  /* guided self-scheduling: a share of what is left, rounded up */
  CHECK(lpar_policy_chunk(&s) == 63);
  s.left = 16;
  CHECK(lpar_policy_chunk(&s) == 1);
  s.left = 17;
  CHECK(lpar_policy_chunk(&s) == 2);
  s.left = 0;
  CHECK(lpar_policy_chunk(&s) == 1);
  /* a fixed size is kept, but for the cap */
  s = chunkof(1000, 8, 5000);
  s.fixed = 7;
  CHECK(lpar_policy_chunk(&s) == 7);
  s.fixed = 5000;
  s.max = 4096;
  CHECK(lpar_policy_chunk(&s) == 4096);
  /* raised to minns of work once the time per item is known */
  s = chunkof(100, 2, 1000);
  CHECK(lpar_policy_chunk(&s) == 250);
  s.tns = 1e6; /* slow items: the share stands */
  CHECK(lpar_policy_chunk(&s) == 25);
  /* until it is known, at most 'probe' items */
  s = chunkof(100000, 2, 0);
  s.probe = 256;
  CHECK(lpar_policy_chunk(&s) == 256);
  s.tns = 10;
  CHECK(lpar_policy_chunk(&s) == 25000);
  /* a stream: by time alone, within max */
  s = chunkof(-1, 8, 0);
  CHECK(lpar_policy_chunk(&s) == 1);
  s.tns = 100;
  s.minns = 4 * 250000;
  CHECK(lpar_policy_chunk(&s) == 10000);
  s.max = 4096;
  CHECK(lpar_policy_chunk(&s) == 4096);
  /* absurdly quick items do not overflow */
  s = chunkof(10, 1, 1e-12);
  CHECK(lpar_policy_chunk(&s) == 1000000000000000LL);
  s.places = 0; /* never divides by zero */
  s.tns = 0;
  CHECK(lpar_policy_chunk(&s) == 5);
}

static SchedSpawn spawnat(long long now, int live) {
  SchedSpawn s = {0};
  s.now = now;
  s.live = live;
  s.left = 1000;
  s.worthns = 2 * MS;
  s.wavegap = 1 * MS;
  return s;
}

static void test_waves(void) {
  SchedWave w = {0, 0};
  SchedSpawn s;
  lpar_policy_started(&w, 1, 10 * MS); /* the first worker opens wave 1 */
  CHECK(w.at == 10 * MS && w.cap == 1);
  lpar_policy_started(&w, 2, 11 * MS); /* later ones do not */
  CHECK(w.at == 10 * MS && w.cap == 1);
  s = spawnat(10 * MS + MS / 2, 1); /* half a gap later: wait */
  CHECK(lpar_policy_spawn(&s, &w) == 1);
  s = spawnat(10 * MS + MS / 10, 1);
  CHECK(lpar_policy_spawn(&s, &w) == 1);
  s = spawnat(11 * MS, 1); /* a gap later: wave 2 brings up to 2 */
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  CHECK(w.at == 11 * MS && w.cap == 2);
  s = spawnat(11 * MS, 2); /* wave 2 is full: wait for wave 3 */
  CHECK(lpar_policy_spawn(&s, &w) == 1);
  s = spawnat(12 * MS, 2);
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  CHECK(w.cap == 4);
  s = spawnat(12 * MS, 3); /* within wave 3 */
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  CHECK(w.cap == 4 && w.at == 12 * MS);
  s = spawnat(12 * MS, 4);
  CHECK(lpar_policy_spawn(&s, &w) == 1);
  s = spawnat(15 * MS, 4);
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  CHECK(w.cap == 8);
}

static void test_spawn_known(void) {
  SchedWave w = {0, 1};
  SchedSpawn s = spawnat(0, 4);
  s.tns = 1 * MS;
  s.left = 10; /* 10 ms left, 2 ms a worker would be 8 */
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  s.live = 5; /* 10 ms is not more than 5 x 2 ms */
  CHECK(lpar_policy_spawn(&s, &w) == -1);
  s.left = -1; /* a stream that may bring more */
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  /* the caller is the bottleneck: 0.3 ms a result x 4 workers >= 1 ms */
  s.live = 4;
  s.pns = 3 * MS;
  s.pitems = 10;
  s.left = 100000;
  CHECK(lpar_policy_spawn(&s, &w) == -1);
  s.live = 3; /* 0.9 ms < 1 ms: one more still helps */
  CHECK(lpar_policy_spawn(&s, &w) == 0);
  /* a known time per item ignores the waves */
  CHECK(w.cap == 1 && w.at == 0);
}

static void test_slotrate(void) {
  CHECK(lpar_policy_slotrate(5 * MS, 10, 10) == 0);
  CHECK(lpar_policy_slotrate(5 * MS, 10, 9) == 0);
  CHECK(lpar_policy_slotrate(5 * MS, 10, 15) == 1.0 * MS);
}

static void test_prefetch(void) {
  const double chunkns = 100000;
  /* quick items, plenty left: queue a second chunk */
  CHECK(lpar_policy_prefetch(1000, 50, 20000, chunkns, 10000, 2, 50) == 1);
  /* unknown time per item, or nothing queued */
  CHECK(lpar_policy_prefetch(0, 50, 0, chunkns, 10000, 2, 50) == 0);
  CHECK(lpar_policy_prefetch(1000, 0, 0, chunkns, 10000, 2, 50) == 0);
  /* a chunk expected to take 10 chunkns or more */
  CHECK(lpar_policy_prefetch(20000, 50, 0, chunkns, 10000, 2, 50) == 0);
  /* a late chunk: its item may be slow */
  CHECK(lpar_policy_prefetch(1000, 50, 200001, chunkns, 10000, 2, 50) == 0);
  CHECK(lpar_policy_prefetch(1000, 50, 199999, chunkns, 10000, 2, 50) == 1);
  /* a job's last chunks: 4 items, 2 workers, items 1 and 2 out, 1 at a
     time. Item 3 queued behind item 1 would wait out a slow item 1 while
     the other worker could run it. */
  CHECK(lpar_policy_prefetch(1000, 1, 0, chunkns, 2, 2, 1) == 0);
  CHECK(lpar_policy_prefetch(1000, 1, 0, chunkns, 3, 2, 1) == 1);
  CHECK(lpar_policy_prefetch(1000, 10, 0, chunkns, 29, 2, 10) == 0);
  CHECK(lpar_policy_prefetch(1000, 10, 0, chunkns, 30, 2, 10) == 1);
}

static void test_culprit(void) {
  /* chunk [10, 20), 3 reported: items 13..19 were not */
  CHECK(lpar_policy_culprit(10, 10, 3, 15, 0, 0) == 15);
  CHECK(lpar_policy_culprit(10, 10, 3, 13, 0, 0) == 13);
  CHECK(lpar_policy_culprit(10, 10, 3, 12, 0, 0) == 0);   /* already reported */
  CHECK(lpar_policy_culprit(10, 10, 3, 20, 0, 0) == 0);   /* past the chunk */
  CHECK(lpar_policy_culprit(10, 10, 3, 0, 0, 0) == 0);    /* between items */
  CHECK(lpar_policy_culprit(10, 10, 3, 15, 17, 0) == 17); /* timed out on 17 */
  CHECK(lpar_policy_culprit(10, 0, 0, 10, 0, 0) == 0);    /* no chunk */
  /* a suspect held alone is the culprit once nothing else names one */
  CHECK(lpar_policy_culprit(7, 1, 0, 0, 0, 1) == 7);
  CHECK(lpar_policy_culprit(7, 1, 0, 0, 0, 0) == 0);
  CHECK(lpar_policy_culprit(7, 1, 1, 0, 0, 1) == 0); /* it was reported */
  CHECK(lpar_policy_culprit(7, 1, 0, 7, 0, 1) == 7);
}

static void test_retry(void) {
  CHECK(lpar_policy_retry(0, 0) == 0);
  CHECK(lpar_policy_retry(0, 2) == 1);
  CHECK(lpar_policy_retry(1, 2) == 1);
  CHECK(lpar_policy_retry(2, 2) == 0);
  CHECK(lpar_policy_retry(-1, 2) == 0);
}

/* Items of a chunk lost without a culprit go back as suspects, taken one
   at a time; others are taken as chunks. */
static void test_suspects(void) {
  Ranges q = {0};
  long long first;
  int alone;
  CHECK(lpar_ranges_requeue(&q, 20, 30, 0, 1) == 0);
  CHECK(lpar_ranges_take(&q, 5, &first, &alone) == 1);
  CHECK(first == 20 && alone == 1);
  CHECK(lpar_ranges_take(&q, 5, &first, &alone) == 1);
  CHECK(first == 21 && alone == 1);
  CHECK(q.items == 8);
  /* with a culprit, the rest goes back as a chunk, without it */
  CHECK(lpar_ranges_requeue(&q, 40, 50, 44, 1) == 0);
  CHECK(lpar_ranges_take(&q, 100, &first, &alone) == 4);
  CHECK(first == 40 && alone == 0);
  CHECK(lpar_ranges_take(&q, 100, &first, &alone) == 5);
  CHECK(first == 45 && alone == 0);
  CHECK(lpar_ranges_take(&q, 100, &first, &alone) == 1);
  CHECK(first == 22 && alone == 1);
  lpar_ranges_free(&q);
}

static void test_learn(void) {
  double t = lpar_policy_learn(0, 0, 1000, 10);
  CHECK(t == 100);
  t = lpar_policy_learn(t, 10, 3000, 10); /* chunks alike: half and half */
  CHECK(t == 200);
  CHECK(lpar_policy_learn(0, 0, 0, 4) == 0.25); /* never 0: 0 means unknown */
  /* a remembered estimate (basis unknown) weighs as the new chunk */
  CHECK(lpar_policy_learn(100, 0, 3000, 10) == 200);
  /* a first guess from one slow item gives way to a chunk of many */
  t = lpar_policy_learn(20000, 1, 50 * 300, 50);
  CHECK(t > 680 && t < 690);
  /* one slow item after many quick ones: half and half, at once */
  CHECK(lpar_policy_learn(300, 4096, 1000300, 1) == 500300);
}

static void test_pace(void) {
  /* unknown stays unknown: a chunk just sent proves nothing */
  CHECK(lpar_policy_pace(0, 500 * MS, 10, 50 * MS) == 0);
  /* a chunk on time leaves the estimate */
  CHECK(lpar_policy_pace(1000, 5000, 10, 50 * MS) == 1000);
  /* so does one merely late (its worker waits for a processor) */
  CHECK(lpar_policy_pace(1000, 40 * MS, 10, 50 * MS) == 1000);
  /* one overdue raises it at once */
  CHECK(lpar_policy_pace(1000, 100 * MS, 10, 50 * MS) == 10 * MS);
  /* overdue is 8 times its time when that is over the floor */
  CHECK(lpar_policy_pace(1 * MS, 70 * MS, 10, 50 * MS) == 1 * MS);
  CHECK(lpar_policy_pace(1 * MS, 90 * MS, 10, 50 * MS) == 9 * MS);
  CHECK(lpar_policy_pace(1000, 100 * MS, 0, 50 * MS) == 1000);
}

/* The CLI's batches: a stream of records sized as the engine of a call
   sizes a stream's chunks (4 x 250 us of work, at most 4096). */
static SchedChunk batchof(double tns, long long fixed) {
  SchedChunk s = chunkof(-1, 2, tns);
  s.minns = 4 * 250000;
  s.fixed = fixed;
  s.max = fixed > 0 ? 0 : 4096;
  return s;
}

static void test_batches(void) {
  SchedChunk s = batchof(0, 0);
  /* one record until the time per record is known */
  CHECK(lpar_policy_chunk(&s) == 1);
  /* then about a millisecond of records, at most 4096 */
  s = batchof(1000, 0);
  CHECK(lpar_policy_chunk(&s) == 1000);
  s = batchof(50, 0);
  CHECK(lpar_policy_chunk(&s) == 4096);
  s = batchof(1e9, 0); /* slow records go one at a time */
  CHECK(lpar_policy_chunk(&s) == 1);
  /* --chunk N: N records, uncapped (the reader cuts at 64 KiB) */
  s = batchof(1000, 7);
  CHECK(lpar_policy_chunk(&s) == 7);
  s = batchof(50, 100000);
  CHECK(lpar_policy_chunk(&s) == 100000);
  /* the time per record learnt from a batch's busy time and records */
  CHECK(lpar_policy_learn(0, 0, 1 * MS, 1000) == 1000);
  /* a batch of 20 quick records (50 us each), out for 100 ms: one of them
     is slow; the batches cut meanwhile hold one record each */
  s = batchof(lpar_policy_pace(50000, 100 * MS, 20, 50 * MS), 0);
  CHECK(lpar_policy_chunk(&s) == 1);
  /* out for 10 ms (20 x 50 us, late but not overdue): as they were */
  s = batchof(lpar_policy_pace(50000, 10 * MS, 20, 50 * MS), 0);
  CHECK(lpar_policy_chunk(&s) == 20);
}

static void test_overdue(void) {
  /* a batch of 1000 records of 1 us: overdue after the floor (50 ms),
     not after 8 ms, so that a pause does not cut it */
  CHECK(lpar_policy_overdue(1000, 1000, 50 * MS) == 50 * MS);
  /* 100 records of 1 ms: after 8 times their time */
  CHECK(lpar_policy_overdue(1e6, 100, 50 * MS) == 800 * MS);
  /* unknown time (the first batches): the floor */
  CHECK(lpar_policy_overdue(0, 7, 50 * MS) == 50 * MS);
  CHECK(lpar_policy_overdue(1e6, 0, 0) == 8 * MS);
  CHECK(lpar_policy_overdue(1e30, 1000, 0) == (long long)1e18);
}

static void test_hostchunk(void) {
  SchedChunk s = {0};
  /* 90 left over 3 workers: a worker's share is 15; a host of 2 takes 30 */
  s.left = 90;
  s.places = 3;
  CHECK(lpar_policy_chunk(&s) == 15);
  CHECK(lpar_policy_hostchunk(&s, 2) == 30);
  CHECK(lpar_policy_hostchunk(&s, 1) == 15);
  CHECK(lpar_policy_hostchunk(&s, 0) == 15);
  /* never more than is left */
  s.left = 3;
  CHECK(lpar_policy_hostchunk(&s, 8) == 3);
  /* a stream with a known time per item: 50 ms of work per worker */
  s.left = -1;
  s.tns = 1e6;
  s.minns = 5e7;
  CHECK(lpar_policy_hostchunk(&s, 4) == 200);
  s.max = 150;
  CHECK(lpar_policy_hostchunk(&s, 4) == 150);
  /* a fixed size is per worker, and the least a worker gets */
  s.max = 0;
  s.fixed = 7;
  s.tns = 0;
  CHECK(lpar_policy_hostchunk(&s, 3) == 21);
  s.tns = 1e6; /* 50 ms of 1 ms items: 50 */
  CHECK(lpar_policy_hostchunk(&s, 3) == 150);
  s.fixed = 80;
  CHECK(lpar_policy_hostchunk(&s, 3) == 240);
}

static void test_hostwork(void) {
  CHECK(lpar_policy_hostwork(5e7, 0) == 5e7);          /* not measured */
  CHECK(lpar_policy_hostwork(5e7, 200000) == 5e7);     /* 0.2 ms: loopback */
  CHECK(lpar_policy_hostwork(5e7, 10000000) == 2e8);   /* 10 ms: 20 of them */
  CHECK(lpar_policy_hostwork(5e7, 1000000000) == 2e9); /* 1 s: capped */
}

int main(void) {
  test_chunk();
  test_hostchunk();
  test_hostwork();
  test_waves();
  test_spawn_known();
  test_slotrate();
  test_prefetch();
  test_culprit();
  test_retry();
  test_suspects();
  test_learn();
  test_pace();
  test_batches();
  test_overdue();
  printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}
