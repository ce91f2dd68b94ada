-- Loaded by busted before the specs: finds the build tree (LPAR_BUILD, by
-- default ./build) and gives specs a few process-level helpers.
local build = os.getenv("LPAR_BUILD") or "./build"
package.cpath = build .. "/?.so;" .. package.cpath

local unistd = require "posix.unistd"
local time = require "posix.time"
local dirent = require "posix.dirent"
local wait = require "posix.sys.wait"

-- LPAR_CLI: the command under test, when it is built for another Lua than
-- the one running the specs (scripts/test runs the CLI specs so)
local H = {build = build, cli = os.getenv("LPAR_CLI") or build .. "/lpar"}

-- Seconds on the monotonic clock.
-- The bytes of n (0 <= n < 2^53) as a little-endian unsigned integer of
-- 'size' bytes, as string.pack("<I" .. size) writes it (5.3+ only), on
-- every Lua.
function H.le(n, size)
  local t = {}
  for i = 1, size do
    t[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(t)
end

-- The varint of the codec for a whole number v, 0 <= v < 2^64, held in a
-- double (7 bits a byte, low first, the high bit set on all but the
-- last), on every Lua.
function H.uvarint(v)
  assert(v >= 0 and v < 2 ^ 64 and v == math.floor(v), v)
  local s = {}
  while v >= 128 do
    local low = v % 128
    s[#s + 1] = string.char(low + 128)
    v = (v - low) / 128
  end
  s[#s + 1] = string.char(v)
  return table.concat(s)
end

function H.now()
  local t = time.clock_gettime(time.CLOCK_MONOTONIC)
  return t.tv_sec + t.tv_nsec * 1e-9
end

function H.sleep(s)
  local sec = math.floor(s)
  time.nanosleep({tv_sec = sec, tv_nsec = math.floor((s - sec) * 1e9)})
end

-- Open file descriptors of this process.
function H.fdcount()
  local n = 0
  for name in dirent.files("/proc/self/fd") do
    if name ~= "." and name ~= ".." then n = n + 1 end
  end
  return n - 1 -- the directory stream's own fd
end

-- Pids of this process's children (zombies included), from /proc.
function H.children()
  local me, kids = unistd.getpid(), {}
  for name in dirent.files("/proc") do
    local pid = tonumber(name)
    if pid then
      local f = io.open("/proc/" .. name .. "/stat")
      local stat = f and f:read("*a")
      if f then f:close() end
      -- pid (comm) state ppid ...: comm may hold spaces and parentheses
      local state, ppid
      if stat then state, ppid = stat:match(".*%) (%S) (%d+)") end
      if ppid and tonumber(ppid) == me then kids[#kids + 1] = {pid = pid, state = state} end
    end
  end
  return kids
end

-- Whether a process exists (not reaped).
function H.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() end
  return f ~= nil
end

-- Run a shell command; returns exit code (or 128+signal), stdout, stderr.
function H.run(cmd, input)
  local out, err = os.tmpname(), os.tmpname()
  local inp
  if input then
    inp = os.tmpname()
    local f = assert(io.open(inp, "wb")); f:write(input); f:close()
  end
  local full = string.format("(%s) <%s >%s 2>%s", cmd, inp or "/dev/null", out, err)
  local ok, how, code = os.execute(full)
  local function slurp(p) local f = io.open(p, "rb"); local s = f:read("*a"); f:close(); os.remove(p); return s end
  if inp then os.remove(inp) end
  if type(ok) == "number" then -- 5.1 and LuaJIT: the wait status
    if ok % 256 ~= 0 then return 128 + ok % 128, slurp(out), slurp(err) end
    return math.floor(ok / 256), slurp(out), slurp(err)
  end
  if how == "signal" then code = 128 + code end
  return ok and 0 or code, slurp(out), slurp(err)
end

-- Reap a child pid, blocking; returns the posix.sys.wait results.
function H.waitpid(pid) return wait.wait(pid) end

-- {1, 2, ..., n}
function H.range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

-- The contents of a file, or nil.
function H.slurp(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- Write a Lua program that loads the built module to a temporary file;
-- returns its path.
function H.program(code)
  local f = os.tmpname()
  local h = assert(io.open(f, "w"))
  h:write(string.format("package.cpath = %q .. package.cpath\n", build .. "/?.so;"), code)
  h:close()
  return f
end

-- The interpreter running the specs ("lua5.4", "luajit"...).
H.interp = rawget(_G, "jit") and "luajit" or "lua" .. _VERSION:sub(5)

-- Compiler and linker flags for a C host (a spec's fixture) built with
-- liblpar.a against the Lua running the specs. Before 5.3 the host gets
-- lpar's shims of the newer C API (src/lcompat.h, over lua-compat53's,
-- which LuaJIT takes from 5.1's headers) so that it is written once.
H.cflags = "-Isrc $(pkg-config --cflags " .. H.interp .. ")"
if _VERSION < "Lua 5.3" then
  H.cflags = H.cflags .. (H.interp == "luajit" and " -I/usr/include/lua5.1" or "")
    .. " -include src/lcompat.h"
end
H.libs = "$(pkg-config --libs " .. H.interp .. ")"

-- Run such a program in a fresh interpreter like this one: exit code,
-- stdout, stderr.
function H.lua(code)
  local f = H.program(code)
  local rc, out, err = H.run(H.interp .. " " .. f)
  os.remove(f)
  return rc, out, err
end

-- Bytes this process has read with read(2) so far.
function H.rchar()
  return tonumber(H.slurp("/proc/self/io"):match("rchar: (%d+)"))
end

-- 'size' bytes that differ from item to item (they travel well as results
-- of any size; no upvalues, so pools can send it).
function H.payload(i, size)
  return string.rep(string.char(i % 251, (7 * i) % 256), math.floor(size / 2))
end

-- A fresh empty directory; returns its path.
function H.tmpdir()
  return assert(require("posix.stdlib").mkdtemp(os.tmpname() .. ".XXXXXX"))
end

-- Remove a directory made by H.tmpdir, with what it holds.
function H.rmdir(dir)
  assert(dir:match("^/tmp/"), dir)
  os.execute("rm -rf '" .. dir .. "'")
end

-- Files in a directory (not . and ..).
function H.files(dir)
  local n = 0
  for name in dirent.files(dir) do
    if name ~= "." and name ~= ".." then n = n + 1 end
  end
  return n
end

-- A barrier for processes: adds a file named 'key' to 'dir', then waits
-- until 'dir' holds n files, or 'limit' seconds (default 60) pass. Returns
-- whether the count was reached. Specs use it where several workers must be
-- running at once, instead of items that sleep and hope to overlap.
function H.barrier(dir, n, key, limit)
  local f = assert(io.open(dir .. "/" .. tostring(key), "w"))
  f:close()
  local deadline = H.now() + (limit or 60)
  while H.files(dir) < n do
    if H.now() > deadline then return false end
    H.sleep(0.005)
  end
  return true
end

-- Wait until cond() holds, checking every 10 ms; false after 'limit' seconds
-- (default 30).
function H.waitfor(cond, limit)
  local deadline = H.now() + (limit or 30)
  while not cond() do
    if H.now() > deadline then return false end
    H.sleep(0.01)
  end
  return true
end

-- ---- the lpar command, for the CLI specs ----

-- A string quoted for sh.
function H.quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The Lua the command under test runs ("Lua 5.4", "LuaJIT 2.1"), from
-- its --version, and whether it keeps integers apart from floats (5.3+).
local clilua
function H.clilua()
  if not clilua then
    local p = assert(io.popen(H.quote(H.cli) .. " --version"))
    clilua = p:read("*a"):match("%((.-)%)") or "?"
    p:close()
  end
  return clilua
end
function H.cliintegers() return H.clilua() == "Lua 5.3" or H.clilua() == "Lua 5.4" end

-- Run the built lpar with a shell-quoted argument string, stopped if it
-- runs past 'limit' seconds when one is given (then the code is 124);
-- returns code, out, err.
function H.lpar(args, input, limit)
  local cmd = H.quote(H.cli) .. " " .. args
  if limit then cmd = ("timeout -k 5 %d %s"):format(limit, cmd) end
  return H.run(cmd, input)
end

-- Write s to path (bytes as they are); returns path.
function H.writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

-- The bytes of a file, or nil.
function H.readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- The lines of s, each ended by a newline.
function H.lines(s)
  local t = {}
  for l in s:gmatch("([^\n]*)\n") do t[#t + 1] = l end
  return t
end

-- The pids written in a file, one per line.
function H.pidsof(path)
  local t = {}
  for l in (H.readfile(path) or ""):gmatch("%d+") do t[#t + 1] = tonumber(l) end
  return t
end

-- The first of 'pids' still alive, or nil.
function H.anyalive(pids)
  for _, p in ipairs(pids) do
    if H.alive(p) then return p end
  end
  return nil
end

-- Start lpar with 'args' (a list) and pipes on stdin, stdout and stderr,
-- with SIGINT, SIGTERM and SIGHUP at their defaults; returns {pid, stdin,
-- stdout, stderr} (the parent's ends). With 'sh' (shell commands such as
-- "ulimit -v N;"), lpar is started by sh after them, the arguments
-- quoted for it.
function H.spawncli(args, sh)
  local signal = require "posix.signal"
  local inr, inw = unistd.pipe()
  local outr, outw = unistd.pipe()
  local errr, errw = unistd.pipe()
  local pid = assert(unistd.fork())
  if pid == 0 then
    unistd.dup2(inr, 0)
    unistd.dup2(outw, 1)
    unistd.dup2(errw, 2)
    for _, fd in ipairs({inr, inw, outr, outw, errr, errw}) do unistd.close(fd) end
    for _, sig in ipairs({signal.SIGINT, signal.SIGTERM, signal.SIGHUP}) do
      signal.signal(sig, signal.SIG_DFL)
    end
    if sh then
      local words = {sh, "exec", H.quote(H.cli)}
      for _, a in ipairs(args) do words[#words + 1] = H.quote(a) end
      unistd.execp("/bin/sh", {[0] = "sh", "-c", table.concat(words, " ")})
    else
      local argt = {[0] = H.cli}
      for i, a in ipairs(args) do argt[i] = a end
      unistd.execp(H.cli, argt)
    end
    unistd._exit(127)
  end
  unistd.close(inr)
  unistd.close(outw)
  unistd.close(errw)
  return {pid = pid, stdin = inw, stdout = outr, stderr = errr}
end

-- Read fd until pred(text so far) holds or 'secs' pass; returns the text
-- and whether pred held.
function H.readuntil(fd, pred, secs)
  local poll = require "posix.poll"
  local buf, deadline = "", H.now() + secs
  while not pred(buf) do
    local left = deadline - H.now()
    if left <= 0 then return buf, false end
    if poll.rpoll(fd, math.ceil(left * 1000)) == 1 then
      local s = unistd.read(fd, 65536)
      if not s or s == "" then return buf, pred(buf) end
      buf = buf .. s
    end
  end
  return buf, true
end

-- Wait up to 'secs' for pid to exit; returns how ("exited", "killed") and
-- the code, or nil after killing it if it did not exit in time.
function H.waitexit(pid, secs)
  local signal = require "posix.signal"
  local deadline = H.now() + secs
  repeat
    local p, how, code = wait.wait(pid, wait.WNOHANG)
    if p == pid then return how, code end
    H.sleep(0.01)
  until H.now() > deadline
  signal.kill(pid, signal.SIGKILL)
  wait.wait(pid)
  return nil
end

-- Close the pipes of a process H.spawncli started.
function H.closeall(p)
  for _, fd in ipairs({p.stdin, p.stdout, p.stderr}) do
    if fd then unistd.close(fd) end
  end
end

-- "1\n2\n...n\n"
function H.numbers(n)
  local t = {}
  for i = 1, n do t[i] = i .. "\n" end
  return table.concat(t)
end

-- A joblog's item lines in order, each a record of its columns: line,
-- status, seconds, attempt, start, host and error (as written: escaped).
-- A line that is neither a comment nor such a record is an error naming
-- it. No file: no records.
function H.joblog(path)
  local t, n = {}, 0
  for l in (H.readfile(path) or ""):gmatch("[^\n]+") do
    n = n + 1
    if l:sub(1, 1) ~= "#" then
      local line, status, secs, attempt, start, host, err =
        l:match("^(%d+)\t(%a+)\t([%d.]+)\t(%d+)\t([%d.]+)\t([^\t]*)\t(.*)$")
      if not line then error(("joblog %s, line %d: not an item line: %q"):format(path, n, l), 2) end
      t[#t + 1] = {line = tonumber(line), status = status, seconds = tonumber(secs),
                   attempt = tonumber(attempt), start = tonumber(start), host = host, error = err}
    end
  end
  return t
end

-- A joblog's item lines as {line, status}, in order.
function H.logged(path)
  local t = {}
  for i, r in ipairs(H.joblog(path)) do t[i] = {r.line, r.status} end
  return t
end

-- The records of an --events file, decoded, in order. A line that is not
-- JSON is an error naming it (a last line without its newline too).
function H.events(path)
  local cjson = require "cjson"
  local t, n = {}, 0
  for l in (H.readfile(path) or ""):gmatch("[^\n]+") do
    n = n + 1
    local ok, ev = pcall(cjson.decode, l)
    if not ok then error(("events %s, line %d is not JSON: %q"):format(path, n, l), 2) end
    t[n] = ev
  end
  return t
end

-- The joblog mark "# out <bytes> <line> <hash>" that lpar writes after
-- 'line' records whose output is 'out': the hash is FNV-1a (64 bits) of
-- out, continued with the line count in decimal.
-- (Lua 5.3+: the specs that use it run on 5.4; its source is loaded, so
-- that this file parses under every Lua.)
H.mark = _VERSION >= "Lua 5.3" and load([[
  local out, line = ...
  local h, byte = 0xcbf29ce484222325, string.byte
  local s = out .. line
  for i = 1, #s do h = (h ~ byte(s, i)) * 0x100000001b3 end
  return ("# out %d %d %016x"):format(#out, line, h)
]]) or nil

-- Temporary file names, removed after each test of the spec that calls
-- H.tmpfiles(after_each) at its top (busted's hook, which only specs
-- see): returns the function that makes one.
function H.tmpfiles(after_each)
  local made = {}
  after_each(function()
    for _, p in ipairs(made) do os.remove(p) end
    made = {}
  end)
  return function()
    local p = os.tmpname()
    made[#made + 1] = p
    return p
  end
end

-- Close p (a pool) when the running test ends, passed or failed, as
-- `local p <close> = ...` does on Lua 5.4, under every Lua: 'finally' is
-- busted's, which only a test's body sees. Returns p. The pools close in
-- the reverse order of their calls, before the after_each hooks run.
local toclose = {}
local function closeall()
  local first
  for i = #toclose, 1, -1 do
    local ok, err = pcall(toclose[i].close, toclose[i])
    toclose[i] = nil
    if not ok and first == nil then first = err end
  end
  if first ~= nil then error(first, 0) end
end
function H.closing(finally, p)
  toclose[#toclose + 1] = p
  finally(closeall)
  return p
end

-- Run f(p) and close p when f returns or raises, at once (as <close>
-- closes at the end of its block, where H.closing waits for the end of
-- the test); returns what f returns.
local function closed(p, ok, ...)
  p:close()
  if not ok then error((...), 0) end
  return ...
end
function H.using(p, f) return closed(p, pcall(f, p)) end

_G.lpar_helper = H
return H
