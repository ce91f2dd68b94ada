/*
** ranges.h: a stack of item index ranges waiting to be handed out again
** (the rest of a dead worker's chunk, an item to retry), for the
** engine's jobs; plain C.
*/
#ifndef lpar_ranges_h
#define lpar_ranges_h

#include <errno.h>
#include <stdlib.h>

typedef struct Range {
  long long first, count;
  int alone; /* suspects: each item is handed out alone */
} Range;

typedef struct Ranges {
  Range *r;
  int n, cap;
  long long items; /* items in all ranges */
} Ranges;

/* Push [first, first + count), its items to be handed out alone if
   'alone'; 0 or -ENOMEM. Empty ranges are ignored. */
static inline int lpar_ranges_push(Ranges *q, long long first, long long count,
                                   int alone) {
  if (count <= 0)
    return 0;
  if (q->n == q->cap) {
    int cap = q->cap ? 2 * q->cap : 8;
    Range *r = realloc(q->r, (size_t)cap * sizeof(Range));
    if (r == NULL)
      return -ENOMEM;
    q->r = r;
    q->cap = cap;
  }
  q->r[q->n].first = first;
  q->r[q->n].count = count;
  q->r[q->n].alone = alone;
  q->n++;
  q->items += count;
  return 0;
}

static inline int lpar_ranges_add(Ranges *q, long long first, long long count) {
  return lpar_ranges_push(q, first, count, 0);
}

/* Take up to 'max' items (>= 1) from the last range, only one if it holds
   suspects (*alone is set then): returns how many, the first in *first;
   0 when empty. */
static inline long long lpar_ranges_take(Ranges *q, long long max,
                                         long long *first, int *alone) {
  Range *g;
  long long count;
  if (q->n == 0)
    return 0;
  g = &q->r[q->n - 1];
  *alone = g->alone;
  if (g->alone)
    max = 1;
  count = max < g->count ? max : g->count;
  *first = g->first;
  g->first += count;
  g->count -= count;
  if (g->count == 0)
    q->n--;
  q->items -= count;
  return count;
}

/*
** The rest [from, end) of a dead worker's chunk goes back, but for the
** item that killed it ('culprit', 0 if none). When nothing names the
** culprit and 'suspect' is set, the items go back as suspects, to be
** handed out one at a time: a worker lost again while it holds one of
** them alone is lost to that item (lpar_policy_culprit). 0 or -ENOMEM.
*/
static inline int lpar_ranges_requeue(Ranges *q, long long from, long long end,
                                      long long culprit, int suspect) {
  if (culprit == 0)
    return lpar_ranges_push(q, from, end - from, suspect);
  if (lpar_ranges_add(q, culprit + 1, end - culprit - 1) != 0)
    return -ENOMEM;
  return lpar_ranges_add(q, from, culprit - from);
}

static inline void lpar_ranges_free(Ranges *q) {
  free(q->r);
  q->r = NULL;
  q->n = q->cap = 0;
  q->items = 0;
}

#endif
