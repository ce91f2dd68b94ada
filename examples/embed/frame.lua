-- frame.lua: the script of the example host (host.c). A level is loaded
-- with lpar.parallel, then work runs on a persistent pool while the frame
-- loop goes on drawing: the loop never waits for the workers.
-- luacheck: globals host
local lpar = require "lpar"

local S = {}
local pool          -- made in start(), before the host's render thread
local job           -- the job running in the background, if any
local phase = "load"
local report = {}
local ok = true

local function check(cond, what)
  if not cond then
    ok = false
    report[#report + 1] = "FAILED: " .. what
  end
  return cond
end

-- Busy work standing for path finding: about 'ms' of CPU per item.
local function think(ms)
  local t, x = os.clock(), 0
  while os.clock() - t < ms / 1000 do x = x + 1 end
  return x
end

-- Threads of this process, from /proc (the render thread makes two).
local function threads()
  local f = io.open("/proc/self/status")
  local n = f and tonumber(f:read("a"):match("Threads:%s*(%d+)"))
  if f then f:close() end
  return n or 0
end

-- Called once, before the render thread starts: make the pool here, so
-- that its workers are forked from a process with one thread.
function S.start()
  pool = lpar.pool{n_workers = 2, init = function() _G.NAVMESH = {cost = 3} end}
  return pool:fd()
end

local frames_during, longest, started, threads_seen = 0, 0, nil, 0

function S.frame()
  local t0 = host.now()
  pool:pump() -- what the pool's fd said is ready: handle it
  if phase == "load" then
    -- a loading screen may block: lpar.parallel forks workers that inherit
    -- the whole state (the render thread is running: they only run Lua)
    local chunks, count = lpar.parallel(function(i)
      local sum = 0
      for k = 1, 20000 do sum = sum + (i * k) % 7 end
      return sum
    end, (function() local t = {} for i = 1, 32 do t[i] = i end return t end)(), 2)
    check(count == 32 and chunks[32] ~= nil, "lpar.parallel loaded the level")
    report[#report + 1] = string.format("level: %d chunks with lpar.parallel in %.1f ms",
      count, (host.now() - t0) * 1000)
    phase = "submit"
  elseif phase == "submit" then
    -- path finding for 16 units on the pool, in the background
    local cost = 7 -- an upvalue that travels with the function
    job = pool:submit(function(unit)
      think(20)
      return unit * cost + NAVMESH.cost -- luacheck: ignore (worker global)
    end, (function() local t = {} for i = 1, 16 do t[i] = i end return t end)())
    started = host.now()
    phase = "run"
  elseif phase == "run" then
    frames_during = frames_during + 1
    threads_seen = math.max(threads_seen, threads())
    if job:done() then
      local paths, count = job:wait()
      check(count == 16 and paths[16] == 16 * 7 + 3, "the pool's results")
      local ticks = host.ticks()
      report[#report + 1] = string.format(
        "pool: 16 items in %.0f ms, %d frames drawn meanwhile, longest frame %.1f ms",
        (host.now() - started) * 1000, frames_during, longest * 1000)
      check(frames_during >= 10, "frames kept coming while the job ran")
      check(ticks > 0, "the render thread ran")
      check(threads_seen >= 2, "a second thread existed during the job")
      phase = "refuse"
    end
  elseif phase == "refuse" then
    -- a host function that takes the render lock refuses to run in a worker
    local _, _, errs = pool:map(function(i) return host.scene(i) end, {1},
      {on_error = "collect"})
    check(errs[1] and errs[1]:match("not available in an lpar worker"),
      "host.scene refuses to run in a worker")
    check(type(host.scene(1)) == "number", "host.scene works in the host")
    -- a job cancelled from the frame loop: its workers are replaced
    local slow = pool:submit(function() think(10000) end, {1, 2})
    pool:pump()
    slow:cancel()
    check(slow:status() == "cancelled", "a job can be cancelled")
    check(pool:map(function(x) return x + 1 end, {1})[1] == 2, "the pool goes on")
    return true
  end
  local dt = host.now() - t0
  if phase == "run" and dt > longest then longest = dt end
  return false
end

function S.finish()
  check(longest < 0.05, "no frame waited for the workers")
  report[#report + 1] = "workers: " .. table.concat(pool:pids(), " ")
  pool:close()
  for _, line in ipairs(report) do print("lpar_embed: " .. line) end
  return ok
end

return S
