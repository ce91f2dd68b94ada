"""Python's multiprocessing Pool on lpar's benchmark cases, for
scripts/bench.lua. Prints one JSON object: best and median seconds.
  python3 scripts/bench.py CASE SIZE REPS [ARG]
"""
import json
import multiprocessing as mp
import sys
import time


def double(x):
    return x * 2


def nap(x):
    time.sleep(NAP)
    return x * 2


def spin(x):
    t0 = time.process_time()
    while time.process_time() - t0 < SPIN:
        pass
    return x


def mib(x):
    return b"0123456789abcdef" * (1 << 16)


NAP = SPIN = 0.0


def timed(reps, fn):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[(len(times) - 1) // 2]


def cold(f, items, workers, reps):
    """Whole calls, the pool's start included, as lpar.parallel is timed."""
    def call():
        with mp.Pool(workers) as p:
            p.map(f, items)
    return timed(reps, call)


def warm(f, items, workers, reps):
    """Calls of map on a pool started once (lpar's warm pool cases)."""
    with mp.Pool(workers) as p:
        for _ in range(20):
            p.map(f, items)
        return timed(reps, lambda: p.map(f, items))


def main():
    global NAP, SPIN
    case, size, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    arg = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    items = list(range(1, size + 1))
    if case == "A":
        NAP = arg
        best, med = cold(nap, items, 8, reps)
    elif case == "B":
        best, med = cold(double, items, 8, reps)
    elif case == "C":
        SPIN = arg
        best, med = cold(spin, items, 8, reps)
    elif case == "D":
        best, med = cold(mib, items, 8, reps)
    elif case == "warm":
        best, med = warm(double, items, mp.cpu_count(), reps)
    else:
        raise SystemExit("bench.py: no case " + case)
    print(json.dumps({"best": best, "median": med}))


if __name__ == "__main__":
    main()
