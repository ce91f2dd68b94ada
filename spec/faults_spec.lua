-- Faults provoked for real: workers killed, exiting, hanging, writing
-- garbage; limits on processes, fds and memory; the parent killed.
local lpar = require "lpar"
local H = require "spec.helper"
local unistd = require "posix.unistd"
local signal = require "posix.signal"
local fcntl = require "posix.fcntl"
local stat = require "posix.sys.stat"

local range = H.range
-- string.pack before 5.3: lua-compat53's
local pack = string.pack or require("compat53.string").pack

local function sorted_keys(t)
  local k = {}
  for i in pairs(t) do k[#k + 1] = i end
  table.sort(k)
  return k
end

local program = H.program

-- Every item but the failed ones came back exactly once, in order.
local function complete(r, n, failed)
  for i = 1, n do
    if failed[i] then
      assert.is_nil(r[i])
    else
      assert.equal(i * 10, r[i])
    end
  end
end

describe("worker faults", function()
  local fds
  before_each(function() fds = H.fdcount() end)
  after_each(function()
    assert.same({}, H.children())
    assert.equal(fds, H.fdcount())
  end)

  for _, case in ipairs{
    {"SIGKILL", function() signal.kill(unistd.getpid(), signal.SIGKILL) end, "killed by signal 9 %(SIGKILL%)"},
    {"SIGSEGV", function() signal.kill(unistd.getpid(), signal.SIGSEGV) end, "killed by signal 11 %(SIGSEGV%)"},
    {"SIGABRT", function() signal.kill(unistd.getpid(), signal.SIGABRT) end, "killed by signal 6 %(SIGABRT%)"},
    {"os.exit(3)", function() os.exit(3) end, "exited with status 3"},
    {"os.exit(0)", function() os.exit(0) end, "exited with status 0"},
  } do
    -- one table of cases, two front ends: the same engine serves both
    for _, front in ipairs{"parallel", "pool"} do
      it("replaces a worker that dies of " .. case[1] .. " and finishes the other items, with "
         .. front, function()
        local die = case[2]
        local function f(x)
          if x == 13 then die() end
          return x * 10
        end
        local r, n, errs
        if front == "parallel" then
          r, n, errs = lpar.parallel(f, range(40), {n_workers = 3, chunksize = 8, on_error = "collect"})
        else
          r, n, errs = H.using(lpar.pool{n_workers = 3}, function(pool)
            return pool:map(f, range(40), {chunksize = 8, on_error = "collect"})
          end)
        end
        assert.equal(40, n)
        assert.same({13}, sorted_keys(errs))
        assert.matches("^worker %d+ " .. case[3] .. "$", errs[13])
        complete(r, 40, {[13] = true})
      end)
    end
  end

  for _, front in ipairs{"parallel", "pool"} do
    it("runs the unfinished items of a dead worker's chunk again, with " .. front, function()
      local path = os.tmpname()
      local function f(x)
        local fh = io.open(path, "a"); fh:write(x, "\n"); fh:close()
        if x == 3 then os.exit(1) end
        return x * 10
      end
      local r, errs, _
      if front == "parallel" then
        r, _, errs = lpar.parallel(f, range(10), {n_workers = 1, chunksize = 10, on_error = "collect"})
      else
        r, _, errs = H.using(lpar.pool{n_workers = 1}, function(pool)
          return pool:map(f, range(10), {chunksize = 10, on_error = "collect"})
        end)
      end
      local fh = io.open(path); local log = fh:read("*a"); fh:close()
      os.remove(path)
      assert.same({3}, sorted_keys(errs))
      complete(r, 10, {[3] = true})
      local runs = {}
      for x in log:gmatch("%d+") do runs[tonumber(x)] = (runs[tonumber(x)] or 0) + 1 end
      assert.equal(1, runs[3])  -- the item that killed it is not run again
      assert.equal(1, runs[10]) -- the rest of the chunk ran on the new worker
    end)
  end

  it("detects a worker dying while idle", function()
    local r, n, errs = lpar.parallel(function(x)
      if x == 1 then
        -- a helper process kills this worker once it is idle again
        local worker = unistd.getpid()
        local pid = unistd.fork()
        if pid == 0 then
          H.sleep(0.2)
          signal.kill(worker, signal.SIGKILL)
          unistd._exit(0)
        end
      end
      H.sleep(0.05)
      return x * 10
    end, range(6), {n_workers = 2, chunksize = 1, on_error = "collect"})
    -- the helper killed the worker of item 1 while it was idle or busy
    -- with a later item: either way every item comes back once
    assert.equal(6, n)
    assert.same({}, errs)
    complete(r, 6, {})
  end)

  it("drops a result cut off by the worker's death and runs its item again", function()
    local flag = os.tmpname()
    os.remove(flag)
    local block = string.rep("z", 65536)
    local r, n, errs = lpar.parallel(function(x)
      if x == 1 and not io.open(flag) then
        io.open(flag, "w"):close()
        -- A helper stops the parent, waits until this worker is blocked
        -- writing its 16 MB result into the full pipe, kills it there and
        -- lets the parent go on: the parent finds a partial frame.
        local worker, parent = unistd.getpid(), unistd.getppid()
        if unistd.fork() == 0 then
          signal.kill(parent, signal.SIGSTOP)
          local deadline = H.now() + 5
          repeat
            H.sleep(0.002)
            local w = io.open("/proc/" .. worker .. "/wchan")
            local where = w and w:read("*a") or ""
            if w then w:close() end
          until where:find("pipe_write") or H.now() > deadline
          signal.kill(worker, signal.SIGKILL)
          signal.kill(parent, signal.SIGCONT)
          unistd._exit(0)
        end
      end
      if x == 1 then return string.rep(block, 256) end
      return x * 10
    end, range(3), {n_workers = 1, chunksize = 3, on_error = "collect"})
    os.remove(flag)
    assert.equal(3, n)
    assert.same({}, errs) -- it died between items: its chunk ran again
    assert.equal(string.rep(block, 256), r[1])
    assert.same({20, 30}, {r[2], r[3]})
  end)

  for _, case in ipairs{
    {"garbage on a worker's pipe", string.rep("\255", 64), "bad frame header"},
    -- type 7 (RING), len 16: a place far outside the ring
    {"a ring frame that points outside the ring",
      pack("<I4I4I8I8I8", 7, 0, 16, 2 ^ 40, 2 ^ 20), "bad place in the ring"},
    -- type 3 (RESULT) for item 5, the string "fake", then two bytes too many:
    -- "fake" must not become item 5's result
    {"a results frame with trailing bytes",
      pack("<I4I4I8I8I8", 3, 1, 24, 5, 1000) .. "\5\4fake" .. "zz",
      "trailing bytes in a frame"},
    -- type 3 (RESULT) with no results
    {"a results frame of no results",
      pack("<I4I4I8I8I8", 3, 0, 16, 5, 1000), "bad frame header"},
  } do
    local what, bytes, why = case[1], case[2], case[3]
    for _, front in ipairs{"parallel", "pool"} do
      it("treats " .. what .. " as a protocol error of that worker, with " .. front, function()
        local function f(x)
          if x == 5 then
            local ux, sys = require "posix.unistd", require "posix.sys.stat"
            for fd = 3, 64 do -- the results pipe is the only FIFO a worker holds
              local st = sys.fstat(fd)
              if st and sys.S_ISFIFO(st.st_mode) ~= 0 then ux.write(fd, bytes) end
            end
            require("posix.time").nanosleep({tv_sec = 1, tv_nsec = 0})
          end
          return x * 10
        end
        local r, n, errs
        if front == "parallel" then
          r, n, errs = lpar.parallel(f, range(12), {n_workers = 2, chunksize = 1, on_error = "collect"})
        else
          r, n, errs = H.using(lpar.pool{n_workers = 2}, function(pool)
            return pool:map(f, range(12), {chunksize = 1, on_error = "collect"})
          end)
        end
        assert.equal(12, n)
        assert.same({5}, sorted_keys(errs))
        assert.matches("^worker %d+ broke the protocol %(" .. why .. "%)", errs[5])
        complete(r, 12, {[5] = true})
      end)
    end
  end

  it("keeps the results a worker put in its ring before it was killed", function()
    local big = string.rep("r", 307200) -- over the flush size: sent at once
    local r, n, errs = lpar.parallel(function(x)
      if x == 3 then signal.kill(unistd.getpid(), signal.SIGKILL) end
      return x == 6 and x * 10 or big .. x
    end, range(6), {n_workers = 1, chunksize = 6, on_error = "collect"})
    assert.equal(6, n)
    assert.same({3}, sorted_keys(errs))
    assert.matches("killed by signal 9", errs[3])
    for _, i in ipairs{1, 2, 4, 5} do assert.equal(big .. i, r[i]) end
    assert.equal(60, r[6])
  end)

  it("times out an item that runs too long, and goes on", function()
    local r, n, errs = lpar.parallel(function(x)
      if x == 2 then while true do end end
      return x * 10
    end, range(6), {n_workers = 2, timeout = 0.25, on_error = "collect"})
    assert.equal(6, n)
    assert.same({2}, sorted_keys(errs))
    assert.equal("timed out after 0.25 s", errs[2]) -- as given, as pools say it
    complete(r, 6, {[2] = true})
  end)

  it("times out an item blocked in C, ignoring SIGTERM", function()
    local t0 = H.now()
    local ok, err = pcall(lpar.parallel, function(x)
      if x == 1 then
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        unistd.sleep(30)
      end
      return x * 10
    end, range(2), {n_workers = 2, timeout = 0.3})
    assert.is_false(ok)
    assert.equal("item 1: timed out after 0.3 s", err)
    assert.is_true(H.now() - t0 < 10)
  end)

  it("reruns a failed item with retries", function()
    local path = os.tmpname()
    local r, n, errs = lpar.parallel(function(x)
      if x == 2 then
        local f = io.open(path, "a"); f:write("x"); f:close()
        f = io.open(path); local tries = #f:read("*a"); f:close()
        if tries < 3 then os.exit(9) end
      end
      return x * 10
    end, range(4), {n_workers = 2, retries = 2, on_error = "collect"})
    os.remove(path)
    assert.equal(4, n)
    assert.same({}, errs)
    complete(r, 4, {})
  end)

  it("gives up after the retries", function()
    local ok, err = pcall(lpar.parallel, function(x)
      if x == 2 then error("always", 0) end
      return x
    end, range(3), {n_workers = 2, retries = 2})
    assert.is_false(ok)
    assert.matches("^item 2: always", err)
  end)

  it("fails the run once when init fails, without respawning forever", function()
    local path = os.tmpname()
    local ok, err = pcall(lpar.parallel, function(x) return x end, range(50), {
      n_workers = 4,
      init = function()
        local f = io.open(path, "a"); f:write("i"); f:close()
        error("cannot open the database", 0)
      end,
    })
    local f = io.open(path); local inits = #f:read("*a"); f:close()
    os.remove(path)
    assert.is_false(ok)
    assert.matches("^worker init failed: cannot open the database", err)
    assert.is_true(inits <= 4)
  end)

  it("turns a runaway allocation into an item error with max_memory", function()
    local r, n, errs = lpar.parallel(function(x)
      if x == 3 then
        local t = {}
        for i = 1, 1e9 do t[i] = i end
        return #t
      end
      return x * 10
    end, range(5), {n_workers = 2, max_memory = "64M", on_error = "collect"})
    assert.equal(5, n)
    assert.same({3}, sorted_keys(errs))
    assert.equal("not enough memory (limit 64 MiB)", errs[3])
    complete(r, 5, {[3] = true})
  end)
end)

describe("resource limits", function()
  it("names fork when it fails, and leaves nothing behind", function()
    local f = program [[
      local lpar = require "lpar"
      local ok, err = pcall(lpar.parallel, function(x) return x end, {1, 2, 3}, 2)
      io.write(tostring(ok), " ", err)
    ]]
    stat.chmod(f, tonumber("644", 8)) -- readable by the unprivileged user
    -- root ignores RLIMIT_NPROC: run as nobody, allowed one process
    local rc, out, err = H.run("setpriv --reuid=65534 --regid=65534 --clear-groups "
      .. "bash -c 'ulimit -u 1; exec " .. H.interp .. " " .. f .. "'")
    assert.equal("", err)
    os.remove(f)
    assert.equal(0, rc)
    assert.equal("false cannot start a worker: fork: Resource temporarily unavailable", out)
  end)

  -- A program that uses up every fd but 'spare', then calls parallel.
  local function starved(spare, call)
    return program(string.format([[
      local lpar = require "lpar"
      local hold = {}
      repeat
        local f = io.open("/dev/null")
        hold[#hold + 1] = f
      until not f
      for _ = 1, %d do table.remove(hold):close() end
      %s
    ]], spare, call))
  end

  it("names the call when fds run out", function()
    local f = starved(1, [[
      local ok, err = pcall(lpar.parallel, function(x) return x end, {1, 2, 3}, 2)
      io.write(tostring(ok), " ", err)
    ]])
    local rc, out, err = H.run("bash -c 'ulimit -n 64; exec " .. H.interp .. " " .. f .. "'")
    os.remove(f)
    assert.equal("", err)
    assert.equal(0, rc)
    -- the engine's own fds (an epoll set and a timer) come before the
    -- worker's channels: with one fd to spare, the timer is refused
    assert.equal("false cannot start a worker: timerfd_create: Too many open files", out)
  end)

  it("goes on with the workers it has when more cannot start", function()
    local f = starved(6, [[
      local r = lpar.parallel(function(x) return x * 2 end, {1, 2, 3, 4, 5, 6, 7, 8}, 8)
      io.write(table.concat(r, ","))
    ]])
    local rc, out, err = H.run("bash -c 'ulimit -n 64; exec " .. H.interp .. " " .. f .. "'")
    os.remove(f)
    assert.equal("", err)
    assert.equal(0, rc)
    assert.equal("2,4,6,8,10,12,14,16", out)
  end)

  it("keeps fds, processes and memory flat over 1000 calls", function()
    local fds = H.fdcount()
    local function heap()
      collectgarbage(); collectgarbage() -- runs are finalized, then freed
      return collectgarbage("count")
    end
    local function calls(n)
      for _ = 1, n do lpar.parallel(function(x) return x end, {1, 2}, 2) end
    end
    calls(500)
    local mem = heap()
    calls(500)
    assert.equal(fds, H.fdcount())
    assert.same({}, H.children())
    assert.is_true(heap() - mem < 16, "Lua heap grew by " .. (heap() - mem) .. " KB")
  end)
end)

describe("parent faults", function()
  it("workers exit within 2 s when the parent is killed", function()
    local pidfile = os.tmpname()
    local f = program(string.format([[
      local lpar = require "lpar"
      local unistd = require "posix.unistd"
      lpar.parallel(function(x)
        local h = io.open(%q, "a"); h:write(unistd.getpid(), "\n"); h:close()
        unistd.sleep(60)
      end, {1, 2, 3}, 3)
    ]], pidfile))
    local pid = unistd.fork()
    if pid == 0 then
      unistd.execp(H.interp, {f})
      unistd._exit(127)
    end
    local pids
    local deadline = H.now() + 10
    repeat
      H.sleep(0.05)
      local h = io.open(pidfile); local text = h:read("*a"); h:close()
      pids = {}
      for p in text:gmatch("%d+") do pids[#pids + 1] = tonumber(p) end
    until #pids == 3 or H.now() > deadline
    assert.equal(3, #pids)
    signal.kill(pid, signal.SIGKILL)
    H.waitpid(pid)
    local t0 = H.now()
    while H.now() - t0 < 2 do
      local left = 0
      for _, p in ipairs(pids) do if H.alive(p) then left = left + 1 end end
      if left == 0 then break end
      H.sleep(0.02)
    end
    for _, p in ipairs(pids) do assert.is_false(H.alive(p), "worker " .. p .. " outlived its parent") end
    os.remove(f)
    os.remove(pidfile)
  end)
end)

describe("the codec as a boundary", function()
  it("refuses a truncated frame without crashing", function()
    local s = lpar.encode({1, 2, "three"})
    for cut = 0, #s - 1 do
      assert.has_error(function() lpar.decode(s:sub(1, cut)) end)
    end
  end)

  it("refuses a value nested deeper than the limit, naming it", function()
    local t = {}
    local cur = t
    for _ = 1, 300 do cur[1] = {}; cur = cur[1] end
    local ok, err = pcall(lpar.encode, t)
    assert.is_false(ok)
    assert.matches("nested too deeply", err)
    local _ = fcntl -- loaded to check luaposix's fcntl is there for the specs
  end)
end)

describe("a worker leaving by os.exit", function()
  -- A C host with an atexit handler: a worker that calls os.exit must not
  -- run it (workers leave with _exit), in a one-shot run or a pool.
  local exe

  setup(function()
    exe = os.tmpname()
    local cmd = string.format("cc -std=c11 -D_GNU_SOURCE -o %s " ..
      "spec/fixtures/embed/atexit_host.c %s %s/liblpar.a %s -lm -ldl 2>&1", exe,
      H.cflags, H.build, H.libs)
    local rc, out = H.run(cmd)
    assert.equal(0, rc, out)
  end)

  teardown(function() os.remove(exe) end)

  local function host(chunk)
    local rc, out, err = H.run(exe .. " '" .. chunk .. "'")
    assert.equal("", err)
    assert.equal(0, rc)
    return out
  end

  it("does not run the host's atexit handlers, and fails its item", function()
    local out = host([[
      local lpar = require "lpar"
      local r, n, errs = lpar.parallel(function(x)
        if x == 2 then io.write("flushed "); os.exit(5) end
        return x
      end, {1, 2, 3}, {n_workers = 2, on_error = "collect"})
      print(r[1], r[3], n, errs[2]:match("exited with status %d+"))
      local pool = lpar.pool{n_workers = 1}
      local _, _, perrs = pool:map(function() os.exit(true) end, {1}, {on_error = "collect"})
      pool:close()
      print(perrs[1]:match("exited with status %d+"))
    ]])
    local pid = out:match("^host (%d+)\n")
    assert.is_not_nil(pid, out)
    assert.matches("flushed ", out)
    assert.matches("1\t3\t3\texited with status 5\n", out)
    assert.matches("\nexited with status 0\n", out)
    local ran = {}
    for who in out:gmatch("atexit ran in (%d+)") do ran[#ran + 1] = who end
    assert.same({pid}, ran)
  end)
end)

describe("a worker lost with nothing to name its item", function()
  -- Item 3's worker is killed while it writes its 20 MB result through the
  -- pipe, where no item is its own any more: the rest of its chunk goes
  -- back as suspects, handed out one at a time, and a worker lost again
  -- while it holds one alone is lost to that item. Nothing else is lost,
  -- and the item runs at most twice. (When no kill lands, item 3 simply
  -- succeeds: the spec holds either way, and fails on an engine that
  -- re-runs the item until 'workers keep dying'.)
  local function f(count)
    return function(x)
      if x == 3 then
        local h = assert(io.open(count, "a"))
        h:write("ran\n")
        h:close()
        local pid = io.open("/proc/self/stat"):read("*n")
        -- a watcher in one process (a shell loop would fork thousands,
        -- and the pids wrap around): it kills this worker when it is
        -- writing to its pipe, and stops once the worker is gone, never
        -- touching another process that got its pid
        os.execute(("lua5.4 -e %q >/dev/null 2>&1 &"):format(([[
          local signal, time = require "posix.signal", require "posix.time"
          local function born()
            local f = io.open("/proc/%d/stat")
            local s = f and f:read("*a")
            if f then f:close() end
            return s and s:match("%%) %%S+ " .. ("%%S+ "):rep(18) .. "(%%d+)")
          end
          local start = born()
          for _ = 1, 20000 do
            if start == nil or born() ~= start then return end
            local f = io.open("/proc/%d/wchan")
            local w = f and f:read("*a")
            if f then f:close() end
            if w == "anon_pipe_write" and born() == start then
              signal.kill(%d, signal.SIGKILL)
              return
            end
            time.nanosleep({tv_sec = 0, tv_nsec = 1000000})
          end
        ]]):format(pid, pid, pid)))
        return string.rep("x", 20e6)
      end
      return x
    end
  end

  it("never ends in 'workers keep dying', however many chunks hold such an item", function()
    -- 12 such items in 12 chunks, more losses than the limit on losses
    -- nothing names (2 x 4 workers + 2), and one of them retried
    local count = os.tmpname()
    local bad = {}
    for i = 5, 225, 20 do bad[i] = true end
    local g = f(count)
    local r, n, errs = lpar.parallel(function(x)
      if bad[x] then return g(3) end
      return x
    end, range(300), {n_workers = 4, chunksize = 20, on_error = "collect"})
    os.remove(count)
    assert.equal(300, n)
    for i = 1, 300 do
      if not bad[i] then
        assert.equal(i, r[i])
      elseif errs[i] then
        assert.matches("^worker %d+ killed by signal 9", errs[i])
      else
        assert.equal(20e6, #r[i])
      end
    end
  end)

  for _, front in ipairs{"parallel", "pool"} do
    it("fails that item alone, named, with " .. front, function()
      local count = os.tmpname()
      local r, n, errs
      if front == "parallel" then
        r, n, errs = lpar.parallel(f(count), range(6), {n_workers = 2, on_error = "collect"})
      else
        r, n, errs = H.using(lpar.pool{n_workers = 2}, function(pool)
          return pool:map(f(count), range(6), {on_error = "collect"})
        end)
      end
      local runs = #(H.slurp(count) or ""):gsub("[^\n]", "")
      os.remove(count)
      assert.equal(6, n)
      for _, i in ipairs{1, 2, 4, 5, 6} do assert.equal(i, r[i]) end
      if errs[3] then
        assert.matches("^worker %d+ killed by signal 9", errs[3])
        assert.is_nil(r[3])
      else
        assert.equal(20e6, #r[3])
      end
      assert.is_true(runs <= 2, "item 3 ran " .. runs .. " times")
    end)
  end
end)

describe("a worker that leaves its process group", function()
  -- it leaves a child in its group and moves itself into the caller's:
  -- stopping the group must still stop the worker itself
  for _, front in ipairs{"parallel", "pool"} do
    it("still times out, with " .. front, function()
      local rc, out, err = H.lua([[
        local lpar = require "lpar"
        local u = require "posix.unistd"
        local cpg = u.getpgrp()
        local function f(x)
          if x == 1 then
            if u.fork() == 0 then u.sleep(60) u._exit(0) end
            assert(u.setpid("p", 0, cpg))
            u.sleep(60)
          end
          return x
        end
        local r, _, errs
        if "]] .. front .. [[" == "pool" then
          local p = lpar.pool{n_workers = 1}
          r, _, errs = p:map(f, {1, 2}, {timeout = 1, on_error = "collect"})
          p:close()
        else
          r, _, errs = lpar.parallel(f, {1, 2}, {n_workers = 1, timeout = 1, on_error = "collect"})
        end
        print(r[1], r[2], errs[1])
      ]])
      assert.equal(0, rc, err)
      assert.equal("nil\t2\ttimed out after 1.0 s\n", out)
    end)
  end
end)

describe("a process forked by f that returns from it", function()
  -- f forks; the child returns from f (no _exit) while the worker waits
  -- for it, then returns its own value
  local F = [[function(x)
    local unistd, wait = require "posix.unistd", require "posix.sys.wait"
    local pid = unistd.fork()
    if pid == 0 then return "child" .. x end
    wait.wait(pid)
    return "parent" .. x
  end]]
  local said = "lpar: process %d+, forked by worker %d+, returned into the worker's loop: it leaves"

  for front, call in pairs({
    ["lpar.parallel"] = "lpar.parallel(%s, {1, 2, 3, 4}, {n_workers = 2, chunksize = 2})",
    ["pool:map"] = "lpar.pool(2):map(%s, {1, 2, 3, 4}, {chunksize = 2})",
  }) do
    it("never answers the parent, nor takes items, with " .. front, function()
      local rc, out, err = H.lua(([[
        local lpar = require "lpar"
        local r, n = %s
        print(n, table.concat(r, " "))
      ]]):format(call:format(F)))
      assert.equal(0, rc, err)
      assert.equal("4\tparent1 parent2 parent3 parent4\n", out)
      local k = 0
      for l in err:gmatch("[^\n]+") do
        assert.matches("^" .. said, l)
        k = k + 1
      end
      assert.equal(4, k)
    end)
  end

  it("never answers the parent, with the lpar command", function()
    local rc, out, err = H.lpar("-j 1 -e " .. H.quote(F) .. " ::: a b")
    assert.equal(0, rc, err)
    assert.equal("parenta\nparentb\n", out)
    local _, k = err:gsub(said, "")
    assert.equal(2, k)
  end)

  it("runs no further record of its batch, with the lpar command", function()
    -- a batch of 8 records in one worker: each call of f says so on
    -- stderr; a copy that went on with the batch would call f again
    local G = F:gsub("^function%(x%)", 'function(x)\n    io.stderr:write("called ", x, "\\n")')
    for _, chunk in ipairs({1, 8}) do
      local rc, out, err = H.lpar("-j 1 --chunk " .. chunk .. " -e " .. H.quote(G) .. " -",
                                  "1\n2\n3\n4\n5\n6\n7\n8\n")
      assert.equal(0, rc, err)
      assert.equal("parent1\nparent2\nparent3\nparent4\nparent5\nparent6\nparent7\nparent8\n", out)
      local _, calls = err:gsub("called %d", "")
      local _, left = err:gsub(said, "")
      assert.equal(8, calls, err)
      assert.equal(8, left, err)
    end
  end)
end)

describe("an ERROR frame of index 0 once a worker runs items", function()
  -- f writes, on item 3, an ERROR frame for index 0 (the job as a whole)
  -- with a nil value on its worker's results pipe, of the kind 'kind'
  local F = [[
local unistd = require "posix.unistd"
local resultsfd = dofile("spec/fixtures/resultsfd.lua")
local pack = string.pack or require("compat53.string").pack -- before 5.3
return function(s)
  if s == "3" then
    unistd.write(resultsfd(), pack("<I4I4I8I8", 4, %d, 10, 0) .. "\0\0")
  end
  return s
end
]]

  for _, kind in ipairs({1, 7}) do
    it("is a protocol error of that worker, and the run goes on (kind " .. kind .. ")", function()
      local path = os.tmpname()
      H.writefile(path, F:format(kind))
      local rc, out, err = H.lpar("-j 1 " .. H.quote(path) .. " -", "1\n2\n3\n4\n5\n", 60)
      os.remove(path)
      assert.equal(1, rc, err)
      assert.equal("1\n2\n4\n5\n", out)
      assert.matches('^lpar: line 3 %("3"%): worker %d+ broke the protocol %(error frame for no item%)\n', err)
    end)
  end
end)
