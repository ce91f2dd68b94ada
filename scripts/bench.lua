-- Benchmarks of lpar side by side, in one run, with a serial loop, GNU
-- parallel, xargs -P and Python's multiprocessing Pool, on one or more
-- Luas; every figure, with its floor, goes to one results file
-- (docs/benchmarks.md). Reports only.
--   lua5.4 scripts/bench.lua [--tiny] [--out FILE] [--lua V=DIR ...] [CASE ...]
-- CASE is one of A B C D pool8 poolB cli10k cli1m clicpu (default: all).
-- --tiny runs every case on a few items (a check that the bench works).
-- --lua V=DIR measures lpar built for Lua V (5.1, 5.2, 5.3, 5.4 or luajit)
-- in DIR, against that Lua's own serial loop and floors; given more than
-- once, every case runs on each Lua in turn, the first Lua's figures make
-- the main table and its peers run on it alone (default: 5.4=$LPAR_BUILD,
-- or 5.4=build).
-- The cases in the caller (A-D, the pools) run in a child process of the
-- Lua they measure:
--   INTERP scripts/bench.lua --child CASE [--tiny] [--peers]
-- with LPAR_BUILD naming its build; it prints the case's record as JSON.
-- This file runs on every Lua lpar serves: no integer-only operators.
local cjson = require "cjson"
local ptime = require "posix.time"
local unistd = require "posix.unistd"
local wait = require "posix.sys.wait"

local tiny, out, child, peers, only, luas = false, nil, nil, false, {}, {}
do
  local args, i = {...}, 1
  while args[i] do
    if args[i] == "--tiny" then
      tiny = true
    elseif args[i] == "--out" then
      i = i + 1
      out = assert(args[i], "--out needs a file")
    elseif args[i] == "--child" then
      i = i + 1
      child = assert(args[i], "--child needs a case")
    elseif args[i] == "--peers" then
      peers = true
    elseif args[i] == "--lua" then
      i = i + 1
      local v, dir = (args[i] or ""):match("^([^=]+)=(.+)$")
      assert(v, "--lua needs V=DIR (a Lua and the build of lpar for it)")
      luas[#luas + 1] = {v = v, build = dir, interp = v == "luajit" and "luajit" or "lua" .. v}
    else
      only[#only + 1] = args[i]
    end
    i = i + 1
  end
  if #luas == 0 then luas[1] = {v = "5.4", build = os.getenv("LPAR_BUILD") or "build", interp = "lua5.4"} end
end

-- Sizes of every case, full and tiny.
local N = tiny and {
  A = 3, Asleep = 0.05, B = 1000, Breps = 5, C = 8, Cspin = 0.005, D = 10, pool8 = 100, poolB = 1000,
  poolBreps = 10, cli10k = 200, cli1m = 20000, clicpu = 8, clicpu_s = 0.005, reps = 1, pyreps = 1,
} or {
  A = 10, Asleep = 1, B = 10000, Breps = 50, C = 64, Cspin = 0.02, D = 100, pool8 = 5000, poolB = 10000,
  poolBreps = 300, cli10k = 10000, cli1m = 1000000, clicpu = 64, clicpu_s = 0.02, reps = 3, pyreps = 5,
}

local function now()
  local t = ptime.clock_gettime(ptime.CLOCK_MONOTONIC)
  return t.tv_sec + t.tv_nsec * 1e-9
end

local function readl(cmd)
  local p = io.popen(cmd)
  local s = p:read("*a")
  p:close()
  return (s:gsub("%s+$", ""))
end

-- Whether a shell command succeeded (os.execute says so as 5.1 or as 5.2+).
local function shell(cmd)
  local r = os.execute(cmd)
  return r == true or r == 0
end

local cores = tonumber(readl("nproc"))

local function mid(n) return math.floor((n + 1) / 2) end

-- Best and median seconds of 'reps' calls of fn.
local function timeit(reps, fn)
  local t = {}
  for i = 1, reps do
    collectgarbage()
    local t0 = now()
    fn()
    t[i] = now() - t0
  end
  table.sort(t)
  return {best = t[1], median = t[mid(reps)], runs = reps}
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

local function fmt(s)
  if s < 1e-3 then return string.format("%.1f us", s * 1e6) end
  if s < 1 then return string.format("%.2f ms", s * 1e3) end
  return string.format("%.3f s", s)
end

local function writefile(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

local have = {}
for _, tool in ipairs({"parallel", "xargs", "python3"}) do
  have[tool] = shell("command -v " .. tool .. " >/dev/null 2>&1")
end

-- Python's Pool on a case: {best, median}, or nil without python3 (or
-- where the peers run on another Lua).
local function python(case, size, reps, arg)
  if not have.python3 or not peers then return nil end
  local s = readl(string.format("python3 scripts/bench.py %s %d %d %s 2>/dev/null", case, size, reps, arg or ""))
  local ok, r = pcall(cjson.decode, s)
  if not ok or type(r) ~= "table" then return nil end
  r.runs = reps
  return r
end

-- One fork, _exit in the child and waitpid in the parent: the least any
-- forking call pays on top of the serial loop.
local function forkcost()
  return timeit(tiny and 5 or 50, function()
    local pid = unistd.fork()
    if pid == 0 then unistd._exit(0) end
    wait.wait(pid)
  end)
end

-- Each case returns a record: what it measured (title), the serial time,
-- the floor (and what it is), the tools' times, the target, notes. The
-- cases in the caller run in the child (lpar, the module of the Lua it
-- runs on); the CLI cases run in the driver, given the Lua to measure.
local cases, order, incaller = {}, {}, {}
local function case(id, fn, caller)
  cases[id] = fn
  order[#order + 1] = id
  incaller[id] = caller
end

-- ---- the module, in the caller (the child) ----
local lpar
local function callercase(id, fn)
  case(id, function(...)
    if not lpar then
      package.cpath = (os.getenv("LPAR_BUILD") or "build") .. "/?.so;" .. package.cpath
      lpar = require "lpar"
    end
    return fn(...)
  end, true)
end

callercase("A", function()
  local n, s = N.A, N.Asleep
  local f = function(x) ptime.nanosleep({tv_sec = math.floor(s), tv_nsec = math.floor(s % 1 * 1e9)}) return x * 2 end
  local one = timeit(1, function() f(1) end).best
  local items = range(n)
  local r = {lpar = timeit(N.reps, function() lpar.parallel(f, items, 8) end)}
  r.python = python("A", n, 1, s)
  return {
    title = string.format("A: %d x sleep %g s, 8 workers", n, s), label = "A sleep",
    serial = n * one, serial_is = string.format("%d x the time of one item", n),
    floor = math.ceil(n / 8) * one, floor_is = "the sleeps of the busiest worker",
    tools = r, target = {stat = "best", max = n == 10 and 2.005 or nil},
  }
end)

callercase("B", function()
  local items = range(N.B)
  local f = function(x) return x * 2 end
  local serial = timeit(N.Breps, function()
    local r = {}
    for i = 1, #items do r[i] = f(items[i]) end
    return r
  end)
  local fork = forkcost()
  local r = {lpar = timeit(N.Breps, function() lpar.parallel(f, items, 8) end)}
  r.python = python("B", N.B, N.pyreps)
  return {
    title = string.format("B: %d x `x*2`, 8 workers, whole call", N.B), label = "B x*2",
    serial = serial.best, serial_is = "a loop in the caller",
    floor = serial.best + fork.best, floor_is = "the serial loop plus one fork, _exit and waitpid",
    tools = r, target = {stat = "best", max = 1.5e-3},
  }
end)

callercase("C", function()
  local items = range(N.C)
  local f = function(x) spin(N.Cspin) return x end
  local serial = timeit(1, function() for i = 1, #items do f(items[i]) end end)
  local r = {lpar = timeit(N.reps, function() lpar.parallel(f, items, 8) end)}
  r.python = python("C", N.C, math.min(N.reps, 3), N.Cspin)
  return {
    title = string.format("C: %d x %g ms CPU, 8 workers", N.C, N.Cspin * 1e3), label = "C CPU",
    serial = serial.best, serial_is = "a loop in the caller",
    floor = serial.best / math.min(cores, 8), floor_is = string.format("the serial loop over %d cores",
      math.min(cores, 8)),
    tools = r, target = {stat = "best", speedup = 1.95},
  }
end)

callercase("D", function()
  local items = range(N.D)
  -- a string of its own per item (LuaJIT interns strings: equal results
  -- would be one string in the caller); 64-byte blocks ending in the item
  local block = string.rep("0123456789abcdef", 4):sub(9)
  local f = function(x) return string.rep(block .. string.format("%08d", x), 16384) end
  local serial = timeit(5, function()
    local r = {}
    for i = 1, #items do r[i] = f(items[i]) end
    return r
  end)
  local r = {lpar = timeit(5, function() lpar.parallel(f, items, 8) end)}
  r.python = python("D", N.D, math.min(N.reps, 3))
  return {
    title = string.format("D: %d results of 1 MiB strings into the caller", N.D), label = "D 1 MiB",
    serial = serial.best, serial_is = "the caller making the same strings",
    floor = serial.best, floor_is = "the caller making the same strings itself",
    bytes = N.D * 1048576, tools = r, target = {stat = "best", rate = 1.3e9},
  }
end)

local function poolcase(n, reps, label, title, target)
  local items = range(n)
  local double = function(x) return x * 2 end
  local pool = lpar.pool()
  local ok, rec = pcall(function()
    local serial = timeit(reps, function()
      local r = {}
      for i = 1, #items do r[i] = double(items[i]) end
      return r
    end)
    for _ = 1, 20 do pool:map(double, items) end
    local r = {lpar = timeit(reps, function() pool:map(double, items) end)}
    assert(pool:map(double, items)[n] == 2 * n)
    r.python = python("warm", n, math.max(math.floor(reps / 10), 5))
    return {
      title = title .. string.format(" (a warm pool of %d workers)", pool:size()), label = label,
      serial = serial.median, serial_is = "a loop in the caller (median)",
      floor = serial.median, floor_is = "the serial loop (a warm pool forks nothing)",
      tools = r, target = {stat = "median", max = target},
    }
  end)
  pool:close()
  if not ok then error(rec, 0) end
  return rec
end

callercase("pool8", function() return poolcase(8, N.pool8, "pool 8", "pool:map of 8 trivial items", 70e-6) end)
callercase("poolB", function()
  return poolcase(N.poolB, N.poolBreps, "pool x*2", string.format("pool:map of %d x `x*2`", N.poolB), 0.7e-3)
end)

if child then
  local fn = cases[child]
  if not fn or not incaller[child] then error("bench: --child takes a case in the caller, not " .. child, 0) end
  local c = fn()
  c.lua = lpar._LUA
  print(cjson.encode(c))
  return
end

-- ---- the CLI, in the driver ----
local tmp = readl("mktemp -d /tmp/lpar-bench-XXXXXX")
local function cleanup() os.execute("rm -rf '" .. tmp .. "'") end

-- Runs a shell command once with its output to a file; returns wall
-- seconds and the peak RSS (KB) of its largest process.
local function command(cmd, name)
  local t0 = now()
  local ok = shell(string.format("/usr/bin/time -o %s/time -f %%M sh -c '%s' >%s/out.%s 2>%s/err",
    tmp, cmd:gsub("'", "'\\''"), tmp, name, tmp))
  local secs = now() - t0
  assert(ok, "bench: failed: " .. cmd .. "\n" .. readl("cat " .. tmp .. "/err"))
  return secs, tonumber(readl("tail -n 1 " .. tmp .. "/time"))
end

-- Runs commands alternately 'reps' times (so that a slow spell of the
-- machine hits them alike); returns for each name {best, median, rss}.
local function alternate(reps, cmds)
  local times, res = {}, {}
  for _ = 1, reps do
    for _, c in ipairs(cmds) do
      local secs, rss = command(c[2], c[1])
      times[c[1]] = times[c[1]] or {}
      table.insert(times[c[1]], secs)
      res[c[1]] = res[c[1]] or {rss = rss}
      res[c[1]].rss = math.max(res[c[1]].rss, rss or 0)
    end
  end
  for name, t in pairs(times) do
    table.sort(t)
    res[name].best, res[name].median, res[name].runs = t[1], t[mid(#t)], #t
  end
  return res
end

-- Warns when two commands' outputs differ.
local function same(a, b)
  if not shell(string.format("cmp -s %s/out.%s %s/out.%s", tmp, a, tmp, b)) then
    print(string.format("  (warning: the output of %s differs from %s's)", a, b))
  end
end

-- The loop's output on each Lua is kept as out.loop-V, and compared with
-- the first Lua's: the workloads mean the same on every Lua.
local function sameloop(L)
  os.execute(string.format("cp %s/out.loop %s/out.loop-%s", tmp, tmp, L.v))
  if L ~= luas[1] then same("loop-" .. L.v, "loop-" .. luas[1].v) end
end

local made = false
local function clifiles()
  if made then return end
  made = true
  os.execute(string.format("seq %d >%s/10k.txt", N.cli10k, tmp))
  writefile(tmp .. "/1m.lua", string.format(
    'for i = 1, %d do print(("%%d lorem ipsum %%x"):format(i, i * 7919)) end\n', N.cli1m))
  os.execute(string.format("%s %s/1m.lua >%s/1m.txt", luas[1].interp, tmp, tmp))
  writefile(tmp .. "/x2.lua", "return function(x) return x * 2 end\n")
  writefile(tmp .. "/x2cmd.lua", "print(arg[1] * 2)\n")
  -- integers below 2^53 throughout, so that every Lua computes the same
  writefile(tmp .. "/upper.lua", [[
-- s:upper() and a small hash of it (31-multiplier, 32 bits)
return function(s)
  local u, h = s:upper(), 0
  for i = 1, #u do h = (h * 31 + u:byte(i)) % 4294967296 end
  return u .. "\t" .. h
end
]])
  -- the single-process reference: the same function over the same file
  writefile(tmp .. "/loop.lua", [[
local f, out = dofile(arg[1]), io.stdout
local lines = arg[2] and io.lines(arg[2]) or io.lines()
for l in lines do
  local v = f(l)
  if v ~= nil then out:write(tostring(v), "\n") end
end
]])
  writefile(tmp .. "/cpu.lua", [[
return function(n)
  local x = 0
  for i = 1, tonumber(n) do x = (x * 69069 + i) % 4294967296 end
  return x
end
]])
  writefile(tmp .. "/cpucmd.lua", "print(dofile(arg[1])(arg[2]))\n")
end

-- The single loop and lpar, alternately.
local function pair(reps, loopcmd, lparcmd)
  clifiles()
  return alternate(reps, {{"loop", loopcmd}, {"lpar", lparcmd}})
end

case("cli10k", function(L)
  local t = string.format("%s/x2.lua %s/10k.txt", tmp, tmp)
  local r = pair(tiny and 1 or 10, L.interp .. " " .. tmp .. "/loop.lua " .. t, L.lpar .. " " .. t)
  same("lpar", "loop")
  sameloop(L)
  local tools = {lpar = r.lpar}
  if L.peers then
    tools.xargs = alternate(1, {{"xargs",
      string.format("xargs -P8 -n1 %s %s/x2cmd.lua <%s/10k.txt", L.interp, tmp, tmp)}}).xargs
    if have.parallel then
      tools.parallel = alternate(1, {{"gnu", string.format("parallel --will-cite -j8 -k %s %s/x2cmd.lua <%s/10k.txt",
        L.interp, tmp, tmp)}}).gnu
      same("gnu", "loop")
    end
  end
  return {
    title = string.format("CLI: %d trivial lines (`x*2`), -j8", N.cli10k), label = "CLI 10k",
    serial = r.loop.best, serial_is = "one " .. L.interp .. " loop over the file",
    floor = r.loop.best, floor_is = "the single loop", tools = tools, target = {stat = "best", ratio = 2},
  }
end)

case("cli1m", function(L)
  -- the loop, lpar and GNU parallel's --pipepart (each of its two jobs
  -- runs the same loop on half the file), interleaved; medians
  clifiles()
  local t = string.format("%s/upper.lua %s/1m.txt", tmp, tmp)
  local cmds = {{"loop", L.interp .. " " .. tmp .. "/loop.lua " .. t}, {"lpar", L.lpar .. " -j2 " .. t}}
  if have.parallel and L.peers then
    cmds[3] = {"gnu", string.format("parallel --will-cite --pipepart -a %s/1m.txt -k -j2 --block -1 " ..
      "%s %s/loop.lua %s/upper.lua", tmp, L.interp, tmp, tmp)}
  end
  local r = alternate(tiny and 1 or 5, cmds)
  same("lpar", "loop")
  sameloop(L)
  local tools = {lpar = r.lpar}
  if r.gnu then
    tools.parallel = r.gnu
    same("gnu", "loop")
  end
  return {
    title = string.format("CLI: %d lines of a file, `s:upper()` and a hash, -j2", N.cli1m), label = "CLI 1M",
    serial = r.loop.median, serial_is = "one " .. L.interp .. " loop over the file (median)",
    floor = r.loop.median / math.min(cores, 2), floor_is = string.format("the single loop over %d cores",
      math.min(cores, 2)),
    tools = tools, target = {stat = "median", ratio = 0.55, ahead = "parallel", rss = 16 * 1024},
  }
end)

-- The CPU case's item: a number of steps that takes about clicpu_s on the
-- first Lua, measured once; every Lua does the same steps.
local cpusteps
case("clicpu", function(L)
  clifiles()
  if not cpusteps then
    writefile(tmp .. "/calibrate.lua", string.format([[
local f, n, t = dofile(%q), 100000, 0
repeat
  n = n * 2
  local c = os.clock()
  f(n)
  t = os.clock() - c
until t > 0.1
print(math.floor(n * %g / t))
]], tmp .. "/cpu.lua", N.clicpu_s))
    cpusteps = tonumber(readl(string.format("%s %s/calibrate.lua", luas[1].interp, tmp)))
    writefile(tmp .. "/cpu.txt", string.rep(cpusteps .. "\n", N.clicpu))
  end
  local t = string.format("%s/cpu.lua %s/cpu.txt", tmp, tmp)
  local r = pair(N.reps, L.interp .. " " .. tmp .. "/loop.lua " .. t, L.lpar .. " " .. t)
  same("lpar", "loop")
  sameloop(L)
  local tools = {lpar = r.lpar}
  if L.peers then
    tools.xargs = alternate(1, {{"xargs", string.format("xargs -P8 -n1 %s %s/cpucmd.lua %s/cpu.lua <%s/cpu.txt",
      L.interp, tmp, tmp, tmp)}}).xargs
    if have.parallel then
      tools.parallel = alternate(1, {{"gnu", string.format(
        "parallel --will-cite -j8 -k %s %s/cpucmd.lua %s/cpu.lua <%s/cpu.txt", L.interp, tmp, tmp, tmp)}}).gnu
      same("gnu", "loop")
    end
  end
  local title = string.format("CLI: %d items of ~%g ms CPU, -j8", N.clicpu, N.clicpu_s * 1e3)
  if L ~= luas[1] then title = string.format("CLI: %d items of %s's ~%g ms CPU, -j8", N.clicpu, luas[1].interp,
    N.clicpu_s * 1e3) end
  return {
    title = title, label = "CLI CPU", steps = cpusteps,
    serial = r.loop.best, serial_is = "one " .. L.interp .. " loop over the file",
    floor = r.loop.best / math.min(cores, 8), floor_is = string.format("the single loop over %d cores",
      math.min(cores, 8)),
    tools = tools, target = {stat = "best", speedup = 1.9},
  }
end)

-- The peers of A, shell commands, run in the driver.
local function apeers(c)
  local seq = table.concat(range(N.A), " ")
  if have.parallel then
    c.tools.parallel = alternate(1, {{"gnu", string.format("parallel --will-cite -j8 'sleep %g # {}' ::: %s", N.Asleep,
      seq)}}).gnu
  end
  c.tools.xargs = alternate(1, {{"xargs", string.format("printf '%%s\\n' %s | xargs -P8 -I{} sleep %g", seq,
    N.Asleep)}}).xargs
end

-- A case in the caller runs in a child of the Lua it measures.
local function inchild(L, id)
  local cmd = string.format("LPAR_BUILD='%s' %s scripts/bench.lua --child %s%s%s", L.build, L.interp, id,
    tiny and " --tiny" or "", L.peers and " --peers" or "")
  local p = io.popen(cmd)
  local s = p:read("*a")
  local ok = p:close()
  local decoded, c = pcall(cjson.decode, s:match("[^\n]*\n?$") or "")
  if not ok or not decoded or type(c) ~= "table" then
    error(string.format("bench: case %s on %s failed (%s)", id, L.interp, cmd), 0)
  end
  if id == "A" and L.peers then apeers(c) end
  return c
end

-- What each Lua is: lpar's version and its Lua, from its command.
for i, L in ipairs(luas) do
  L.lpar = L.build .. "/lpar"
  L.peers = i == 1
  local v = readl(L.lpar .. " --version 2>/dev/null")
  L.version, L.name = v:match("^(lpar %S+) %((.+)%)$")
  if not L.version then error("bench: " .. L.lpar .. " does not run (build lpar for Lua " .. L.v .. " first)", 0) end
end

local run = {
  version = luas[1].version, lua = luas[1].name, interp = luas[1].interp, system = readl("uname -srm"),
  cores = cores, date = readl("date -u +%Y-%m-%dT%H:%M:%SZ"), load = readl("cut -d' ' -f1-3 /proc/loadavg"),
  tiny = tiny or nil, command = os.getenv("LPAR_BENCH_COMMAND"), cases = {},
}
if #luas > 1 then run.others = {} end
for i = 2, #luas do
  local L = luas[i]
  run.others[i - 1] = {lua = L.name, interp = L.interp, build = L.build, cases = {}}
end
local names = {}
for _, L in ipairs(luas) do names[#names + 1] = L.name end
print(string.format("lpar benchmarks: %s on %s, %s, %d cores, load %s%s", run.version, table.concat(names, " and "),
  run.system, cores, run.load, tiny and " (tiny)" or ""))
local ok, err = pcall(function()
  for _, id in ipairs(#only > 0 and only or order) do
    local fn = cases[id] or error("bench: no case " .. id .. " (cases: " .. table.concat(order, " ") .. ")")
    for i, L in ipairs(luas) do
      local c = incaller[id] and inchild(L, id) or fn(L)
      c.id = id
      local into = i == 1 and run.cases or run.others[i - 1].cases
      into[#into + 1] = c
      io.write(string.format("%-8s %s%s\n  serial %s, floor %s", id, c.title, #luas > 1 and " on " .. L.name or "",
        fmt(c.serial), fmt(c.floor)))
      for _, tool in ipairs({"lpar", "parallel", "xargs", "python"}) do
        local m = c.tools[tool]
        if m then
          io.write(string.format(", %s %s (%.2fx serial)", tool, fmt(m[c.target.stat] or m.best),
            (m[c.target.stat] or m.best) / c.serial))
        end
      end
      if c.tools.lpar.rss then io.write(string.format(", lpar RSS %.1f MB", c.tools.lpar.rss / 1024)) end
      io.write("\n")
      io.stdout:flush()
    end
  end
end)
run.load_after = readl("cut -d' ' -f1-3 /proc/loadavg")
cleanup()
if not ok then error(err, 0) end
if out then
  writefile(out, cjson.encode(run) .. "\n")
  print("bench: wrote " .. out)
end
