-- Benchmarks of lpar.parallel against a serial loop (and Python's
-- multiprocessing.Pool when python3 is there), measured side by side in
-- one run. Reports times and ratios; passes or fails nothing.
--   lua5.4 scripts/bench.lua [A|B|C|D ...]
local build = os.getenv("LPAR_BUILD") or "build"
package.cpath = build .. "/?.so;" .. package.cpath
local lpar = require "lpar"
local ptime = require "posix.time"
local unistd = require "posix.unistd"

local function now()
  local t = ptime.clock_gettime(ptime.CLOCK_MONOTONIC)
  return t.tv_sec + t.tv_nsec * 1e-9
end

-- Time fn() 'runs' times; returns best and median seconds.
local function timeit(runs, fn)
  local t = {}
  for i = 1, runs do
    collectgarbage()
    local t0 = now()
    fn()
    t[i] = now() - t0
  end
  table.sort(t)
  return t[1], t[(runs + 1) // 2]
end

local function ms(s) return string.format("%9.3f ms", s * 1e3) end

local function python(code)
  local p = io.popen("command -v python3 >/dev/null && python3 -c '" .. code .. "' 2>/dev/null")
  local out = p:read("a")
  p:close()
  return tonumber(out)
end

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local function spin(seconds) -- burn CPU time, not wall time
  local t0 = os.clock()
  while os.clock() - t0 < seconds do end
end

local experiments = {}

experiments.A = function()
  print("A: 10 items, f sleeps 1 s and returns x*2, 8 workers (limit 2.000 s)")
  local items = range(10)
  local f = function(x) unistd.sleep(1) return x * 2 end
  local best, med = timeit(3, function() lpar.parallel(f, items, 8) end)
  print(string.format("  lpar.parallel     best %.4f s  median %.4f s  serial would be 10 s (%.2fx)",
    best, med, 10 / best))
end

experiments.B = function()
  print("B: 10 000 items, f(x) = x*2, 8 workers, whole call")
  local items = range(10000)
  local f = function(x) return x * 2 end
  local r
  local sbest, smed = timeit(50, function()
    r = {}
    for i = 1, #items do r[i] = f(items[i]) end
  end)
  local pbest, pmed = timeit(50, function() lpar.parallel(f, items, 8) end)
  print(string.format("  serial loop   best %s  median %s", ms(sbest), ms(smed)))
  print(string.format("  lpar.parallel best %s  median %s  (%.1fx serial)", ms(pbest), ms(pmed), pmed / smed))
  local py = python([[
import time, multiprocessing as mp
def f(x): return x * 2
if __name__ == "__main__":
    items = list(range(10000)); best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        with mp.Pool(8) as p: p.map(f, items)
        best = min(best, time.perf_counter() - t)
    print(best)
]])
  assert(r[#items] == 2 * #items)
  if py then
    print(string.format("  python Pool.map (8 procs, incl. start) best %s  (lpar is %.1fx faster)",
      ms(py), py / pbest))
  end
end

experiments.C = function()
  print("C: 64 items of ~20 ms CPU each, 8 workers, " .. io.popen("nproc"):read("l") .. " cores")
  local items = range(64)
  local f = function(x) spin(0.02) return x end
  local sbest = timeit(1, function() for i = 1, #items do f(items[i]) end end)
  local pbest, pmed = timeit(3, function() lpar.parallel(f, items, 8) end)
  print(string.format("  serial loop   %.3f s", sbest))
  print(string.format("  lpar.parallel best %.3f s  median %.3f s  speed-up %.2fx (median %.2fx)",
    pbest, pmed, sbest / pbest, sbest / pmed))
end

experiments.D = function()
  print("D: 100 results of 1 MB strings into the caller")
  local items = range(100)
  local block = string.rep("0123456789abcdef", 4) -- 64 bytes
  local f = function(x) return string.rep(block, 1 << 14, x % 2 == 0 and "" or nil) end
  local sbest = timeit(5, function() for i = 1, #items do f(items[i]) end end)
  local pbest, pmed = timeit(5, function() lpar.parallel(f, items, 8) end)
  local mb = 100 * (1 << 20) / 1e9
  print(string.format("  serial loop making them  best %s", ms(sbest)))
  print(string.format("  lpar.parallel best %s  median %s  -> %.2f GB/s (median %.2f GB/s)",
    ms(pbest), ms(pmed), mb / pbest, mb / pmed))
end

local which = {...}
if #which == 0 then which = {"A", "B", "C", "D"} end
print(lpar._VERSION .. " on " .. io.popen("uname -srm"):read("l"))
for _, name in ipairs(which) do
  assert(experiments[name], "no experiment " .. name)()
end
