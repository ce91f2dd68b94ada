-- Every call ends in bounded time and stops what its workers started:
-- hooks that never return, workers whose own children hold their pipes,
-- half-written frames, subprocesses of workers, an ignored SIGCHLD and
-- cancelled jobs; for lpar.parallel, lpar.imap, pools and the CLI alike.
local lpar = require "lpar"
local H = require "spec.helper"
local unistd = require "posix.unistd"
local signal = require "posix.signal"
local wait = require "posix.sys.wait"

local FIX = "spec/fixtures/bounded/"
local LIMIT = 60 -- seconds a run may take before it counts as hung

local FRONTS = {"parallel", "imap", "pool", "cli"}

-- The program a module front end runs: the job in fixture 'fix' over the
-- items "1".."n"; it prints "ok <results joined by commas>" or "error <msg>".
local TEMPLATE = [[
local lpar = require "lpar"
%s
local job = dofile(%q)
if type(job) == "function" then job = {map = job} end
local items = {}
for i = 1, %d do items[i] = tostring(i) end
local o = {n_workers = %d, timeout = %s, chunksize = %s, init = job.init, close = job.close}
local front = %q
local ok, err = pcall(function()
  local got = {}
  if front == "parallel" then
    local r, n = lpar.parallel(job.map, items, o)
    for i = 1, n do got[i] = r[i] end
  elseif front == "imap" then
    for i, v in lpar.imap(job.map, items, o) do got[i] = v end
  else
    local p = lpar.pool{n_workers = o.n_workers, init = job.init,
                        close = job.close, timeout = %s}
    local mapped, r, n = pcall(p.map, p, job.map, items,
                               {timeout = o.timeout, chunksize = o.chunksize})
    p:close() -- whether map returned or raised
    if not mapped then error(r, 0) end
    for i = 1, n do got[i] = r[i] end
  end
  return table.concat(got, ",")
end)
io.write(ok and "ok " or "error ", tostring(err), "\n")
%s
]]

-- The shell command that runs fixture 'fix' through 'front', and the temporary
-- files to remove afterwards. o: n (items), workers, timeout, chunk, hooks
-- (a pool gets the timeout too), env (name -> value), pre and post (Lua
-- code around the call, module only), wrap (a command prefix for the CLI).
local function command(front, fix, o)
  local env, tmp = {}, {}
  for k, v in pairs(o.env or {}) do env[#env + 1] = ("%s=%q"):format(k, v) end
  local pre = ("env %s "):format(table.concat(env, " "))
  if front == "cli" then
    local items = os.tmpname()
    local f = assert(io.open(items, "w"))
    for i = 1, o.n or 1 do f:write(i, "\n") end
    f:close()
    tmp[1] = items
    return ("%s%s %s -j %d %s %s %s%s %s"):format(pre, o.wrap or "", H.cli, o.workers or 1,
      o.timeout and "--timeout " .. o.timeout or "", o.chunk and "--chunk " .. o.chunk or "",
      FIX, fix, items), tmp
  end
  local prog = H.program(TEMPLATE:format(o.pre or "", FIX .. fix, o.n or 1, o.workers or 1,
    tostring(o.timeout), tostring(o.chunk), front, tostring(o.hooks and o.timeout),
    o.post or ""))
  tmp[1] = prog
  return pre .. H.interp .. " " .. prog, tmp
end

-- Run fixture 'fix' through 'front' under a hard time limit: exit code,
-- stdout, stderr, seconds taken. The run must have ended by itself.
local function run(front, fix, o)
  local cmd, tmp = command(front, fix, o or {})
  local t0 = H.now()
  local rc, out, err = H.run(("timeout -k 5 %d %s"):format(LIMIT, cmd))
  local took = H.now() - t0
  for _, f in ipairs(tmp) do os.remove(f) end
  assert(rc ~= 124 and rc ~= 137, ("%s hung (%.0f s): %s%s"):format(front, took, out, err))
  return rc, out, err, took
end

-- Whether process 'pid' is gone (a zombie nobody reaped counts as gone).
local function gone(pid)
  local s = H.slurp("/proc/" .. pid .. "/stat")
  return s == nil or s:match(".*%) (%S)") == "Z"
end

-- Wait up to 'secs' for pred() to be true; returns whether it became so.
local function waitfor(pred, secs)
  local deadline = H.now() + secs
  while not pred() do
    if H.now() > deadline then return false end
    H.sleep(0.05)
  end
  return true
end

-- The pid in 'path' once the file holds one (nil after 'secs').
local function pidin(path, secs)
  local pid
  waitfor(function()
    pid = tonumber(H.slurp(path) or "")
    return pid ~= nil
  end, secs)
  return pid
end

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

-- Start 'cmd' through sh (exec'd: the pid is the command's) with its
-- output to files; returns pid, out, err paths.
local function spawn(cmd)
  local out, err = os.tmpname(), os.tmpname()
  local pid = assert(unistd.fork())
  if pid == 0 then
    unistd.execp("sh", {"-c", ("exec %s </dev/null >%s 2>%s"):format(cmd, out, err)})
    unistd._exit(127)
  end
  return pid, out, err
end

-- Reap 'pid' within 'secs' (killing it after that): exit code or 128+signal,
-- and whether it ended by itself.
local function reap(pid, secs)
  local _, how, code
  local ended = waitfor(function()
    local p
    p, how, code = wait.wait(pid, wait.WNOHANG)
    return p == pid
  end, secs)
  if not ended then
    signal.kill(pid, signal.SIGKILL)
    _, how, code = wait.wait(pid)
  end
  return how == "killed" and 128 + code or code, ended
end

describe("hooks that never return", function()
  for _, front in ipairs(FRONTS) do
    it("time out in init with " .. front, function()
      local rc, out, err = run(front, "hang_init.lua", {n = 3, workers = 2, timeout = 1, hooks = true})
      local said = front == "cli" and err or out
      assert.matches("worker init timed out after 1%.0 s", said)
      if front == "cli" then assert.equal(2, rc) end
    end)

    it("time out in close with " .. front, function()
      local rc, out, err = run(front, "hang_close.lua", {n = 3, workers = 2, timeout = 1, hooks = true})
      if front == "cli" then
        assert.equal("1\n2\n3\n", out)
        assert.equal(0, rc)
      else
        assert.equal("ok 1,2,3\n", out)
      end
      assert.matches("worker %d+: close timed out after 1%.0 s", err)
    end)
  end

  -- a close that outlasts its 60 s timeout; SIGINT or SIGTERM once it
  -- runs ends the wait at once, and the caller gets the signal as if
  -- there had been no wait
  for _, case in ipairs({
    {"a pool's caller (lua)", H.interp .. " " .. H.program([[
      local lpar = require "lpar"
      local job = dofile("spec/fixtures/bounded/close_pid.lua")
      local pool = lpar.pool{n_workers = 1, timeout = 60, close = job.close}
      print(pool:map(job.map, {"a"})[1])
      io.stdout:flush()
      pool:close()
      print("not reached")]]), signal.SIGINT, 1, "interrupted!"},
    {"the lpar command", H.quote(H.cli) .. " --timeout 60 " .. FIX .. "close_pid.lua ::: a",
     signal.SIGINT, 130, "^lpar: interrupted\n$"},
    {"the lpar command (SIGTERM)", H.quote(H.cli) .. " --timeout 60 " .. FIX .. "close_pid.lua ::: a",
     signal.SIGTERM, 143, "^lpar: terminated\n$"},
  }) do
    it("end a close wait at a signal, with " .. case[1], function()
      local closepid = tmpname()
      local pid, out, err = spawn(("env LPAR_CLOSEPID=%s %s"):format(closepid, case[2]))
      local worker = pidin(closepid, 30)
      assert.is_not_nil(worker, "close never ran")
      signal.kill(pid, case[3])
      local code, ended = reap(pid, 30) -- the timeout is 60 s
      assert.is_true(ended, "the signal did not end the wait")
      assert.equal(case[4], code)
      assert.equal("a\n", H.slurp(out))
      assert.matches(case[5], H.slurp(err))
      assert.is_true(waitfor(function() return signal.kill(worker, 0) == nil end, 10), "close still runs")
      os.remove(out)
      os.remove(err)
      os.remove(closepid)
      if case[1]:find("lua") then os.remove(case[2]:match("%S+$")) end
    end)
  end

  it("say the timeout as it was given when close outlasts a tiny one", function()
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      local pool = lpar.pool{n_workers = 1, timeout = 1e-10,
                             close = function() require("posix.unistd").sleep(1000) end}
      pool:close()
      print("closed")
    ]])
    assert.equal(0, rc, err)
    assert.equal("closed\n", out)
    assert.matches("^lpar: pool worker %d+: close timed out after 1e%-10 s\n$", err)
  end)

  it("take a pool's timeout only as a positive number of seconds", function()
    for _, bad in ipairs{-1, 0, "soon", 1e10} do
      assert.has_error(function() lpar.pool{n_workers = 1, timeout = bad} end,
        "bad argument #1 to 'pool' (timeout must be a positive number of seconds)")
    end
  end)

  it("refuse more retries than lpar runs, rather than capping them unsaid", function()
    assert.has_error(function() lpar.parallel(tostring, {1}, {retries = 1000001}) end,
      "bad argument #3 to 'parallel' (retries must be at most 1000000, not 1000001)")
    assert.same({"1"}, (lpar.parallel(tostring, {1}, {n_workers = 1, retries = 1000000})))
    local rc, out, err = H.lpar("--retries 1000001 -e " .. H.quote("function(s) return s end") .. " ::: a")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("^lpar: bad value for '%-%-retries': '1000001' %(at most 1000000%)", err)
  end)

  for _, front in ipairs{"parallel", "pool"} do
    it("are killed in close after the grace period without a timeout, with " .. front, function()
      local _, out, err, took = run(front, "hang_close.lua", {n = 3, workers = 1})
      assert.equal("ok 1,2,3\n", out)
      assert.matches("worker %d+: close timed out after 10%.0 s", err)
      assert.is_true(took < LIMIT - 10)
    end)
  end
end)

describe("a worker whose own child holds its pipes", function()
  for _, front in ipairs(FRONTS) do
    for _, how in ipairs{"exits", "times out"} do
      it("is seen at once when it " .. how .. ", with " .. front, function()
        local pidfile = tmpname()
        local env = {BOUNDED_PIDFILE = pidfile, BOUNDED_SPIN = how == "times out" and "1" or nil}
        local rc, out, err, took = run(front, "fork_die.lua",
          {n = 2, workers = 1, timeout = how == "times out" and 2 or nil, env = env})
        local said = front == "cli" and err or out
        if how == "exits" then
          -- the CLI quotes the record
          assert.matches((front == "cli" and '1 %("1"%)' or "1") ..
                         ": worker %d+ exited with status 3", said)
        else
          assert.matches("timed out after 2%.0 s", said)
        end
        if front == "cli" then assert.equal(1, rc) end
        -- the child sleeps for 60 s: the run did not wait for it
        assert.is_true(took < 30, ("took %.1f s"):format(took))
        local child = pidin(pidfile, 5)
        os.remove(pidfile)
        assert.is_truthy(child)
        assert.is_true(waitfor(function() return gone(child) end, 20))
      end)
    end
  end
end)

describe("a live worker that stops inside a frame", function()
  for _, front in ipairs(FRONTS) do
    it("broke the protocol once the timeout passes, with " .. front, function()
      -- item 2 returns at once after its half frame: a timeout of 3 s
      -- leaves it room to do so on a loaded machine (else it is its item
      -- that timed out)
      local rc, out, err = run(front, "half_frame.lua",
        {n = 3, workers = 1, chunk = 1, timeout = 3, env = {BOUNDED_AFTER = "return"}})
      local said = front == "cli" and err or out
      assert.matches("worker %d+ broke the protocol %(", said)
      assert.matches("partial frame", said)
      if front == "cli" then assert.is_true(rc == 1 or rc == 2) end
    end)
  end

  for _, front in ipairs{"parallel", "pool", "cli"} do
    it("broke the protocol in an init without a timeout that leaves a frame unfinished, with " ..
       front, function()
      local rc, out, err, took = run(front, "half_frame.lua",
        {n = 3, workers = 1, hooks = true, env = {BOUNDED_INIT = "1"}})
      local said = front == "cli" and err or out
      assert.matches("worker init failed: worker %d+ broke the protocol %(partial frame, " ..
                     "nothing more for 10%.0 s%)", said)
      if front == "cli" then assert.equal(2, rc) end
      assert.is_true(took < LIMIT - 10)
    end)
  end

  for _, front in ipairs{"parallel", "pool"} do
    it("broke the protocol when a frame stalls, without a timeout, with " .. front, function()
      local once = tmpname()
      local _, out, _, took = run(front, "half_frame.lua",
        {n = 3, workers = 1, chunk = 1, env = {BOUNDED_AFTER = "return", BOUNDED_ONCE = once}})
      os.remove(once)
      -- the item runs again on a fresh worker after the stall
      assert.equal("ok 1,2,3\n", out)
      assert.is_true(took < LIMIT - 10)
    end)
  end
end)

describe("a pool worker stopped between items", function()
  it("is let go once the timeout passes, its items run elsewhere", function()
    -- SIGSTOP before the job: the worker never takes its chunk
    local f = H.program([[
      local lpar = require "lpar"
      local signal = require "posix.signal"
      local pool = lpar.pool{n_workers = 2}
      local pids = pool:pids()
      signal.kill(pids[1], signal.SIGSTOP)
      local r, n, errs = pool:map(function(x) return x * 2 end, {1, 2, 3, 4, 5, 6, 7, 8},
                                  {timeout = 1, chunksize = 1, on_error = "collect"})
      local got = {}
      for i = 1, n do got[i] = r[i] end
      io.write(table.concat(got, ","), " ", tostring(next(errs)), "\n")
      signal.kill(pids[1], signal.SIGCONT)
      pool:close()
    ]])
    local rc, out, err = H.run(("timeout -k 5 %d %s %s"):format(LIMIT, H.interp, f))
    os.remove(f)
    assert.equal("", err)
    assert.equal(0, rc)
    assert.equal("2,4,6,8,10,12,14,16 nil\n", out)
  end)
end)

describe("subprocesses of workers", function()
  for _, front in ipairs(FRONTS) do
    it("are stopped with a worker that times out, with " .. front, function()
      local pidfile = tmpname()
      local _, out, err = run(front, "orphan.lua",
        {n = 2, workers = 1, timeout = 2, env = {BOUNDED_PIDFILE = pidfile}})
      assert.matches("timed out after 2%.0 s", front == "cli" and err or out)
      local sleeper = pidin(pidfile, 5)
      os.remove(pidfile)
      assert.is_truthy(sleeper)
      assert.is_true(waitfor(function() return gone(sleeper) end, 20))
    end)

    local sig = front == "cli" and "SIGTERM" or "SIGINT"
    it("are stopped when " .. sig .. " stops the run, with " .. front, function()
      local pidfile = tmpname()
      local cmd, tmp = command(front, "orphan.lua",
        {n = 1, workers = 1, env = {BOUNDED_PIDFILE = pidfile}})
      local pid, out, err = spawn(cmd)
      local sleeper = pidin(pidfile, 30)
      assert.is_truthy(sleeper)
      signal.kill(pid, signal[sig])
      local rc, ended = reap(pid, 30)
      local said = front == "cli" and H.slurp(err) or H.slurp(out)
      for _, f in ipairs(tmp) do os.remove(f) end
      os.remove(pidfile)
      os.remove(out)
      os.remove(err)
      assert.is_true(ended)
      if front == "cli" then
        assert.equal(143, rc)
      else
        assert.matches("error interrupted", said)
      end
      assert.is_true(waitfor(function() return gone(sleeper) end, 20))
    end)
  end
end)

describe("a caller that ignores SIGCHLD", function()
  local pre = 'local signal = require "posix.signal"\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)'
  local post = 'print("after " .. tostring(signal.signal(signal.SIGCHLD, signal.SIG_IGN) == signal.SIG_IGN))'
  local wrap = H.interp .. " " .. FIX .. "ignchld.lua"

  for _, front in ipairs(FRONTS) do
    it("still gets a dead worker's exit status, with " .. front, function()
      local rc, out, err = run(front, "exit2.lua",
        {n = 2, workers = 1, chunk = 1, pre = pre, post = post, wrap = wrap})
      if front == "cli" then
        assert.equal(1, rc)
        assert.equal("2\n", out)
        assert.matches("worker %d+ exited with status 2", err)
      else
        assert.matches("^error item 1: worker %d+ exited with status 2", out)
        assert.matches("\nafter true\n$", out) -- as the caller left it
      end
    end)
  end
end)

describe("job:cancel()", function()
  it("reaps the workers it kills before it returns", function()
    H.using(lpar.pool(2), function(p)
      local flag = tmpname()
      local j = p:submit(function(x)
        local f = io.open(flag, "a")
        f:write(x, "\n")
        f:close()
        require("posix.unistd").sleep(60)
        return x
      end, {1, 2}, {chunksize = 1})
      assert.is_true(waitfor(function()
        j:done()
        local s = H.slurp(flag)
        return s ~= nil and select(2, s:gsub("\n", "")) == 2
      end, 30))
      local before = p:pids()
      assert.is_true(j:cancel())
      os.remove(flag)
      local after = {}
      for _, pid in ipairs(p:pids()) do after[pid] = true end
      local killed = 0
      for _, pid in ipairs(before) do
        if not after[pid] then
          killed = killed + 1
          assert.is_false(H.alive(pid)) -- reaped: not even a zombie
        end
      end
      assert.equal(2, killed)
      p:close()
      assert.same({}, H.children())
    end)
  end)
end)
