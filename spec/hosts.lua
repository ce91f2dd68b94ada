-- Test hosts on this machine for the remote specs: sshd "hosts" h1..h3 on
-- loopback ports, and a Slurm cluster of emulated nodes n1..n3 (munged,
-- slurmctld, one slurmd per node), each started from a temporary directory
-- and stopped by the pids recorded here. Plain Lua + luaposix.
--
--   local hosts = require "spec.hosts"
--   local ssh, why = hosts.ssh(3)      -- ssh.config, ssh.hosts = {"h1", ...}
--   local slurm, why = hosts.slurm(3)  -- slurm.conf, slurm.nodes = {"n1", ...}
--   os.execute(ssh.launch.h1 .. " hostname")   -- ssh -F <config> h1 hostname
--   os.execute(slurm.launch.n2 .. " hostname") -- srun -N1 -n1 -w n2 hostname
--   hosts.stop(ssh); hosts.stop(slurm) -- or hosts.stopall()
--
-- A bring-up that cannot work on this machine (not root, a package
-- missing) returns nil, the reason and "unavailable": a spec marks itself
-- pending with the reason. One that fails returns nil and the reason, after
-- stopping what it had started: a spec fails with the reason.
-- Every daemon runs in its own process group under `setpriv --pdeathsig
-- KILL`, so it dies with the process that started it even when no teardown
-- runs. Daemons, commands run over ssh and Slurm tasks carry
-- LPAR_TEST_HARNESS=<the handle's directory> in their environment, so that
-- stop finds what they started and lost track of (slurmstepd, a command
-- left running in the background) too.
local dirent = require "posix.dirent"
local fcntl = require "posix.fcntl"
local grp = require "posix.grp"
local pwd = require "posix.pwd"
local signal = require "posix.signal"
local socket = require "posix.sys.socket"
local stat = require "posix.sys.stat"
local stdlib = require "posix.stdlib"
local time = require "posix.time"
local unistd = require "posix.unistd"
local utsname = require "posix.sys.utsname"
local wait = require "posix.sys.wait"

local M = {}

-- Seconds the harness waits for a daemon to come up, and for one to go.
M.start_limit = 60
M.stop_limit = 20

-- Every process this module started, in order: {pid, name, log, gone}.
M.spawned = {}

local live = {} -- handles not yet stopped
local used_ports = {} -- ports handed out in this process

local function now()
  local t = time.clock_gettime(time.CLOCK_MONOTONIC)
  return t.tv_sec + t.tv_nsec * 1e-9
end

local function sleep(s)
  local sec = math.floor(s)
  time.nanosleep({tv_sec = sec, tv_nsec = math.floor((s - sec) * 1e9)})
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function spit(path, s, mode)
  local f = assert(io.open(path, "wb"))
  assert(f:write(s))
  assert(f:close())
  if mode then assert(stat.chmod(path, mode)) end
end

-- The last lines of a log, for a failure message.
local function tail(path, lines)
  local s = slurp(path)
  if not s or s == "" then return "(" .. path .. " is empty)" end
  local t = {}
  for line in s:gmatch("[^\n]+") do t[#t + 1] = line end
  return table.concat(t, "\n  ", math.max(1, #t - (lines or 8) + 1))
end

-- Runs a shell command; returns whether it exited 0, and its stdout.
local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>/dev/null")
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

local function have(prog)
  return (sh("command -v " .. q(prog)))
end

-- Whether nothing listens on 127.0.0.1:port and it is free to bind.
local function portfree(port)
  local fd = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
  if not fd then return false end
  local ok = socket.bind(fd, {family = socket.AF_INET, addr = "127.0.0.1", port = port})
  unistd.close(fd)
  return ok == 0
end

-- The range of ports to pick from: 20000 up to the ephemeral ports (those
-- of outgoing connections, which could take one in the meantime), or the
-- ports above them where they start low.
local function portrange()
  local lo, hi = (slurp("/proc/sys/net/ipv4/ip_local_port_range") or ""):match("(%d+)%s+(%d+)")
  lo, hi = tonumber(lo) or 32768, tonumber(hi) or 60999
  if lo > 21000 then return 20000, math.min(lo - 1, 32000) end
  return hi + 1, 65000
end

-- The first of n consecutive free ports on 127.0.0.1.
local function freeports(n)
  local first, last = portrange()
  for _ = 1, 500 do
    local base = math.random(first, last - n + 1)
    local ok = true
    for p = base, base + n - 1 do
      if used_ports[p] or not portfree(p) then
        ok = false
        break
      end
    end
    if ok then
      for p = base, base + n - 1 do used_ports[p] = true end
      return base
    end
  end
  return nil
end

-- Whether a TCP connection to 127.0.0.1:port is accepted.
local function listening(port)
  local fd = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
  if not fd then return false end
  local ok = socket.connect(fd, {family = socket.AF_INET, addr = "127.0.0.1", port = port})
  unistd.close(fd)
  return ok == 0
end

local stale -- defined below

-- A fresh directory under /tmp, readable by all (munged runs as munge),
-- holding the pid of this process; first sweeps those of processes gone.
local function newdir(kind)
  stale()
  local dir, err = stdlib.mkdtemp("/tmp/lpar-" .. kind .. "-XXXXXX")
  if not dir then return nil, "mkdtemp: " .. tostring(err) end
  assert(stat.chmod(dir, tonumber("755", 8)))
  assert(stat.mkdir(dir .. "/log"))
  spit(dir .. "/owner", tostring(unistd.getpid()))
  return dir
end

-- Whether a recorded process is gone; reaps it (it is our child).
local function gone(p)
  if p.gone then return true end
  local pid, how, status = wait.wait(p.pid, wait.WNOHANG)
  if pid == p.pid then
    p.gone, p.how, p.status = true, how, status
    return true
  end
  if pid == nil then p.gone = true end -- ECHILD: reaped elsewhere
  return p.gone == true
end

-- Starts argv (a program on PATH and its arguments) with stdin from
-- /dev/null and stdout and stderr appended to <dir>/log/<name>.out, as 'user'
-- when given; records it in the handle. Returns the pid.
local function spawn(c, name, argv, user)
  local log = c.dir .. "/log/" .. name .. ".out"
  local args = {"--pdeathsig", "KILL"}
  if user then
    for _, a in ipairs({"--reuid", user, "--regid", user, "--init-groups"}) do args[#args + 1] = a end
  end
  args[#args + 1] = "--"
  for _, a in ipairs(argv) do args[#args + 1] = a end
  local pid, err = unistd.fork()
  if not pid then return nil, "fork: " .. tostring(err) end
  if pid == 0 then
    unistd.setpid("p", 0, 0)
    local null = fcntl.open("/dev/null", fcntl.O_RDONLY)
    local out = fcntl.open(log, fcntl.O_WRONLY | fcntl.O_CREAT | fcntl.O_APPEND, tonumber("644", 8))
    if null and out then
      unistd.dup2(null, 0)
      unistd.dup2(out, 1)
      unistd.dup2(out, 2)
      -- the daemon keeps no other descriptor of this process (a pipe whose
      -- reader waits for end of file, say)
      local fds = {}
      for entry in dirent.files("/proc/self/fd") do fds[#fds + 1] = tonumber(entry) end
      for _, fd in ipairs(fds) do
        if fd > 2 then unistd.close(fd) end
      end
      stdlib.setenv("LPAR_TEST_HARNESS", c.dir)
      for k, v in pairs(c.spawn_env or {}) do stdlib.setenv(k, v) end
      unistd.execp("setpriv", args)
    end
    unistd._exit(127)
  end
  local p = {pid = pid, name = name, log = log}
  c.procs[#c.procs + 1] = p
  M.spawned[#M.spawned + 1] = p
  return pid
end

-- Waits until cond() holds. Fails (nil, reason) when 'limit' seconds pass
-- or a process of the handle exits first; the reason quotes its log.
local function await(c, what, cond, limit)
  local deadline = now() + (limit or M.start_limit)
  local pause = 0.01
  while true do
    if cond() then return true end
    for _, p in ipairs(c.procs) do
      if gone(p) then
        return nil, string.format("%s: %s exited (%s %s) before %s:\n  %s", c.kind, p.name,
          tostring(p.how), tostring(p.status), what, tail(p.log))
      end
    end
    if now() > deadline then
      local logs = {}
      for _, p in ipairs(c.procs) do logs[#logs + 1] = p.name .. ": " .. tail(p.log, 4) end
      return nil, string.format("%s: no %s after %d s\n  %s", c.kind, what, limit or M.start_limit,
        table.concat(logs, "\n  "))
    end
    sleep(pause)
    pause = math.min(pause * 2, 0.2)
  end
end

-- /proc: pid -> {ppid, state} of every process.
local function proctable()
  local t = {}
  for name in dirent.files("/proc") do
    local pid = tonumber(name)
    if pid then
      local s = slurp("/proc/" .. name .. "/stat")
      local state, ppid
      if s then state, ppid = s:match(".*%) (%S) (%d+)") end
      if state then t[pid] = {ppid = tonumber(ppid), state = state} end
    end
  end
  return t
end

-- Pids (not zombies) that belong to a handle: its recorded processes not
-- yet reaped, any process whose environment or command line names its
-- directory, and all their descendants.
function M.members(c)
  if not c.dir then return {} end
  local procs = proctable()
  local kids = {}
  for pid, p in pairs(procs) do
    kids[p.ppid] = kids[p.ppid] or {}
    table.insert(kids[p.ppid], pid)
  end
  local found, roots = {}, {}
  for _, p in ipairs(c.procs) do
    if not gone(p) then roots[#roots + 1] = p.pid end
  end
  -- sshd rewrites its environment with its process title: the command
  -- line names the directory there
  local mark, path = "\0LPAR_TEST_HARNESS=" .. c.dir .. "\0", c.dir .. "/"
  for pid in pairs(procs) do
    local env = slurp("/proc/" .. pid .. "/environ")
    local cmd = slurp("/proc/" .. pid .. "/cmdline")
    if env and ("\0" .. env):find(mark, 1, true) or cmd and cmd:find(path, 1, true) then
      roots[#roots + 1] = pid
    end
  end
  local function add(pid)
    if found[pid] or not procs[pid] then return end
    if procs[pid].state ~= "Z" then found[pid] = true end
    for _, k in ipairs(kids[pid] or {}) do add(k) end
  end
  for _, pid in ipairs(roots) do add(pid) end
  local list = {}
  for pid in pairs(found) do list[#list + 1] = pid end
  table.sort(list)
  return list
end

-- Stops a handle: SIGTERM to every process that belongs to it, SIGKILL to
-- those left after M.stop_limit seconds, waits until they are all gone,
-- then removes its directory and restores the environment. Safe to call
-- twice, on nil, and on a handle whose bring-up failed halfway. Returns
-- true, or nil and the pids that would not go.
function M.stop(c)
  if not c or c.stopped then return true end
  c.stopped = true
  live[c] = nil
  local termed, killed = {}, false
  local deadline = now() + M.stop_limit
  local left
  while true do
    left = M.members(c)
    if #left == 0 then break end
    local late = now() > deadline
    if late and killed then break end
    for _, pid in ipairs(left) do
      if late then
        signal.kill(pid, signal.SIGKILL)
      elseif not termed[pid] then
        termed[pid] = true
        signal.kill(pid, signal.SIGTERM)
      end
    end
    if late then
      killed = true
      deadline = now() + M.stop_limit
    end
    sleep(0.02)
  end
  for _, p in ipairs(c.procs) do gone(p) end
  for _, ns in ipairs(c.netns or {}) do sh("ip netns del " .. ns .. " 2>/dev/null") end
  if c.blackhole then sh("ip route del blackhole 10.231.0.0/16") end
  for k, v in pairs(c.saved_env or {}) do
    if v then stdlib.setenv(k, v) else stdlib.setenv(k, nil) end
  end
  if c.dir and c.dir:match("^/tmp/lpar%-") then os.execute("rm -rf " .. q(c.dir)) end
  if #left > 0 then return nil, c.kind .. ": processes left: " .. table.concat(left, " ") end
  return true
end

-- Stops every handle not yet stopped (for a spec's teardown).
function M.stopall()
  local ok, err = true, nil
  for c in pairs(live) do
    local k, e = M.stop(c)
    if not k then ok, err = nil, e end
  end
  return ok, err
end

-- Stops what a test run killed before its teardown left behind (its
-- daemons died with it; processes started on its hosts may not have) and
-- removes its directory. Each bring-up does it first.
function stale()
  for name in dirent.files("/tmp") do
    local kind = name:match("^lpar%-(%a+)%-%w+$")
    if kind == "ssh" or kind == "slurm" then
      local dir = "/tmp/" .. name
      local owner = tonumber(slurp(dir .. "/owner") or "")
      if owner and not stat.stat("/proc/" .. owner) then
        M.stop({kind = kind, dir = dir, procs = {}})
      end
    end
  end
end

M.sweep = function() stale() end

local function newhandle(kind)
  local c = {kind = kind, procs = {}}
  c.stop = M.stop
  live[c] = true
  return c
end

-- Fails a bring-up: stops what it started, returns nil and the reason.
local function fail(c, why)
  M.stop(c)
  return nil, why
end

-- Why this machine cannot have such test hosts (not root), or nil.
local function needroot(kind, because)
  if unistd.geteuid() ~= 0 then return kind .. ": the test hosts need root (" .. because .. ")" end
end

---------------------------------------------------------------- ssh

local sshd_config = [[
ListenAddress %s:%d
HostKey %s/host_key
PidFile %s/sshd.pid
AuthorizedKeysFile %s/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
SetEnv LPAR_TEST_HOST=%s LPAR_TEST_HARNESS=%s
MaxStartups 100:30:200
MaxSessions 100
LoginGraceTime 60
PrintMotd no
PrintLastLog no
X11Forwarding no
LogLevel INFO
]]

local ssh_config = [[
Host %s
  HostName %s
  Port %d
  User root
  IdentityFile %s/client_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  ServerAliveInterval 1
  ConnectTimeout 30
  LogLevel ERROR
]]

-- Brings up n (default 3, at most 9) sshd "hosts" h1..hn on loopback ports,
-- each with its own host key, accepting one generated client key for root,
-- and writes an `ssh -F` config naming them. Returns a handle: {config =
-- path, hosts = {"h1", ...}, launch = {h1 = "ssh -F <config> h1", ...},
-- ports = {...}, dir = ...}, once every host ran a command over ssh; or nil
-- and the reason. opts.sshd overrides the sshd
-- binary (an absolute path: sshd re-executes itself).
--
-- With opts.netns, each host's sshd runs in a network namespace of its
-- own, behind a veth pair with addresses in 10.231.0.0/16, which gets a
-- blackhole route first so that nothing for it can leave the machine;
-- then c.partition[name]() takes the link down inside that namespace (the
-- host stays, its network does not) and c.heal[name]() brings it back.
-- Unavailable where namespaces cannot be made.
function M.ssh(n, opts)
  n, opts = n or 3, opts or {}
  assert(n >= 1 and n <= 9, "ssh: 1 to 9 hosts")
  local why = needroot("ssh", "sshd logs in as root")
  if why then return nil, why, "unavailable" end
  local sshd = opts.sshd or "/usr/sbin/sshd"
  for _, prog in ipairs({"ssh", "ssh-keygen", "setpriv"}) do
    if not have(prog) then
      return nil, "ssh: " .. prog .. " is not installed (scripts/setup installs it)", "unavailable"
    end
  end
  if not stat.stat(sshd) then
    return nil, "ssh: " .. sshd .. " is not installed (scripts/setup installs openssh-server)", "unavailable"
  end
  if opts.netns and not have("ip") then
    return nil, "ssh: ip (iproute2) is not installed", "unavailable"
  end
  local c = newhandle("ssh")
  local err
  c.dir, err = newdir("ssh")
  if not c.dir then return fail(c, "ssh: " .. err) end
  if opts.netns then
    c.netns, c.partition, c.heal = {}, {}, {}
    -- the range is blackholed before any address of it exists
    if not sh("ip route show type blackhole | grep -q '^blackhole 10.231.0.0/16'") then
      if not sh("ip route add blackhole 10.231.0.0/16") then
        M.stop(c)
        return nil, "ssh: cannot add a blackhole route (no network namespaces here)", "unavailable"
      end
      c.blackhole = true
    end
  end
  -- sshd's privilege separation directory, as the package's service makes it
  if not stat.stat("/run/sshd") then
    local ok, e = stat.mkdir("/run/sshd", tonumber("755", 8))
    if not ok and not stat.stat("/run/sshd") then return fail(c, "ssh: mkdir /run/sshd: " .. tostring(e)) end
  end
  local keygen = "ssh-keygen -q -t ed25519 -N '' -C lpar-test -f "
  if not sh(keygen .. q(c.dir .. "/client_key")) then return fail(c, "ssh: ssh-keygen failed") end
  spit(c.dir .. "/authorized_keys", assert(slurp(c.dir .. "/client_key.pub")), tonumber("600", 8))
  c.hosts, c.ports, c.launch = {}, {}, {}
  local client = {}
  for i = 1, n do
    local name = "h" .. i
    local hdir = c.dir .. "/" .. name
    assert(stat.mkdir(hdir))
    if not sh(keygen .. q(hdir .. "/host_key")) then return fail(c, "ssh: ssh-keygen failed") end
    local port, addr, argv = freeports(1), "127.0.0.1", {}
    if not port then return fail(c, "ssh: no free port on 127.0.0.1") end
    if opts.netns then
      -- namespace lpar-<pid>-hK; veth lv<pid>hK here, eth0 there; a /30
      -- per host in 10.231.<pid % 250>.0/24
      local ns, net = ("lpar-%d-%s"):format(unistd.getpid(), name), unistd.getpid() % 250
      local veth = ("lv%d%s"):format(unistd.getpid() % 1000000, name)
      local here = ("10.231.%d.%d"):format(net, 4 * i + 1)
      addr = ("10.231.%d.%d"):format(net, 4 * i + 2)
      c.netns[#c.netns + 1] = ns
      local up = sh(("ip netns add %s && ip link add %s type veth peer name eth0 netns %s" ..
                     " && ip addr add %s/30 dev %s && ip link set %s up" ..
                     " && ip -n %s addr add %s/30 dev eth0 && ip -n %s link set eth0 up" ..
                     " && ip -n %s link set lo up")
                    :format(ns, veth, ns, here, veth, veth, ns, addr, ns, ns))
      if not up then
        M.stop(c)
        return nil, "ssh: cannot make network namespace " .. ns, "unavailable"
      end
      c.partition[name] = function() return sh(("ip -n %s link set eth0 down"):format(ns)) end
      c.heal[name] = function() return sh(("ip -n %s link set eth0 up"):format(ns)) end
      argv = {"ip", "netns", "exec", ns}
    end
    spit(hdir .. "/sshd_config", sshd_config:format(addr, port, hdir, hdir, c.dir, name, c.dir))
    c.hosts[i], c.ports[i] = name, port
    c.launch[name] = "ssh -F " .. c.dir .. "/ssh_config " .. name
    client[i] = ssh_config:format(name, addr, port, c.dir)
    for _, a in ipairs({sshd, "-D", "-e", "-f", hdir .. "/sshd_config"}) do argv[#argv + 1] = a end
    local pid, e = spawn(c, "sshd-" .. name, argv)
    if not pid then return fail(c, "ssh: " .. e) end
  end
  c.config = c.dir .. "/ssh_config"
  spit(c.config, table.concat(client, "\n"))
  -- sshd writes its pid file once it listens
  local ok
  ok, err = await(c, "sshd listening", function()
    for _, name in ipairs(c.hosts) do
      if not stat.stat(c.dir .. "/" .. name .. "/sshd.pid") then return false end
    end
    return true
  end)
  if not ok then return fail(c, err) end
  -- every host runs a command and says its name (in parallel)
  local probe = {}
  for _, name in ipairs(c.hosts) do
    probe[#probe + 1] = string.format("timeout %d ssh -F %s %s 'echo $LPAR_TEST_HOST' >%s 2>&1 &",
      M.start_limit, q(c.config), name, q(c.dir .. "/log/probe-" .. name))
  end
  sh(table.concat(probe, " ") .. " wait")
  for _, name in ipairs(c.hosts) do
    local said = slurp(c.dir .. "/log/probe-" .. name) or ""
    if said ~= name .. "\n" then
      return fail(c, string.format("ssh: %s did not answer: %s\n  sshd: %s", name, said,
        tail(c.dir .. "/log/sshd-" .. name .. ".out")))
    end
  end
  return c
end

---------------------------------------------------------------- slurm

local slurm_conf = [[
# A cluster of %d emulated nodes on one machine, for lpar's specs.
ClusterName=lpartest
SlurmctldHost=%s(127.0.0.1)
SlurmctldPort=%d
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=%s/munge/munge.socket
CredType=cred/munge
StateSaveLocation=%s/state
SlurmdSpoolDir=%s/spool/%%n
SlurmctldPidFile=%s/slurmctld.pid
SlurmdPidFile=%s/spool/%%n/slurmd.pid
SlurmctldLogFile=%s/log/slurmctld.log
SlurmdLogFile=%s/log/slurmd-%%n.log
PlugStackConfig=%s/plugstack.conf
TaskProlog=%s/task_prolog
MailProg=/bin/true
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MessageTimeout=30
KillWait=5
InactiveLimit=0
NodeName=n[1-%d] NodeHostname=%s NodeAddr=127.0.0.1 Port=%d-%d CPUs=4 State=UNKNOWN
PartitionName=lpar Nodes=n[1-%d] Default=YES MaxTime=INFINITE State=UP
]]

-- Brings up a Slurm cluster of n (default 3, at most 9) emulated nodes
-- n1..nn on this machine: munged as the munge user with its own key and
-- socket, slurmctld, and `slurmd -N nK` per node, all on loopback ports.
-- Sets SLURM_CONF in this process's environment (until stop) and returns a
-- handle {conf = path, nodes = {"n1", ...}, launch = {n1 = "srun -N1 -n1
-- -w n1", ...}, env = "SLURM_CONF=...", ports = {...}, dir = ...} once
-- every node is idle and `srun -N1 -n1 -w n2 hostname` ran; or
-- nil and the reason. opts.slurmd overrides the slurmd program.
function M.slurm(n, opts)
  n, opts = n or 3, opts or {}
  assert(n >= 1 and n <= 9, "slurm: 1 to 9 nodes")
  local why = needroot("slurm", "slurmd runs as root, munged as munge")
  if why then return nil, why, "unavailable" end
  for _, prog in ipairs({"munged", "slurmctld", "slurmd", "sinfo", "srun", "setpriv", "timeout"}) do
    if not have(prog) then
      return nil, "slurm: " .. prog .. " is not installed (scripts/setup installs slurm-wlm and munge)",
        "unavailable"
    end
  end
  local munge = pwd.getpwnam("munge")
  local munge_group = grp.getgrnam("munge")
  if not munge or not munge_group then
    return nil, "slurm: no user 'munge' (the munge package makes it)", "unavailable"
  end
  local c = newhandle("slurm")
  local err
  c.dir, err = newdir("slurm")
  if not c.dir then return fail(c, "slurm: " .. err) end
  local d = c.dir
  for _, sub in ipairs({"state", "spool", "munge"}) do assert(stat.mkdir(d .. "/" .. sub)) end
  c.nodes, c.launch = {}, {}
  for i = 1, n do
    c.nodes[i] = "n" .. i
    c.launch[c.nodes[i]] = "srun -N1 -n1 -w " .. c.nodes[i]
    assert(stat.mkdir(d .. "/spool/n" .. i))
  end

  -- munged: its directory searchable by all (clients reach the socket),
  -- owned by munge, with a fresh key that only munge can read
  local key = assert(io.open("/dev/urandom", "rb")):read(1024)
  spit(d .. "/munge/munge.key", key, tonumber("400", 8))
  for _, f in ipairs({"/munge", "/munge/munge.key"}) do
    assert(unistd.chown(d .. f, munge.pw_uid, munge_group.gr_gid))
  end
  assert(stat.chmod(d .. "/munge", tonumber("711", 8)))
  local m = d .. "/munge/"
  local pid, e = spawn(c, "munged", {"munged", "-F", "--key-file=" .. m .. "munge.key",
    "--socket=" .. m .. "munge.socket", "--pid-file=" .. m .. "munged.pid",
    "--log-file=" .. m .. "munged.log", "--seed-file=" .. m .. "munged.seed"}, "munge")
  if not pid then return fail(c, "slurm: " .. e) end
  local ok
  ok, err = await(c, "munge socket", function() return stat.stat(m .. "munge.socket") ~= nil end)
  if not ok then return fail(c, err) end

  local base = freeports(n + 1)
  if not base then return fail(c, "slurm: no free ports on 127.0.0.1") end
  c.ports = {ctld = base}
  for i = 1, n do c.ports[c.nodes[i]] = base + i end
  local host = utsname.uname().nodename:match("^[^.]+")
  c.conf = d .. "/slurm.conf"
  spit(d .. "/plugstack.conf", "")
  -- tasks carry the mark of the harness too, found at stop if they linger
  spit(d .. "/task_prolog", "#!/bin/sh\necho export LPAR_TEST_HARNESS=" .. d .. "\n", tonumber("755", 8))
  spit(c.conf, slurm_conf:format(n, host, base, d, d, d, d, d, d, d, d, d, n, host, base + 1, base + n, n))
  c.spawn_env = {SLURM_CONF = c.conf}
  c.saved_env = {SLURM_CONF = os.getenv("SLURM_CONF") or false}
  stdlib.setenv("SLURM_CONF", c.conf)

  pid, e = spawn(c, "slurmctld", {"slurmctld", "-D", "-f", c.conf})
  if not pid then return fail(c, "slurm: " .. e) end
  ok, err = await(c, "slurmctld listening", function() return listening(base) end)
  if not ok then return fail(c, err) end
  for _, node in ipairs(c.nodes) do
    pid, e = spawn(c, "slurmd-" .. node, {opts.slurmd or "slurmd", "-D", "-N", node, "-f", c.conf})
    if not pid then return fail(c, "slurm: " .. e) end
  end
  local states = ""
  ok, err = await(c, "idle nodes", function()
    local _, out = sh("timeout 30 sinfo -h -N -o '%N %t'")
    states = out
    local idle = 0
    for node, state in out:gmatch("(%S+) (%S+)") do
      if state == "idle" and c.ports[node] then idle = idle + 1 end
    end
    return idle == n
  end)
  if not ok then return fail(c, err .. "\n  sinfo: " .. states) end
  local probe = n >= 2 and "n2" or "n1"
  local said
  ok, said = sh(string.format("timeout %d srun -N1 -n1 -w %s hostname", M.start_limit, probe))
  if not ok or said:gsub("%s+$", "") ~= utsname.uname().nodename then
    return fail(c, string.format("slurm: srun -w %s hostname said %q\n  slurmctld: %s", probe, said,
      tail(d .. "/log/slurmctld.log")))
  end
  c.env = "SLURM_CONF=" .. q(c.conf)
  return c
end

-- For a spec: whether the hosts of these kinds are up, where down[kind] is
-- nil or {why, "unavailable" or nil} as a bring-up returned it; marks the
-- test pending (busted's 'pending') where this machine cannot have them,
-- and raises where they failed to start.
function M.up(down, pending, ...)
  for _, kind in ipairs({...}) do
    local d = down[kind]
    if d then
      if d[2] == "unavailable" then
        pending(d[1])
        return false
      end
      error(d[1], 0)
    end
  end
  return true
end

return M
