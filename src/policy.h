/*
** policy.h: the scheduling policy. Pure functions of numbers (no Lua, no
** processes, no clock of their own), used by the engine.
*/
#ifndef lpar_policy_h
#define lpar_policy_h

/* What a chunk size depends on. Counts are items; times are ns. */
typedef struct SchedChunk {
  long long fixed; /* chunk size the caller asked for; 0: none */
  long long left;  /* items not handed out yet; -1: unknown (a stream) */
  int places;      /* most workers of the job */
  double tns;      /* time per item; 0 while unknown */
  double minns;    /* a chunk should take at least this long */
  long long probe; /* most items while tns is unknown; 0: no such cap */
  long long max;   /* most items in a chunk; 0: no cap */
} SchedChunk;

long long lpar_policy_chunk(const SchedChunk *s);

/* Chunk for a host whose agent runs 'hostn' workers (s->places counting
   every worker of the job): a worker's chunk for each of them, within
   what is left and s->max. A fixed size is only the least a worker gets:
   on a host, a chunk keeps each worker busy for minns too. */
long long lpar_policy_hostchunk(const SchedChunk *s, int hostn);

/* The work (ns) each worker of a host gets in a chunk: 'floor', or
   LPAR_HOSTRTTS round trips ('rtt' ns, 0: not measured) if that is more
   (up to LPAR_HOSTMAXWORKNS), so that a far host spends little of its
   time waiting. */
#if !defined(LPAR_HOSTRTTS)
#define LPAR_HOSTRTTS 20
#endif
/* ... but no more than this (ns): a chunk is also what a lost host
   takes back */
#if !defined(LPAR_HOSTMAXWORKNS)
#define LPAR_HOSTMAXWORKNS 2e9
#endif
double lpar_policy_hostwork(double floor, long long rtt);

/* Waves of workers started while every worker is on its first item. */
typedef struct SchedWave {
  long long at; /* when the current wave began */
  int cap;      /* workers it may bring up; 0: no wave yet */
} SchedWave;

/* What the decision to start another worker depends on. */
typedef struct SchedSpawn {
  long long now;
  double tns;        /* time per item, measured or estimated; 0: unknown */
  long long left;    /* items not handed out yet (again included); -1:
                        unknown, more may come (a stream) */
  int live;          /* workers running, all busy */
  long long pns;     /* ns the caller spent taking results */
  long long pitems;  /* results those ns were spent on */
  long long worthns; /* work left per worker that is worth a fork */
  long long wavegap; /* ns between waves */
} SchedSpawn;

int lpar_policy_spawn(const SchedSpawn *s, SchedWave *w);
void lpar_policy_started(SchedWave *w, int live, long long now);

double lpar_policy_slotrate(long long elapsed, long long first, long long at);

int lpar_policy_prefetch(double tns, long long queued, long long elapsed,
                         double chunkns, long long left, int places,
                         long long nextchunk);

long long lpar_policy_culprit(long long first, long long count, long long got,
                              long long slotitem, long long timedout,
                              int alone);

int lpar_policy_retry(long long tries, int retries);

double lpar_policy_learn(double tns, long long basis, long long busyns,
                         long long count);

double lpar_policy_pace(double tns, long long elapsed, long long count,
                        long long floorns);

long long lpar_policy_overdue(double tns, long long count, long long floorns);

#endif
