-- The progress option of lpar.parallel, lpar.imap and pool jobs, the
-- progress bar on a terminal (module and CLI), the messages of pool and
-- job methods called wrongly, and tracebacks as the user wrote the code.
local lpar = require "lpar"
local H = require "spec.helper"

local range = H.range

-- A progress function that records its calls as "done/total/failed".
local function recorder()
  local calls = {}
  return calls, function(done, total, failed)
    calls[#calls + 1] = ("%d/%s/%d"):format(done, tostring(total), failed)
  end
end

-- The counts of the calls recorded, as numbers: done values in order.
local function dones(calls)
  local t = {}
  for k, c in ipairs(calls) do t[k] = tonumber(c:match("^(%d+)")) end
  return t
end

local function nondecreasing(t)
  for k = 2, #t do
    if t[k] < t[k - 1] then return false end
  end
  return true
end

-- Pids of this process's children, zombies included.
local function children()
  local pids = {}
  for _, kid in ipairs(H.children()) do pids[#pids + 1] = kid.pid end
  return pids
end

-- Run sh command 'cmd' with stdout and stderr on a terminal (a pty made by
-- python3), at most 'limit' seconds; returns what the terminal showed.
local function onpty(cmd, limit)
  local py = [==[
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("sh", ["sh", "-c", sys.argv[1]])
out = b""
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        b = os.read(fd, 65536)
    except OSError:
        break
    if not b:
        break
    out += b
os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
]==]
  local f = os.tmpname()
  H.writefile(f, py)
  local rc, out = H.run(("python3 %s %s %d"):format(f, H.quote(cmd), limit or 60))
  os.remove(f)
  assert(rc == 0, "python3 pty helper failed")
  return out
end

describe("progress option", function()
  it("lpar.parallel calls it with done, total, failed, ending at total", function()
    local calls, f = recorder()
    local r, n = lpar.parallel(function(x) return x * 2 end, range(200),
                               {n_workers = 2, progress = f})
    assert.equal(200, n)
    assert.equal(400, r[200])
    assert.equal("200/200/0", calls[#calls])
    assert.is_true(nondecreasing(dones(calls)))
    for _, c in ipairs(calls) do assert.matches("^%d+/200/0$", c) end
  end)

  it("counts failures collected, and is told of the last ones", function()
    local calls, f = recorder()
    local _, n, errs = lpar.parallel(function(x)
      if x % 10 == 0 then error("tens") end
      return x
    end, range(50), {n_workers = 2, on_error = "collect", progress = f})
    assert.equal(50, n)
    assert.equal(5, #(function() local t = {} for k in pairs(errs) do t[#t + 1] = k end return t end)())
    assert.equal("50/50/5", calls[#calls])
  end)

  it("gives total nil while an iterator has items, the count once it ran out", function()
    local calls, f = recorder()
    local k = 0
    local function items()
      k = k + 1
      if k <= 30 then return k end
    end
    local got = 0
    for _, v in lpar.imap(function(x) return x end, items, {n_workers = 2, progress = f}) do
      got = got + v
    end
    assert.equal(465, got)
    assert.equal("30/30/0", calls[#calls])
    assert.matches("^%d+/nil/0$", calls[1])
  end)

  it("is called at most about 20 times a second, plus the last call", function()
    local calls, f = recorder()
    local t0 = H.now()
    lpar.parallel(function(x)
      local t = os.clock()
      while os.clock() - t < 0.0005 do end
      return x
    end, range(4000), {n_workers = 2, chunksize = 1, progress = f})
    local elapsed = H.now() - t0
    assert.is_true(#calls <= elapsed / 0.05 + 3,
                   ("%d calls in %.2f s"):format(#calls, elapsed))
    assert.equal("4000/4000/0", calls[#calls])
  end)

  it("works for pool:map, pool:imap and job:wait", function()
    local pool = lpar.pool(2)
    local calls, f = recorder()
    local _, n = pool:map(function(x) return x end, range(40), {progress = f})
    assert.equal(40, n)
    assert.equal("40/40/0", calls[#calls])
    local calls2, f2 = recorder()
    local sum = 0
    for _, v in pool:imap(function(x) return x end, range(40), {progress = f2}) do sum = sum + v end
    assert.equal(820, sum)
    assert.equal("40/40/0", calls2[#calls2])
    local calls3, f3 = recorder()
    local job = pool:submit(function(x) return x end, range(40), {progress = f3})
    job:wait()
    assert.equal("40/40/0", calls3[#calls3])
    pool:close()
  end)

  it("an error it raises fails the call, its workers reaped, nothing hangs", function()
    local ok, err = pcall(lpar.parallel, function(x)
      local t = os.clock()
      while os.clock() - t < 0.01 do end
      return x
    end, range(200), {n_workers = 2, progress = function(done)
      if done > 0 then error("stop here") end
    end})
    assert.is_false(ok)
    assert.matches("stop here", err)
    assert.same({}, children())
    local ok2, err2 = pcall(function()
      for _ in lpar.imap(function(x) return x end, range(100),
                         {n_workers = 2, progress = function() error("imap stop") end}) do end
    end)
    assert.is_false(ok2)
    assert.matches("imap stop", err2)
    assert.same({}, children())
  end)

  it("an error in a pool job's progress fails that job; the pool goes on", function()
    local pool = lpar.pool(2)
    local ok, err = pcall(pool.map, pool, function(x) return x end, range(100),
                          {progress = function() error("pool stop") end})
    assert.is_false(ok)
    assert.matches("pool stop", err)
    local _, n = pool:map(function(x) return x + 1 end, range(10))
    assert.equal(10, n)
    -- it cannot use the pool while the pool is waited for
    local ok2, err2 = pcall(pool.map, pool, function(x) return x end, range(10),
                            {progress = function() pool:map(print, {}) end})
    assert.is_false(ok2)
    assert.matches("pool is busy", err2)
    pool:close()
  end)

  it("refuses a value that is neither a boolean nor a function", function()
    assert.error_matches(function() lpar.parallel(print, {1}, {progress = 1}) end,
                         "bad argument #3 to 'parallel' %(progress must be a boolean or a function%)")
  end)

  it("progress = true draws nothing when stderr is not a terminal", function()
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      local _, n = lpar.parallel(function(x) return x end, {1, 2, 3}, {n_workers = 2, progress = true})
      print(n)
    ]])
    assert.equal(0, rc)
    assert.equal("3\n", out)
    assert.equal("", err)
  end)

  it("progress = true draws the CLI's bar on a terminal, ending at n/n", function()
    local f = H.program([[
      local lpar = require "lpar"
      local _, n = lpar.parallel(function(x) return x end, {1, 2, 3, 4, 5, 6}, {n_workers = 2, progress = true})
      print("n=" .. n)
    ]])
    local out = onpty("lua5.4 " .. f, 60)
    os.remove(f)
    assert.matches("%[####################%] 6/6 100%%", out)
    assert.matches("n=6", out)
  end)
end)

describe("CLI progress bar on a terminal", function()
  it("is never ahead of the output and not left behind it", function()
    local dir = H.tmpdir()
    local script = H.writefile(dir .. "/slow.lua", [[
      return function(line)
        local t = os.clock()
        while os.clock() - t < 0.002 do end
        return line
      end
    ]])
    local items = {}
    for k = 1, 300 do items[k] = tostring(k) end
    H.writefile(dir .. "/items.txt", table.concat(items, "\n") .. "\n")
    local out = onpty(("%s -j2 --progress %s %s"):format(H.quote(H.cli), script, dir .. "/items.txt"), 120)
    H.rmdir(dir)
    -- replay the terminal: count output lines, and check each bar drawn
    local printed, bars, last = 0, 0, nil
    for piece in out:gsub("\27%[K", ""):gmatch("[^\r\n]+") do
      local done = piece:match("%] (%d+)/300")
      if done then
        done = tonumber(done)
        bars = bars + 1
        assert.is_true(done <= printed,
                       ("bar shows %d/300 with %d lines printed"):format(done, printed))
        last = done
      elseif piece:match("^%d+$") then
        printed = printed + 1
      end
    end
    assert.equal(300, printed)
    assert.is_true(bars > 0)
    assert.equal(300, last)
  end)
end)

describe("pool and job method errors", function()
  local pool
  setup(function() pool = lpar.pool(1) end)
  teardown(function() pool:close() end)

  -- The message of what f raises.
  local function raised(f)
    local ok, err = pcall(f)
    assert.is_false(ok)
    return err
  end

  it("name the method and count arguments as the user wrote them", function()
    -- called through pcall, Lua itself cannot tell the name
    local ok, err = pcall(pool.map, pool, {})
    assert.is_false(ok)
    assert.equal("bad argument #1 to 'map' (function expected, got table)", err)
    ok, err = pcall(pool.imap, pool, print, {}, 5)
    assert.is_false(ok)
    assert.equal("bad argument #3 to 'imap' (table expected, got number)", err)
    ok, err = pcall(pool.submit, pool, print, {}, {progress = 1})
    assert.is_false(ok)
    assert.equal("bad argument #3 to 'submit' (progress must be a boolean or a function)", err)
    assert.matches("bad argument #1 to 'map' %(function expected, got table%)$",
                   raised(function() return pool:map({}) end))
    assert.matches("bad argument #1 to 'submit' %(function expected, got nil%)$",
                   raised(function() return pool:submit() end))
    assert.matches("bad argument #2 to 'imap' %(table or iterator function expected, got number%)$",
                   raised(function() return pool:imap(print, 5) end))
    assert.matches("bad argument #3 to 'map' %(unknown option 'bogus'%)$",
                   raised(function() return pool:map(print, {}, {bogus = 1}) end))
  end)

  it("say where the call is", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() return pool:map({}) end)
    assert.equal(("%s:%d: bad argument #1 to 'map' (function expected, got table)"):format(
                   debug.getinfo(1, "S").short_src, line),
                 err)
  end)

  it("say so when self is not a pool or a job", function()
    local ok, err = pcall(pool.map, 5)
    assert.is_false(ok)
    assert.equal("calling 'map' on bad self (lpar.Pool expected, got number)", err)
    assert.matches("calling 'map' on bad self %(lpar.Pool expected, got number%)$",
                   raised(function() return pool.map(5) end))
    local job = pool:submit(print, {})
    assert.matches("calling 'wait' on bad self %(lpar.Job expected, got table%)$",
                   raised(function() return job.wait({}) end))
    assert.matches("calling 'progress' on bad self %(lpar.Job expected, got no value%)$",
                   raised(function() return job.progress() end))
  end)

  it("leave errors of the items as they are", function()
    local err = raised(function() return pool:map(function() error("mine") end, {1}) end)
    assert.matches("^item 1: .*: mine", err)
  end)
end)

describe("tracebacks", function()
  local dir
  setup(function()
    dir = H.tmpdir()
    H.writefile(dir .. "/fail.lua", 'return function(line)\n' ..
                '  if line == "b" then error("bad " .. line) end\n' ..
                '  return line\nend\n')
    H.writefile(dir .. "/top.lua", 'local x = nil\nreturn x.y\n')
  end)
  teardown(function() H.rmdir(dir) end)

  local want = 'lpar: line 2 ("b"): fail.lua:2: bad b\nstack traceback:\n' ..
               "\t[C]: in function 'error'\n\tfail.lua:2: in function <fail.lua:1>\n" ..
               "lpar: 1 of 3 items failed\n"

  -- every way the CLI runs an item: batches, one by one (--retries), timed
  -- (--joblog)
  for _, opts in ipairs({"", "--retries 1", "--joblog log.txt", "-j1"}) do
    it("name the user's function as written in the CLI (" .. (opts == "" and "plain" or opts) .. ")", function()
      local rc, out, err = H.run(("cd %s && %s %s fail.lua"):format(H.quote(dir), H.quote(H.cli), opts),
                                 "a\nb\nc\n")
      assert.equal(1, rc)
      assert.equal("a\nc\n", out)
      assert.equal(want, err)
    end)
  end

  it("show no xpcall or lpar frames for a script that fails as it loads", function()
    local rc, _, err = H.run(("cd %s && %s top.lua"):format(H.quote(dir), H.quote(H.cli)), "a\n")
    assert.equal(2, rc)
    assert.equal("lpar: top.lua:2: attempt to index a nil value (local 'x')\nstack traceback:\n" ..
                 "\ttop.lua:2: in main chunk\n", err)
  end)

  it("are left out, not left empty, when lpar itself fails an item (JSON)", function()
    local rc, _, err = H.lpar("--json -e 'return function() return print end'", "a\n", 60)
    assert.equal(1, rc)
    assert.equal('lpar: line 1 ("a"): cannot print a function result\nlpar: 1 of 1 items failed\n', err)
  end)

  it("of the module stop at the user's function, serial runs too", function()
    local function helper(x) error("bad " .. x) end
    local function f(x) helper(x) return x end
    for _, nw in ipairs({2, 0}) do
      local ok, err = pcall(lpar.parallel, f, {1}, nw)
      assert.is_false(ok)
      assert.matches("^item 1: [^\n]*: bad 1\nstack traceback:\n", err)
      assert.matches("in upvalue 'helper'\n\t[^\n]*: in function <[^\n]*>$", err)
      assert.not_matches("in function 'pcall'", err)
      assert.not_matches("lpar.parallel", err)
      local ok2, err2 = pcall(function() for _ in lpar.imap(f, {1}, nw) do end end)
      assert.is_false(ok2)
      assert.matches("in upvalue 'helper'\n\t[^\n]*: in function <[^\n]*>$", err2)
    end
  end)
end)

describe("limits said as they are", function()
  it("names the largest timeout, in the module and the CLI", function()
    local ok, err = pcall(lpar.parallel, function(x) return x end, {1}, {timeout = 2e9})
    assert.is_false(ok)
    assert.matches("timeout must be at most 1e9 seconds, not 2000000000", err, 1, true)
    local rc, out, said = H.lpar("--timeout 1000000001 -e " .. H.quote("function(s) return s end") ..
                                 " ::: a")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("^lpar: bad value for '%-%-timeout': '1000000001' %(at most 1e9 seconds%)", said)
  end)

  it("does not call a worker without close slow to leave for a tiny timeout", function()
    -- each worker is given at least a second to leave: none is reported
    -- (an item may itself outlast so tiny a timeout on a loaded machine:
    -- such failures are collected, and only the leaving is checked)
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      for _ = 1, 5 do
        local _, n = lpar.parallel(function(x) return x * 2 end, {1, 2, 3, 4},
                                   {timeout = 1e-12, n_workers = 4, on_error = "collect"})
        io.write(n, "\n")
      end
    ]])
    assert.equal(0, rc, err)
    assert.equal(("4\n"):rep(5), out)
    assert.not_matches("leave", err)
  end)
end)

describe("sizes", function()
  it("take units in any case and refuse a fraction of a byte, in the module and the CLI", function()
    local F = H.quote("function(s) return s end")
    for _, v in ipairs({"64MIB", "64MI", "64mib", "64Mb"}) do
      local rc, out, err = H.lpar("--max-memory " .. v .. " -e " .. F .. " ::: a")
      assert.equal(0, rc, err)
      assert.equal("a\n", out)
      local r = lpar.parallel(function(x) return x end, {1}, {max_memory = v, n_workers = 1})
      assert.same({1}, r)
    end
    local rc, out, err = H.lpar("--max-memory 1048576.5 -e " .. F .. " ::: a")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("^lpar: bad value for '%-%-max%-memory': '1048576.5' is a fraction of a byte", err)
    for _, v in ipairs({"1048576.5", 1048576.5}) do
      local ok, why = pcall(lpar.parallel, function(x) return x end, {1}, {max_memory = v})
      assert.is_false(ok)
      assert.matches("max_memory '1048576.5' is a fraction of a byte", why, 1, true)
    end
  end)
end)
