-- The test hosts of the remote specs (spec/hosts.lua), brought up for real:
-- sshd hosts on loopback ports and a Slurm cluster of emulated nodes.
local H = require "spec.helper"
local hosts = require "spec.hosts"
local dirent = require "posix.dirent"
local stat = require "posix.sys.stat"
local unistd = require "posix.unistd"

-- SLURM_CONF as the suite found it
local outer_conf = os.getenv("SLURM_CONF")

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Whether a process runs (exists and is not a zombie).
local function running(pid)
  local s = H.slurp("/proc/" .. pid .. "/stat")
  return s ~= nil and s:match(".*%) (%S)") ~= "Z"
end

local function cmdline(pid)
  return (H.slurp("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
end

-- Pids of the processes below 'root' in the process tree.
local function descendants(root)
  local parent = {}
  for name in dirent.files("/proc") do
    local st = tonumber(name) and H.slurp("/proc/" .. name .. "/stat")
    local ppid = st and st:match(".*%) %S (%d+)")
    if ppid then parent[tonumber(name)] = tonumber(ppid) end
  end
  local list = {}
  for pid in pairs(parent) do
    local p = parent[pid]
    while p and p ~= root do p = parent[p] end
    if p == root then list[#list + 1] = pid end
  end
  return list
end

-- Random bytes, every byte value included.
local function noise(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(n)
  f:close()
  return s
end

-- Local addresses of the TCP sockets a process listens on, as /proc/net/tcp
-- writes them ("0100007F:1F90" is 127.0.0.1:8080).
local function listens(pid)
  local inodes = {}
  local fds = "/proc/" .. pid .. "/fd"
  for name in dirent.files(fds) do
    local link = unistd.readlink(fds .. "/" .. name)
    local inode = link and link:match("^socket:%[(%d+)%]$")
    if inode then inodes[inode] = true end
  end
  local addrs = {}
  for _, path in ipairs({"/proc/net/tcp", "/proc/net/tcp6"}) do
    for line in (H.slurp(path) or ""):gmatch("[^\n]+") do
      local locl, st, inode = line:match("^%s*%d+:%s+(%S+)%s+%S+%s+(%x%x)%s+%S+%s+%S+%s+%S+%s+%S+%s+%S+%s+(%d+)")
      if st == "0A" and inodes[inode] then addrs[#addrs + 1] = locl end
    end
  end
  return addrs
end

describe("test hosts", function()
  local ssh, slurm
  local down = {} -- kind -> {why, unavailable}

  lazy_setup(function()
    local t = H.now()
    local why, unavailable
    ssh, why, unavailable = hosts.ssh(3)
    down.ssh = not ssh and {why, unavailable}
    local t_ssh = H.now() - t
    t = H.now()
    slurm, why, unavailable = hosts.slurm(3)
    down.slurm = not slurm and {why, unavailable}
    io.stderr:write(string.format("test hosts up: ssh %.2f s, slurm %.2f s\n", t_ssh, H.now() - t))
  end)

  -- Whether the hosts of these kinds are up: pending where this machine
  -- cannot have them, an error where they failed to start.
  local function up(...) return hosts.up(down, pending, ...) end

  lazy_teardown(function() assert(hosts.stopall()) end)

  describe("over ssh", function()
    it("runs a command on each host, which sees its own name", function()
      if not up("ssh") then return end
      assert.same({"h1", "h2", "h3"}, ssh.hosts)
      for _, h in ipairs(ssh.hosts) do
        local rc, out, err = H.run("timeout 60 " .. ssh.launch[h] .. " 'echo $LPAR_TEST_HOST'")
        assert.equal(0, rc, err)
        assert.equal(h .. "\n", out)
      end
    end)

    it("passes 1 MiB through stdin and stdout byte for byte", function()
      if not up("ssh") then return end
      local data = noise(1024 * 1024)
      local rc, out, err = H.run("timeout 60 " .. ssh.launch.h2 .. " cat", data)
      assert.equal(0, rc, err)
      assert.equal(#data, #out)
      assert.is_true(data == out)
    end)

    it("reports the exit status of the remote command", function()
      if not up("ssh") then return end
      local rc = H.run("timeout 60 " .. ssh.launch.h3 .. " 'exit 7'")
      assert.equal(7, rc)
    end)
  end)

  describe("under Slurm", function()
    it("runs a step on each node named with -w", function()
      if not up("slurm") then return end
      assert.same({"n1", "n2", "n3"}, slurm.nodes)
      for _, n in ipairs(slurm.nodes) do
        local rc, out, err = H.run("timeout 60 " .. slurm.launch[n] .. " sh -c 'echo $SLURMD_NODENAME'")
        assert.equal(0, rc, err)
        assert.equal(n .. "\n", out)
      end
    end)

    it("passes 1 MiB through a step's stdin and stdout, with and without -u", function()
      if not up("slurm") then return end
      local data = noise(1024 * 1024)
      for _, u in ipairs({"", "-u "}) do
        local rc, out, err = H.run("timeout 60 srun -N1 -n1 -w n1 " .. u .. "cat", data)
        assert.equal(0, rc, err)
        assert.equal(#data, #out)
        assert.is_true(data == out, "srun " .. u .. "changed the bytes")
      end
    end)

    it("sets SLURM_CONF for the spec, and gives it as slurm.env for a command", function()
      if not up("slurm") then return end
      assert.equal(slurm.conf, os.getenv("SLURM_CONF"))
      local rc, out = H.run("env -u SLURM_CONF " .. slurm.env .. " sinfo -h -N -o '%N %t'")
      assert.equal(0, rc)
      assert.equal("n1 idle\nn2 idle\nn3 idle\n", out)
    end)
  end)

  it("runs srun listening on 127.0.0.1 only", function()
    if not up("slurm") then return end
    -- a step that runs until its stdin closes
    local step = io.popen("exec timeout 60 srun -N1 -n1 -w n1 cat >/dev/null", "w")
    local addrs = {}
    assert.is_true(H.waitfor(function()
      for _, pid in ipairs(descendants(unistd.getpid())) do
        if cmdline(pid):match("^srun ") then addrs = listens(pid) end
      end
      return #addrs >= 2
    end, 30))
    step:write("end\n")
    assert.is_true(step:close())
    for _, a in ipairs(addrs) do assert.matches("^0100007F:", a, "srun listens on " .. a) end
  end)

  it("listens on 127.0.0.1 only", function()
    if not up("ssh", "slurm") then return end
    local seen = 0
    for _, p in ipairs(hosts.spawned) do
      if not p.gone and p.name ~= "munged" then -- munged: a unix socket
        local addrs = listens(p.pid)
        assert.is_true(#addrs > 0, p.name .. " listens on no TCP port")
        for _, a in ipairs(addrs) do
          assert.matches("^0100007F:", a, p.name .. " listens on " .. a)
        end
        seen = seen + 1
      end
    end
    assert.equal(3 + 4, seen) -- 3 sshd, slurmctld, 3 slurmd
  end)

  it("stops every daemon and what ran on the hosts, and leaves nothing behind", function()
    if not up("ssh", "slurm") then return end
    -- commands left running in the background, out of their session and
    -- process group; each writes its pid to a file, which the command that
    -- started it waits for (a step's end kills its process group)
    local tmp = H.tmpdir()
    local function start(name)
      local script = "setsid sh -c 'echo $$ >F.tmp && mv F.tmp F && exec sleep 300' " ..
        "</dev/null >/dev/null 2>&1 & i=0; while [ ! -e F ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i + 1)); done"
      return (script:gsub("F", tmp .. "/" .. name))
    end
    local rc, _, err = H.run("timeout 60 ssh -F " .. q(ssh.config) .. " h1 " .. q(start("ssh")))
    assert.equal(0, rc, err)
    rc, _, err = H.run("timeout 60 srun -N1 -n1 -w n3 sh -c " .. q(start("srun")))
    assert.equal(0, rc, err)
    local left = {}
    for _, name in ipairs({"ssh", "srun"}) do
      left[name] = tonumber(H.slurp(tmp .. "/" .. name))
      assert.is_number(left[name], name)
      assert.is_true(H.waitfor(function() return cmdline(left[name]) == "sleep 300 " end, 30))
    end
    H.rmdir(tmp)
    local pids = {}
    for _, p in ipairs(hosts.spawned) do pids[#pids + 1] = p.pid end
    assert.equal(3 + 5, #pids) -- 3 sshd; munged, slurmctld, 3 slurmd
    for _, pid in ipairs(pids) do assert.is_true(running(pid), cmdline(pid)) end
    local dirs = {ssh.dir, slurm.dir}

    assert(hosts.stop(ssh))
    assert(hosts.stop(slurm))

    for _, pid in ipairs(pids) do assert.is_false(running(pid), "pid " .. pid) end
    for name, pid in pairs(left) do assert.is_false(running(pid), name .. " pid " .. pid) end
    for _, d in ipairs(dirs) do assert.is_nil(stat.stat(d), d) end
    assert.equal(outer_conf, os.getenv("SLURM_CONF"))
  end)
end)

describe("test hosts whose spec process is killed", function()
  it("die with it, and the next bring-up sweeps what ran on them", function()
    if unistd.geteuid() ~= 0 then return pending("needs root") end
    local tmp = H.tmpdir()
    -- brings up hosts, leaves a command running on h1 (and checks that it
    -- runs), prints the pids and directories, then waits to be killed
    local prog = [[
      package.path = "./?.lua;" .. package.path
      local hosts = require "spec.hosts"
      local ssh = assert(hosts.ssh(1))
      local slurm = assert(hosts.slurm(1))
      local p = io.popen(ssh.launch.h1 .. " 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!' 2>&1")
      local said = p:read("a")
      local sleeper = assert(tonumber(said), said)
      p:close()
      local function runs()
        local f = io.open("/proc/" .. sleeper .. "/cmdline")
        return f and f:read("a"):match("^sleep%z300")
      end
      local t = os.time() + 30
      while not runs() and os.time() < t do require("posix.time").nanosleep({tv_sec = 0, tv_nsec = 10000000}) end
      assert(runs(), "no sleep 300 on h1")
      for _, d in ipairs(hosts.spawned) do print(d.pid) end
      print("sleeper " .. sleeper)
      print(ssh.dir) print(slurm.dir)
      io.stdout:flush()
      while true do require("posix.time").nanosleep({tv_sec = 1, tv_nsec = 0}) end
    ]]
    local script = string.format("lua5.4 -e %s >%s/out 2>&1 & pid=$!; i=0; " ..
      "while ! grep -q '^/tmp/lpar-slurm' %s/out && kill -0 $pid && [ $i -lt 600 ]; do " ..
      "sleep 0.1; i=$((i + 1)); done; " ..
      "kill -9 $pid; wait $pid; cat %s/out", q(prog), tmp, tmp, tmp)
    local _, out = H.run(script)
    H.rmdir(tmp)
    local pids, dirs = {}, {}
    for line in out:gmatch("[^\n]+") do
      if line:match("^%d+$") then
        pids[#pids + 1] = tonumber(line)
      elseif line:match("^/") then
        dirs[#dirs + 1] = line
      end
    end
    local sleeper = tonumber(out:match("sleeper (%d+)"))
    assert.is_number(sleeper, out)
    assert.equal(1 + 3, #pids, out) -- sshd; munged, slurmctld, slurmd
    assert.matches("^/tmp/lpar%-ssh%-", dirs[1])
    assert.matches("^/tmp/lpar%-slurm%-", dirs[2])
    assert.is_true(H.waitfor(function()
      for _, pid in ipairs(pids) do
        if running(pid) then return false end
      end
      return true
    end, 30), "daemons outlived the process that started them")
    -- the command left on h1 is out of reach of the daemons' deaths, found
    -- by its mark (by this sweep, or by that of a test run beside this one)
    hosts.sweep()
    assert.is_false(running(sleeper))
    for _, d in ipairs(dirs) do assert.is_nil(stat.stat(d), d) end
  end)
end)

describe("a bring-up that cannot work", function()
  it("says why where this machine cannot have test hosts (not root)", function()
    if unistd.geteuid() ~= 0 then return pending("needs root, to drop it") end
    local rc, out, err = H.run("setpriv --reuid=65534 --regid=65534 --clear-groups lua5.4 -e " ..
      q("package.path = './?.lua;' .. package.path; local hosts = require 'spec.hosts';" ..
        " print(hosts.ssh(1)); print(hosts.slurm(1))"))
    assert.equal(0, rc, err)
    assert.equal("nil\tssh: the test hosts need root (sshd logs in as root)\tunavailable\n" ..
      "nil\tslurm: the test hosts need root (slurmd runs as root, munged as munge)\tunavailable\n", out)
  end)
end)

describe("a bring-up that fails halfway", function()
  it("says which daemon failed and stops the others (ssh)", function()
    if unistd.geteuid() ~= 0 then return pending("needs root") end
    local before = #hosts.spawned
    local c, why = hosts.ssh(2, {sshd = "/bin/false"})
    assert.is_nil(c)
    assert.matches("sshd%-h%d exited", why)
    assert.is_true(#hosts.spawned > before)
    for i = before + 1, #hosts.spawned do assert.is_false(running(hosts.spawned[i].pid)) end
  end)

  it("says which daemon failed and stops the others (slurm)", function()
    if unistd.geteuid() ~= 0 then return pending("needs root") end
    local before = #hosts.spawned
    local c, why = hosts.slurm(3, {slurmd = "/nonexistent/slurmd"})
    assert.is_nil(c)
    assert.matches("slurmd%-n%d exited", why)
    -- munged and slurmctld had started
    local names = {}
    for i = before + 1, #hosts.spawned do
      local p = hosts.spawned[i]
      names[p.name] = true
      assert.is_false(running(p.pid), p.name)
    end
    assert.is_true(names.munged and names.slurmctld)
    assert.equal(outer_conf, os.getenv("SLURM_CONF"))
  end)
end)
