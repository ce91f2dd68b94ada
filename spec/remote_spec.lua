-- Workers on other hosts: lpar --worker agents at the end of ssh and srun
-- streams (sshd hosts on loopback ports and an emulated Slurm cluster, see
-- spec/hosts.lua), for the CLI's -S and for lpar.pool{hosts = ...}.
local H = require "spec.helper"
local hosts = require "spec.hosts"
local dirent = require "posix.dirent"
local signal = require "posix.signal"
local unistd = require "posix.unistd"

local function abs(path)
  if path:sub(1, 1) == "/" then return path end
  return unistd.getcwd() .. "/" .. path:gsub("^%./", "")
end

local lparbin = abs(H.cli)
local q = H.quote

-- The names of the files in dir.
local function names(dir)
  local t = {}
  for name in dirent.files(dir) do
    if name ~= "." and name ~= ".." then t[#t + 1] = name end
  end
  return t
end

-- Processes whose command line runs this build's agent.
local function agents()
  local t = {}
  for name in dirent.files("/proc") do
    local pid = tonumber(name)
    local cmd = pid and H.slurp("/proc/" .. name .. "/cmdline")
    if cmd and cmd:find(lparbin .. "\0--worker", 1, true) then
      local st = H.slurp("/proc/" .. name .. "/stat")
      if st and st:match(".*%) (%S)") ~= "Z" then t[#t + 1] = pid end
    end
  end
  return t
end

-- A script whose items note where they ran (a file per item in arg[2]:
-- <host>.<agent pid>.<worker pid>.<item>) and take 'secs' each. With
-- 'want' (host names), no item returns before each of those hosts has
-- started one (for up to 60 s): on a loaded machine a host that connects
-- late still gets work before the run is over.
local function noting(secs, want)
  return ([[
local unistd = require "posix.unistd"
local time = require "posix.time"
local dir, want = arg[2], {%s}
local function started(host)
  for name in require("posix.dirent").files(dir) do
    if name:sub(1, #host + 1) == host .. "." then return true end
  end
  return false
end
local function waitall()
  local t = time.clock_gettime(time.CLOCK_MONOTONIC).tv_sec + 60
  for _, host in ipairs(want) do
    while not started(host) and time.clock_gettime(time.CLOCK_MONOTONIC).tv_sec < t do
      time.nanosleep({tv_sec = 0, tv_nsec = 10000000})
    end
  end
end
return function(x)
  local host = os.getenv("LPAR_TEST_HOST") or "here"
  local f = assert(io.open(("%%s/%%s.%%d.%%d.%%s"):format(dir, host, unistd.getppid(),
                                                   unistd.getpid(), x), "w"))
  f:close()
  if #want > 0 then waitall() end
  if %g > 0 then time.nanosleep({tv_sec = 0, tv_nsec = math.floor(%g * 1e9)}) end
  return x .. "\t" .. #x
end
]]):format(want and ('"' .. table.concat(want, '", "') .. '"') or "", secs, secs)
end

describe("hosts", function()
  local ssh, slurm
  local down = {}
  local tmp = H.tmpfiles(after_each)

  lazy_setup(function()
    local why, unavailable
    ssh, why, unavailable = hosts.ssh(3)
    down.ssh = not ssh and {why, unavailable}
    slurm, why, unavailable = hosts.slurm(3)
    down.slurm = not slurm and {why, unavailable}
  end)
  lazy_teardown(function() assert(hosts.stopall()) end)

  local function up(...) return hosts.up(down, pending, ...) end

  -- -S options for the ssh hosts, 'n' workers each
  local function sshopts(n, list)
    local t = {}
    for _, h in ipairs(list or ssh.hosts) do
      t[#t + 1] = "-S " .. q(n .. "/" .. ssh.launch[h])
    end
    return table.concat(t, " ") .. " --remote-lpar " .. q(lparbin)
  end

  local function items(n, path)
    local t = {}
    for i = 1, n do t[i] = ("item-%04d"):format(i) end
    return H.writefile(path or tmp(), table.concat(t, "\n") .. "\n")
  end

  local function expected(n)
    local t = {}
    for i = 1, n do t[i] = ("item-%04d\t9\n"):format(i) end
    return table.concat(t)
  end

  -- which hosts ran items, from the files noting() leaves
  local function seen(dir)
    local t = {}
    for _, name in ipairs(names(dir)) do t[name:match("^([^.]+)")] = true end
    return t
  end

  -- Wait until items ran on each host of 'want' (names h1...); returns
  -- the pid of the agent that ran them on each, and the set of pids of
  -- the agents and workers seen.
  local function running(dir, want)
    local agentof, pids = {}, {}
    local ok = H.waitfor(function()
      for _, name in ipairs(names(dir)) do
        local h, agent, worker = name:match("^(h%d)%.(%d+)%.(%d+)%.")
        if h then
          agentof[h] = tonumber(agent)
          pids[tonumber(agent)], pids[tonumber(worker)] = true, true
        end
      end
      for _, h in ipairs(want) do
        if not agentof[h] then return false end
      end
      return true
    end, 60)
    assert.is_true(ok, "no item ran on " .. table.concat(want, " and "))
    return agentof, pids
  end

  -- What a CLI started by H.spawncli wrote, and how it ended.
  local function finish(p)
    local out = H.readuntil(p.stdout, function() return false end, 120)
    local err = H.readuntil(p.stderr, function() return false end, 5)
    local how, code = H.waitexit(p.pid, 60)
    H.closeall(p)
    return out, err, how, code
  end

  -- Whether the pids and every agent of this build are gone in time.
  local function allgone(pids)
    return H.waitfor(function()
      for pid in pairs(pids) do
        if H.alive(pid) then return false end
      end
      return #agents() == 0
    end, 30)
  end

  it("gives the bytes of a local run, in order, with every host seen", function()
    if not up("ssh") then return end
    local input = items(600)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar(q(H.writefile(tmp() .. ".lua", noting(0.002))) .. " " ..
                                q(input) .. " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(600), out)
    H.rmdir(dir)
    dir = H.tmpdir()
    local script = H.writefile(tmp() .. ".lua", noting(0.002, {"h1", "h2", "h3"}))
    rc, out, err = H.lpar(sshopts(2) .. " " .. q(script) .. " " .. q(input) .. " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(600), out)
    assert.same({h1 = true, h2 = true, h3 = true}, seen(dir))
    assert.equal(600, #names(dir))
    H.rmdir(dir)
  end)

  it("keeps stray output of f on the agent out of the results", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", [[
return function(x)
  print("printed", x)
  io.stdout:write("written ", x, "\n")
  io.write("io.write ", x, "\n")
  return x
end
]])
    local input = H.writefile(tmp(), "a\nb\nc\nd\n")
    local rc, out, err = H.lpar(sshopts(1, {"h1"}) .. " " .. q(script) .. " " .. q(input), nil, 120)
    assert.equal(0, rc, err)
    assert.equal("a\nb\nc\nd\n", out)
    assert.matches("printed\ta", err, 1, true)
    assert.matches("written d", err, 1, true)
  end)

  it("runs a pool's jobs on the hosts: map, submit and wait", function()
    if not up("ssh") then return end
    local code = ([[
package.cpath = %q .. "/?.so;" .. package.cpath
local lpar = require "lpar"
local pool = lpar.pool{hosts = {"2/" .. %q, "1/" .. %q}, remote_lpar = %q}
local t = {}
for i = 1, 300 do t[i] = i end
local k = 3
local r = pool:map(function(x) return x * k, os.getenv("LPAR_TEST_HOST") end, t)
for i = 1, 300 do assert(r[i] == 3 * i, "item " .. i) end
local job = pool:submit(function(x) return os.getenv("LPAR_TEST_HOST") end, t)
local names = job:wait()
local seen = {}
for i = 1, 300 do seen[names[i] ] = true end
assert(seen.h1 and seen.h2, "hosts seen: " .. tostring(seen.h1) .. " " .. tostring(seen.h2))
local ok, e = pcall(pool.map, pool, function(x) if x == 7 then error("seven") end return x end, t)
assert(not ok and tostring(e):match("item 7: .*seven"), tostring(e))
print("ok")
pool:close()
]]):format(abs(H.build), ssh.launch.h1, ssh.launch.h2, lparbin)
    local rc, out, err = H.run("timeout 120 lua5.4 " .. q(H.writefile(tmp() .. ".lua", code)))
    assert.equal(0, rc, err)
    assert.equal("ok\n", out)
  end)

  it("runs the items of an agent killed mid-run elsewhere, each once", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.02, {"h2"}))
    local input = items(300)
    local dir = H.tmpdir()
    local p = H.spawncli({"-S", "1/" .. ssh.launch.h1, "-S", "1/" .. ssh.launch.h2,
                          "-S", "1/" .. ssh.launch.h3, "--remote-lpar", lparbin,
                          script, input, dir})
    signal.kill(running(dir, {"h2"}).h2, signal.SIGKILL)
    local out, err, how, code = finish(p)
    assert.equal("exited", how)
    assert.equal(0, code, err)
    assert.equal(expected(300), out)
    assert.matches("host '1/" .. ssh.launch.h2:gsub("%p", "%%%0") .. "' was lost", err)
    H.rmdir(dir)
  end)

  it("takes a stopped agent as lost within seconds, and the run completes", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.02, {"h3"}))
    local input = items(400)
    local dir = H.tmpdir()
    local p = H.spawncli({"-S", "1/" .. ssh.launch.h1, "-S", "1/" .. ssh.launch.h3,
                          "--remote-lpar", lparbin, script, input, dir})
    local victim = running(dir, {"h3"}).h3
    signal.kill(victim, signal.SIGSTOP)
    local out, err, how, code = finish(p)
    signal.kill(victim, signal.SIGCONT) -- it finds its stream gone, and leaves
    assert.equal("exited", how)
    assert.equal(0, code, err)
    assert.equal(expected(400), out)
    assert.matches("sent nothing for 5 s", err, 1, true)
    assert.is_true(H.waitfor(function() return not H.alive(victim) end, 30),
                   "the stopped agent is still there once continued")
    H.rmdir(dir)
  end)

  it("leaves out a host that cannot start, and runs on the others", function()
    if not up("ssh") then return end
    -- a second's work: the bad hosts are found out long before the end
    local script = H.writefile(tmp() .. ".lua", noting(0.005))
    local input = items(200)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar("-S 1/no-such-command-of-lpar -S " .. q("1/" .. ssh.launch.h1) ..
                                " -S " .. q("1/ssh -F " .. ssh.config .. " no-such-host.invalid") ..
                                " --remote-lpar " .. q(lparbin) .. " " .. q(script) .. " " ..
                                q(input) .. " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(200), out)
    assert.matches("host '1/no-such-command-of-lpar' is left out", err, 1, true)
    assert.matches("no-such-host.invalid' is left out", err, 1, true)
    assert.same({h1 = true}, seen(dir))
    H.rmdir(dir)
    -- with no host that works, the run fails and says why
    rc, out, err = H.lpar("-S 1/no-such-command-of-lpar " .. q(script) .. " " .. q(input) ..
                          " " .. q(H.tmpdir()), nil, 120)
    assert.is_not.equal(0, rc)
    assert.equal("", out)
    assert.matches("no host can run workers", err, 1, true)
  end)

  it("refuses an agent of another protocol version, naming both", function()
    if not up("ssh") then return end
    -- an agent that says HELLO as protocol 99 would, then waits
    local fake = H.writefile(tmp() .. ".lua", [[
local hello = "LPAR" .. string.pack("<I4I4I4I4", 99, 504, 8, 8) .. ("lpar 9.9.9" .. ("\0"):rep(22))
io.stdout:write(string.pack("<I4I4I8", 8, 2, #hello) .. hello .. "\n")
io.stdout:flush()
io.stdin:read("a")
]])
    local script = H.writefile(tmp() .. ".lua", noting(0))
    local input = items(50)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar("-S " .. q("1/" .. ssh.launch.h1 .. " lua5.4 " .. fake .. " #") ..
                                " --remote-lpar " .. q(lparbin) .. " " .. q(script) .. " " ..
                                q(input) .. " " .. q(dir), nil, 120)
    assert.is_not.equal(0, rc)
    assert.equal("", out)
    assert.matches("its agent is lpar 9.9.9 (protocol 99, Lua 5.4", err, 1, true)
    assert.matches("this is lpar %d+%.%d+%.%d+ %(protocol 1, Lua 5%.4", err)
    assert.matches("no host can run workers", err, 1, true)
    assert.same({}, names(dir))
    H.rmdir(dir)
  end)

  it("leaves no agent and no worker on any host when the parent is killed", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.05))
    local input = items(2000)
    local dir = H.tmpdir()
    local p = H.spawncli({"-S", "2/" .. ssh.launch.h1, "-S", "2/" .. ssh.launch.h2,
                          "--remote-lpar", lparbin, script, input, dir})
    local _, pids = running(dir, {"h1", "h2"})
    assert.is_true(#agents() >= 2)
    signal.kill(p.pid, signal.SIGKILL)
    H.waitexit(p.pid, 30)
    H.closeall(p)
    assert.is_true(allgone(pids), "agents or workers are left")
    H.rmdir(dir)
  end)

  it("runs on Slurm nodes through srun, with and without -u", function()
    if not up("slurm") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.002))
    local input = items(300)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar("-S " .. q("1/srun -N1 -n1 -w n1") .. " -S " ..
                                q("1/srun -u -N1 -n1 -w n2") .. " --remote-lpar " .. q(lparbin) ..
                                " " .. q(script) .. " " .. q(input) .. " " .. q(dir), nil, 180)
    assert.equal(0, rc, err)
    assert.equal(expected(300), out)
    H.rmdir(dir)
  end)
  it("takes hosts from --hosts FILE and comma lists, and the joblog names them", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.002, {"h1", "h2", "h3"}))
    local input = items(300)
    local list = H.writefile(tmp(), "# the test hosts\n\n1/" .. ssh.launch.h1 .. "  # first\n")
    local log = tmp()
    os.remove(log)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar("--hosts " .. q(list) .. " -S " ..
                                q("1/" .. ssh.launch.h2 .. ",1/" .. ssh.launch.h3) ..
                                " --remote-lpar " .. q(lparbin) .. " --joblog " .. q(log) .. " " ..
                                q(script) .. " " .. q(input) .. " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(300), out)
    local specs, lines = {}, 0
    for line in io.lines(log) do
      if not line:match("^#") then
        local host = select(6, table.unpack((function()
          local t = {}
          for f in (line .. "\t"):gmatch("([^\t]*)\t") do t[#t + 1] = f end
          return t
        end)()))
        specs[host] = true
        lines = lines + 1
      end
    end
    assert.equal(300, lines)
    local want = {}
    for _, h in ipairs({"h1", "h2", "h3"}) do want["1/" .. ssh.launch[h]] = true end
    for spec in pairs(specs) do assert.is_true(want[spec], "joblog names " .. spec) end
    assert.same({h1 = true, h2 = true, h3 = true}, seen(dir))
    H.rmdir(dir)
  end)

  it("goes on with --resume after the parent was killed: each item once", function()
    if not up("ssh") then return end
    local script = H.writefile(tmp() .. ".lua", noting(0.01))
    local input = items(400)
    local log, outf = tmp(), tmp()
    os.remove(log)
    os.remove(outf)
    local dir = H.tmpdir()
    local args = {"-S", "1/" .. ssh.launch.h1, "-S", "1/" .. ssh.launch.h2, "--remote-lpar", lparbin,
                  "--joblog", log, "-o", outf, script, input, dir}
    local p = H.spawncli(args)
    assert.is_true(H.waitfor(function() return #names(dir) >= 100 end, 60), "no progress")
    signal.kill(p.pid, signal.SIGKILL)
    H.waitexit(p.pid, 30)
    H.closeall(p)
    local rc, out, err = H.lpar("-S " .. q("1/" .. ssh.launch.h1) .. " -S " .. q("1/" .. ssh.launch.h2) ..
                                " --remote-lpar " .. q(lparbin) .. " --joblog " .. q(log) ..
                                " -o " .. q(outf) .. " --resume " .. q(script) .. " " .. q(input) ..
                                " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal("", out)
    assert.equal(expected(400), H.readfile(outf))
    H.rmdir(dir)
  end)

  -- Ctrl-C, SIGTERM, and the reader of the output gone
  for _, case in ipairs({{"Ctrl-C", signal.SIGINT, 130}, {"SIGTERM", signal.SIGTERM, 143},
                         {"a closed output", nil, 141}}) do
    it("stops every host on " .. case[1] .. ", leaving no agent or worker", function()
      if not up("ssh") then return end
      local script = H.writefile(tmp() .. ".lua", noting(0.05))
      local input = items(2000)
      local dir = H.tmpdir()
      local p = H.spawncli({"-S", "2/" .. ssh.launch.h1, "-S", "2/" .. ssh.launch.h3,
                            "--remote-lpar", lparbin, script, input, dir})
      local _, pids = running(dir, {"h1", "h3"})
      if case[2] then
        signal.kill(p.pid, case[2])
      else
        unistd.close(p.stdout)
        p.stdout = nil
      end
      local err = H.readuntil(p.stderr, function() return false end, 60)
      local how, code = H.waitexit(p.pid, 60)
      H.closeall(p)
      assert.equal("exited", how)
      assert.equal(case[3], code, err)
      assert.is_true(allgone(pids), "agents or workers are left")
      H.rmdir(dir)
    end)
  end

  it("never blocks a frame loop's done() while a host is stopped", function()
    if not up("ssh") then return end
    local dir = H.tmpdir()
    local code = ([[
package.cpath = %q .. "/?.so;" .. package.cpath
local lpar = require "lpar"
local unistd = require "posix.unistd"
local signal = require "posix.signal"
local time = require "posix.time"
local function now()
  local t = time.clock_gettime(time.CLOCK_MONOTONIC)
  return t.tv_sec + t.tv_nsec * 1e-9
end
local pool = lpar.pool{hosts = {"1/" .. %q, "1/" .. %q}, remote_lpar = %q}
local dir = %q
-- each host notes its agent's pid
local t = {}
for i = 1, 40 do t[i] = i end
local job = pool:submit(function(x)
  local f = io.open(dir .. "/" .. os.getenv("LPAR_TEST_HOST") .. "." .. unistd.getppid(), "w")
  f:close()
  time.nanosleep({tv_sec = 0, tv_nsec = 100000000})
  return x
end, t)
local agent
while not agent do
  for name in require("posix.dirent").files(dir) do
    local pid = name:match("^h2%%.(%%d+)$")
    if pid then agent = tonumber(pid) end
  end
  assert(not job:done(), "done before h2 ran anything")
  time.nanosleep({tv_sec = 0, tv_nsec = 10000000})
end
signal.kill(agent, signal.SIGSTOP)
-- polled while h2 is stopped: every call returns at once, and the job
-- finishes once h2 is found lost
local calls, slowest, t0 = 0, 0, now()
while not job:done() do
  local a = now()
  job:done()
  slowest = math.max(slowest, now() - a)
  calls = calls + 1
  time.nanosleep({tv_sec = 0, tv_nsec = 5000000})
  assert(now() - t0 < 60, "the job never finished")
end
signal.kill(agent, signal.SIGCONT)
local r = job:wait()
for i = 1, 40 do assert(r[i] == i) end
print(calls > 100, slowest < 3)
pool:close()
]]):format(abs(H.build), ssh.launch.h1, ssh.launch.h2, lparbin, dir)
    local rc, out, err = H.run("timeout 120 lua5.4 " .. q(H.writefile(tmp() .. ".lua", code)))
    assert.equal(0, rc, err)
    assert.equal("true\ttrue\n", out)
    assert.matches("sent nothing for 5 s", err, 1, true)
    H.rmdir(dir)
  end)

  it("yields the host of each item from pool:imap", function()
    if not up("ssh") then return end
    local code = ([[
package.cpath = %q .. "/?.so;" .. package.cpath
local lpar = require "lpar"
local h1, h2 = "1/" .. %q, "1/" .. %q
local pool = lpar.pool{hosts = {h1, h2, "1/:"}, remote_lpar = %q}
local t = {}
for i = 1, 200 do t[i] = i end
local n = 0
for i, v, e, host in pool:imap(function(x)
  require("posix.time").nanosleep({tv_sec = 0, tv_nsec = 2000000})
  return os.getenv("LPAR_TEST_HOST") or "here"
end, t) do
  n = n + 1
  assert(e == nil)
  local want = v == "h1" and h1 or v == "h2" and h2 or nil
  assert(host == want, ("item %%d ran on %%s, imap says %%s"):format(i, v, tostring(host)))
end
print(n)
pool:close()
]]):format(abs(H.build), ssh.launch.h1, ssh.launch.h2, lparbin)
    local rc, out, err = H.run("timeout 120 lua5.4 " .. q(H.writefile(tmp() .. ".lua", code)))
    assert.equal(0, rc, err)
    assert.equal("200\n", out)
  end)

  it("enforces --timeout and --max-memory on the hosts, as locally", function()
    local script = H.writefile(tmp() .. ".lua", [[
return function(x)
  x = tonumber(x)
  if x == 3 then while true do end end
  if x == 5 then local t = {} for i = 1, 1e8 do t[i] = i end end
  if x == 7 then os.exit(3) end
  return x
end
]])
    local input = H.writefile(tmp(), "1\n2\n3\n4\n5\n6\n7\n8\n")
    local rc, out, err = H.lpar("--timeout 1 --max-memory 64M -S 2/env --remote-lpar " ..
                                q(lparbin) .. " " .. q(script) .. " " .. q(input), nil, 120)
    assert.equal(1, rc, err)
    assert.equal("1\n2\n4\n6\n8\n", out)
    assert.matches("line 3 (\"3\"): timed out after 1", err, 1, true)
    assert.matches("line 5 (\"5\"): not enough memory", err, 1, true)
    assert.matches('line 7 %("7"%): worker %d+ exited with status 3', err)
    assert.matches("3 of 8 items failed", err, 1, true)
  end)

  it("cancels a pool's job on hosts: their workers stop it, and the pool goes on", function()
    local dir = H.tmpdir()
    local code = ([[
package.cpath = %q .. "/?.so;" .. package.cpath
local lpar = require "lpar"
local time = require "posix.time"
local dirent = require "posix.dirent"
local dir = %q
local pool = lpar.pool{hosts = {"2/env"}, remote_lpar = %q}
local t = {}
for i = 1, 20 do t[i] = i end
-- each item notes its start, takes 5 s, then notes its end
local job = pool:submit(function(x)
  io.open(dir .. "/started." .. x, "w"):close()
  time.nanosleep({tv_sec = 5, tv_nsec = 0})
  io.open(dir .. "/done." .. x, "w"):close()
  return x
end, t)
local function count(what)
  local n = 0
  for name in dirent.files(dir) do
    if name:match("^" .. what .. "%%.") then n = n + 1 end
  end
  return n
end
while count("started") < 2 do time.nanosleep({tv_sec = 0, tv_nsec = 10000000}) end
job:cancel()
local ok, e = pcall(job.wait, job)
assert(not ok and tostring(e):match("cancelled"), tostring(e))
-- the next job runs on the same host at once: the cancelled items were
-- stopped there, none of them ended
local r = pool:map(function(x) return x + 1 end, t)
for i = 1, 20 do assert(r[i] == i + 1) end
print(count("done"))
pool:close()
]]):format(abs(H.build), dir, lparbin)
    local rc, out, err = H.run("timeout 120 lua5.4 " .. q(H.writefile(tmp() .. ".lua", code)))
    assert.equal(0, rc, err)
    assert.equal("0\n", out)
    H.rmdir(dir)
  end)

  it("runs again, elsewhere, the items of a host that sent a frame that does not decode", function()
    -- its first start: an agent that answers its first chunk with a RESULT
    -- whose value does not decode; later starts run the real agent
    local marker = tmp()
    os.remove(marker)
    local fake = H.writefile(tmp() .. ".lua", [[
local unistd = require "posix.unistd"
local marker, dir = arg[1], arg[2]
if io.open(marker) then
  unistd.execp(arg[3], table.move(arg, 3, #arg, 0, {}))
end
io.open(marker, "w"):close()
local function frame(t, count, payload)
  io.stdout:write(string.pack("<I4I4I8", t, count, #payload), payload, "\n")
  io.stdout:flush()
end
local name = "lpar 0.1.0" .. ("\0"):rep(22)
frame(8, 1, "LPAR" .. string.pack("<I4I4I4I4", 1, 504, 8, 8) .. name) -- HELLO
local setup = io.stdin:read(16)
io.stdin:read((string.unpack("<I8", setup, 9)))
frame(5, 1, "") -- READY
while true do
  local h = io.stdin:read(16)
  if not h then return end
  local t, count, len = string.unpack("<I4I4I8", h)
  local p = len > 0 and io.stdin:read(len) or ""
  if t == 2 then -- ITEMS: a value tag that does not exist
    io.open(dir .. "/fake.0.0.0", "w"):close() -- the items may end now
    frame(3, count, string.pack("<I8I8", (string.unpack("<I8", p)), 1000) .. ("\254"):rep(3))
  end
end
]])
    local input = items(40)
    local dir = H.tmpdir()
    local rc, out, err = H.lpar("-S " .. q("1/lua5.4 " .. fake .. " " .. marker .. " " .. dir) ..
                                " -S 1/env --remote-lpar " .. q(lparbin) .. " " ..
                                q(H.writefile(tmp() .. ".lua", noting(0.05, {"fake"}))) .. " " ..
                                q(input) .. " " .. q(dir), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(40), out)
    assert.matches("was lost (its command broke the protocol (bad value tag", err, 1, true)
    os.remove(marker)
    H.rmdir(dir)
  end)

  -- a host whose agent runs on this machine: the items' own children go
  -- too, whether the parent is told to stop or killed
  for _, case in ipairs({{"SIGTERM", signal.SIGTERM}, {"kill -9", signal.SIGKILL}}) do
    it("leaves no child of an item behind on " .. case[1] .. " of the parent", function()
      local dir = H.tmpdir()
      local script = H.writefile(tmp() .. ".lua", [[
return function(s)
  os.execute("echo $$ >> " .. arg[2] .. "/kids; exec sleep 1000")
  return s
end
]])
      local p = H.spawncli({"-S", "2/env", "--remote-lpar", lparbin, script, items(20), dir})
      local kids
      assert.is_true(H.waitfor(function()
        kids = H.pidsof(dir .. "/kids")
        return #kids >= 2
      end, 60), "the items did not start")
      signal.kill(p.pid, case[2])
      H.waitexit(p.pid, 60)
      H.closeall(p)
      assert.is_true(H.waitfor(function() return H.anyalive(kids) == nil end, 30),
                     "an item's child is left: " .. tostring(H.anyalive(kids)))
      H.rmdir(dir)
    end)
  end

  it("leaves out a host lost again and again, and runs its items elsewhere", function()
    -- on the host whose environment says BAD, every item kills its agent
    local script = H.writefile(tmp() .. ".lua", [[
local signal = require "posix.signal"
local unistd = require "posix.unistd"
return function(x)
  if os.getenv("LPAR_BAD_HOST") then signal.kill(unistd.getppid(), signal.SIGKILL) end
  require("posix.time").nanosleep({tv_sec = 0, tv_nsec = 20000000})
  return x .. "\t" .. #x
end
]])
    -- 10 s of items: the bad host starts again after 1 s, then 2 s
    local input = items(500)
    local rc, out, err = H.lpar("-S " .. q("1/env LPAR_BAD_HOST=1") .. " -S 1/env --remote-lpar " ..
                                q(lparbin) .. " " .. q(script) .. " " .. q(input), nil, 120)
    assert.equal(0, rc, err)
    assert.equal(expected(500), out)
    local lost = select(2, err:gsub("host '1/env LPAR_BAD_HOST=1' was lost", ""))
    assert.equal(2, lost, err)
    assert.matches("host '1/env LPAR_BAD_HOST=1' is left out: its command killed by signal 9 " ..
                   "(SIGKILL), again and again", err, 1, true)
  end)

  describe("behind a network partition", function()
    local cut, cutdown
    lazy_setup(function()
      local why, unavailable
      cut, why, unavailable = hosts.ssh(1, {netns = true})
      cutdown = not cut and {why, unavailable}
    end)
    lazy_teardown(function() if cut then assert(hosts.stop(cut)) end end)

    it("takes a host cut off as lost; its agent leaves by itself", function()
      if not up("ssh") then return end
      if not hosts.up({netns = cutdown}, pending, "netns") then return end
      local script = H.writefile(tmp() .. ".lua", noting(0.02, {"h1", "h2"}))
      local input = items(400)
      local dir = H.tmpdir()
      -- h1 is the host in its own network namespace, h2 a loopback one
      local p = H.spawncli({"-S", "1/" .. cut.launch.h1, "-S", "1/" .. ssh.launch.h2,
                            "--remote-lpar", lparbin, script, input, dir})
      local agentof = running(dir, {"h1", "h2"})
      assert.is_true(cut.partition.h1())
      local out, err, how, code = finish(p)
      assert.equal("exited", how)
      assert.equal(0, code, err)
      assert.equal(expected(400), out)
      assert.matches("host '1/" .. cut.launch.h1:gsub("%p", "%%%0") .. "' was lost", err)
      -- it hears nothing from its parent any more: it leaves within its
      -- limit (60 s), killing its worker
      assert.is_true(H.waitfor(function() return not H.alive(agentof.h1) end, 120),
                     "the cut-off agent is still there")
      cut.heal.h1()
      H.rmdir(dir)
    end)
  end)

  describe("host specs", function()
    it("are split at commas outside quotes, and take -j as their count", function()
      -- each item says its host's A, its agent and the agent's -j; none
      -- returns before both hosts ran one (for up to 60 s)
      local dir = H.tmpdir()
      local script = H.writefile(tmp() .. ".lua", [[
local unistd = require "posix.unistd"
local time = require "posix.time"
local dir = ]] .. ("%q"):format(dir) .. [[

local function seen(a)
  return io.open(dir .. "/" .. a) ~= nil
end
return function(x)
  io.open(dir .. "/" .. (os.getenv("A") or "-"), "w"):close()
  local t = os.time() + 60
  while not (seen("1,2") and seen("3")) and os.time() < t do
    time.nanosleep({tv_sec = 0, tv_nsec = 10000000})
  end
  local agent = unistd.getppid()
  local f = io.open("/proc/" .. agent .. "/cmdline")
  local cmd = f:read("a")
  f:close()
  return ("%s %d %s"):format(os.getenv("A") or "-", agent, cmd:match("%-j%z(%d+)%z") or "?")
end
]])
      local rc, out, err = H.lpar("-j 3 -S " .. q([[env "A=1,2",env A=3]]) .. " --remote-lpar " ..
                                  q(lparbin) .. " " .. q(script) .. " ::: " .. ("x "):rep(120), nil, 60)
      assert.equal(0, rc, err)
      local values, pids = {}, {}
      for _, line in ipairs(H.lines(out)) do
        local a, pid, j = line:match("^(%S+) (%d+) (%S+)$")
        values[a], pids[pid] = true, true
        assert.equal("3", j)
      end
      assert.same({["1,2"] = true, ["3"] = true}, values)
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.equal(2, n) -- one agent per host
      H.rmdir(dir)
    end)

    it("that are malformed are usage errors, named", function()
      for spec, why in pairs({["2/env 'x"] = "unbalanced ' quote",
                              ["0/ssh node1"] = "the worker count must be 1 to 1024",
                              ["4/"] = "no command to run"}) do
        local rc, out, err = H.lpar("-S " .. q(spec) .. " -e " .. q("function(x) return x end") ..
                                    " ::: a", nil, 30)
        assert.equal(2, rc, spec)
        assert.equal("", out)
        assert.equal("lpar: host '" .. spec .. "': " .. why .. "\n", err)
      end
    end)
  end)

  describe("the agent, lpar --worker", function()
    it("refuses bad arguments", function()
      local rc, out, err = H.lpar("--worker -j 0", nil, 30)
      assert.equal(2, rc)
      assert.equal("", out)
      assert.matches("lpar %-%-worker: %-j wants 1 to %d+ workers, not '0'", err)
      rc, out, err = H.lpar("--worker --bogus", nil, 30)
      assert.equal("", out)
      assert.equal(2, rc)
      assert.matches("unknown argument '--bogus' (usage: lpar --worker [-j N])", err, 1, true)
    end)

    -- the agent, its stdin a pipe this test holds: {pid, stdin, stdout, stderr}
    local function agent() return H.spawncli({"--worker", "-j", "1"}) end

    -- the frames in s (each followed by '\n'): {type, count, payload}
    local function frames(s)
      local t, pos = {}, 1
      while #s - pos + 1 >= 16 do
        local ty, count, len = string.unpack("<I4I4I8", s, pos)
        if #s - pos + 1 < 16 + len then break end
        t[#t + 1] = {ty, count, s:sub(pos + 16, pos + 15 + len)}
        pos = pos + 16 + len
        assert.equal("\n", s:sub(pos, pos), "no newline after a frame")
        pos = pos + 1
      end
      return t
    end

    it("says HELLO first, and leaves when no setup comes", function()
      local a = agent()
      local out = H.readuntil(a.stdout, function(s) return #frames(s) >= 1 end, 30)
      local hello = frames(out)[1]
      assert.equal(8, hello[1]) -- HELLO
      assert.equal(1, hello[2]) -- its workers
      assert.equal("LPAR", hello[3]:sub(1, 4))
      local how, code = H.waitexit(a.pid, 40)
      local err = H.readuntil(a.stderr, function() return false end, 5)
      H.closeall(a)
      assert.equal("exited", how)
      assert.equal(1, code)
      assert.matches("no setup came from the parent", err, 1, true)
    end)

    it("says why it leaves when its parent's stream ends inside a frame", function()
      -- a stream that ends between frames is a parent that left: quietly
      local rc, _, err = H.lpar("--worker -j 1", "", 30)
      assert.equal(0, rc, err)
      assert.equal("", err)
      rc, _, err = H.lpar("--worker -j 1", "garbage\n", 30)
      assert.equal(1, rc)
      assert.equal("lpar --worker: the parent's stream ended inside a frame\n", err)
    end)

    it("refuses a parent of another protocol version, naming both", function()
      local a = agent()
      local out = H.readuntil(a.stdout, function(s) return #frames(s) >= 1 end, 30)
      local versions = frames(out)[1][3]
      -- the parent's versions as protocol 99 would say them
      local theirs = versions:sub(1, 4) .. string.pack("<I4", 99) .. versions:sub(9)
      local setup = theirs .. string.pack("<I8I8I8I4I4I4", 0, 0, 0, 0, 0, 0)
      unistd.write(a.stdin, string.pack("<I4I4I8", 9, 0, #setup) .. setup)
      local got = H.readuntil(a.stdout, function(s) return #frames(s) >= 1 end, 30)
      local how, code = H.waitexit(a.pid, 30)
      local err = H.readuntil(a.stderr, function() return false end, 5)
      H.closeall(a)
      assert.equal("exited", how)
      assert.equal(1, code)
      local e = frames(got)[1]
      assert.equal(4, e[1]) -- ERROR, for index 0
      assert.matches("its parent is lpar [%d.]+ %(protocol 99, Lua 5%.4", e[3])
      assert.matches("this is lpar [%d.]+ %(protocol 1, Lua 5%.4", e[3])
      assert.matches("its parent is lpar", err, 1, true)
    end)

    it("leaves, killing its workers, when its parent goes silent", function()
      local a = agent()
      local out = H.readuntil(a.stdout, function(s) return #frames(s) >= 1 end, 30)
      local versions = frames(out)[1][3]
      -- SETUP: versions, no memory limit, no timeout, a silence of 3 s
      -- taken as the parent's end, kind 0, no functions
      local setup = versions .. string.pack("<I8I8I8I4I4I4", 0, 0, 3e9, 0, 0, 0)
      unistd.write(a.stdin, string.pack("<I4I4I8", 9, 0, #setup) .. setup)
      local _, ready = H.readuntil(a.stdout, function(s)
        for _, f in ipairs(frames(s)) do
          if f[1] == 5 and f[2] == 1 then return true end -- READY
        end
        return false
      end, 30)
      assert.is_true(ready, "no READY after SETUP")
      local workers
      assert.is_true(H.waitfor(function()
        workers = {}
        for name in dirent.files("/proc") do
          local st = tonumber(name) and H.slurp("/proc/" .. name .. "/stat")
          if st and tonumber(st:match(".*%) %S (%d+)")) == a.pid then workers[#workers + 1] = tonumber(name) end
        end
        return #workers == 1
      end, 30), "its worker did not start")
      -- nothing more is sent: it leaves after that limit
      local how, code = H.waitexit(a.pid, 40)
      local err = H.readuntil(a.stderr, function() return false end, 5)
      H.closeall(a)
      assert.equal("exited", how)
      assert.equal(0, code)
      assert.matches("nothing came from the parent for 3 s: leaving", err, 1, true)
      assert.is_true(H.waitfor(function() return not H.alive(workers[1]) end, 30), "its worker is left")
    end)
  end)
end)

