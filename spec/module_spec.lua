-- The lpar module as a Lua program uses it: lpar.parallel and lpar.imap
-- over real forked workers.
local lpar = require "lpar"
local H = require "spec.helper"
local unistd = require "posix.unistd"
local signal = require "posix.signal"
local wait = require "posix.sys.wait"

local function double(x) return x * 2 end

-- 5.3 and 5.4 keep integers and floats apart; 5.1, 5.2 and LuaJIT have
-- doubles only (spec/versions_spec.lua)
local INTEGERS = math.type ~= nil
local MiB = 1048576
local unpack = table.unpack or rawget(_G, "unpack") -- 5.1, LuaJIT

-- The bits of a double, to compare floats bit for bit: string.pack's on
-- 5.3+, else the shortest decimal that reads back as the same double
-- (it tells -0.0 from 0.0 and keeps every bit of the others).
local function bits(x)
  if string.pack then return string.pack("<d", x) end
  return ("%.17g"):format(x)
end

local range = H.range

local function distinct(t)
  local seen, n = {}, 0
  for _, v in pairs(t) do
    if not seen[v] then seen[v], n = true, n + 1 end
  end
  return n
end

local lua = H.lua

describe("lpar.parallel", function()
  it("returns results in item order and the item count", function()
    local r, n = lpar.parallel(double, {1, 2, 3})
    assert.same({2, 4, 6}, r)
    assert.equal(3, n)
  end)

  it("keeps item order over many items and workers", function()
    local r, n = lpar.parallel(double, range(10000), 4)
    assert.equal(10000, n)
    for i = 1, 10000 do assert.equal(2 * i, r[i]) end
  end)

  it("leaves holes where f returns nil and keeps only the first value", function()
    local r, n = lpar.parallel(function(x)
      if x % 2 == 0 then return nil end
      return x, "dropped"
    end, range(6), 3)
    assert.equal(6, n)
    assert.same({[1] = 1, [3] = 3, [5] = 5}, r)
  end)

  it("returns an empty table and 0 for no items, without calling f", function()
    local before = #H.children()
    local r, n = lpar.parallel(function() error("called") end, {})
    assert.same({}, r)
    assert.equal(0, n)
    assert.equal(before, #H.children())
  end)

  it("honours items.n, as table.pack sets it", function()
    local r, n = lpar.parallel(function(x) return x == nil end,
      {n = 4, 1, nil, 3, nil}, 2)
    assert.equal(4, n)
    assert.same({false, true, false, true}, r)
  end)

  it("uses 8 workers by default", function()
    assert.equal(8, lpar.default_workers)
    local dir = H.tmpdir()
    local r = lpar.parallel(function(i)
      assert(H.barrier(dir, 8, i), "fewer than 8 workers ran at once")
      return unistd.getpid()
    end, range(8))
    H.rmdir(dir)
    assert.equal(8, distinct(r))
  end)

  it("uses the number of workers it is given, and never more than items", function()
    local dir = H.tmpdir()
    local r = lpar.parallel(function(i)
      assert(H.barrier(dir, 3, i), "fewer than 3 workers ran at once")
      return unistd.getpid()
    end, range(6), 3)
    H.rmdir(dir)
    assert.equal(3, distinct(r))
    dir = H.tmpdir()
    r = lpar.parallel(function(i)
      assert(H.barrier(dir, 2, i), "fewer than 2 workers ran at once")
      return unistd.getpid()
    end, range(2), 16)
    H.rmdir(dir)
    assert.equal(2, distinct(r))
  end)

  it("runs in the calling process with 0 workers", function()
    local seen = {}
    local r = lpar.parallel(function(x)
      seen[#seen + 1] = x
      return unistd.getpid()
    end, {1, 2, 3}, 0)
    assert.same({1, 2, 3}, seen)
    assert.same({unistd.getpid(), unistd.getpid(), unistd.getpid()}, r)
  end)

  describe("rejects bad arguments", function()
    local function fails(pattern, ...)
      local args = {n = select("#", ...), ...}
      -- not a tail call: LuaJIT names no function called so ('?')
      local function call() return (lpar.parallel(unpack(args, 1, args.n))) end
      assert.has_error(call)
      local ok, err = pcall(call)
      assert.is_false(ok)
      assert.matches(pattern, err)
    end

    it("a negative worker count", function()
      fails("bad argument #3 to 'parallel' %(n_workers must be a non%-negative integer%)",
        double, {1}, -1)
    end)
    it("a fractional worker count", function()
      fails("bad argument #3 to 'parallel' %(n_workers must be a non%-negative integer%)",
        double, {1}, 1.5)
    end)
    it("NaN as worker count", function()
      fails("bad argument #3 to 'parallel'", double, {1}, 0 / 0)
    end)
    it("a string as worker count", function()
      fails("bad argument #3 to 'parallel' %(number or table expected, got string%)",
        double, {1}, "4")
    end)
    it("a bad n_workers field", function()
      fails("bad argument #3 to 'parallel' %(n_workers must be a number, got string%)",
        double, {1}, {n_workers = "x"})
    end)
    it("an unknown option", function()
      fails("bad argument #3 to 'parallel' %(unknown option 'n_worker'%)",
        double, {1}, {n_worker = 2})
    end)
    it("a bad chunksize", function()
      fails("chunksize must be at least 1", double, {1}, {chunksize = 0})
      fails("chunksize must be a non%-negative integer", double, {1}, {chunksize = 2.5})
    end)
    it("a bad on_error", function()
      fails("on_error must be 'raise' or 'collect'", double, {1}, {on_error = "ignore"})
    end)
    it("a bad timeout", function()
      fails("timeout must be a positive number", double, {1}, {timeout = -1})
    end)
    it("a non-callable f", function()
      fails("bad argument #1 to 'parallel' %(function expected, got number%)", 42, {1})
      fails("bad argument #1 to 'parallel' %(function expected, got table%)", {}, {1})
    end)
    it("items that are neither a table nor an iterator", function()
      fails("bad argument #2 to 'parallel' %(table or iterator function expected, got string%)",
        double, "abc")
    end)
    it("a negative items.n", function()
      fails("'n' must not be negative", double, {n = -2})
    end)
    it("an items.n that is no whole number (a whole float counts)", function()
      fails("'n' must be a whole number of items, not 3.5", double, {n = 3.5, 1, 2, 3, 4})
      fails("'n' must be a whole number of items, not string", double, {n = "2", 1, 2})
      fails("'n' must be a whole number of items, not boolean", double, {n = true, 1})
      assert.same({2, 4}, lpar.parallel(double, {n = 4 / 2, 1, 2, 3}, 2))
    end)
  end)

  describe("accepts any callable", function()
    it("a closure with upvalues", function()
      local base, scale = 100, {k = 3}
      local r = lpar.parallel(function(x) return base + x * scale.k end, {1, 2}, 2)
      assert.same({103, 106}, r)
    end)
    it("a C function", function()
      assert.same({"A", "BC"}, (lpar.parallel(string.upper, {"a", "bc"}, 2)))
    end)
    it("a table with __call", function()
      local obj = setmetatable({k = 5}, {__call = function(self, x) return self.k * x end})
      assert.same({5, 10}, (lpar.parallel(obj, {1, 2}, 2)))
    end)
    it("a function using open userdata from the caller", function()
      local path = os.tmpname()
      local w = assert(io.open(path, "w")); w:write("hello\n"); w:close()
      local fh = assert(io.open(path))
      local r = lpar.parallel(function() fh:seek("set"); return fh:read("*l") end, {1, 2}, 2)
      fh:close()
      os.remove(path)
      assert.same({"hello", "hello"}, r)
    end)
  end)

  describe("forks workers that inherit the caller's state", function()
    it("sees globals and modules set before the call", function()
      _G.LPAR_SPEC_GLOBAL = 41
      local r = lpar.parallel(function(x) return LPAR_SPEC_GLOBAL + x end, {1}, 1) -- luacheck: ignore
      assert.same({42}, r)
      _G.LPAR_SPEC_GLOBAL = nil
    end)

    it("keeps side effects of workers away from the caller", function()
      local t = {count = 0}
      lpar.parallel(function(x) t.count = t.count + x; return t.count end, range(4), 2)
      assert.equal(0, t.count)
    end)

    it("reseeds math.random in each worker", function()
      local r = lpar.parallel(function()
        H.sleep(0.2)
        -- 5.1's math.random(m, n) takes C ints: its floats there
        return INTEGERS and math.random(1, 2 ^ 40) or math.random()
      end, range(4), 4)
      assert.equal(4, distinct(r))
    end)

    it("runs a nested parallel serially inside a worker", function()
      local r = lpar.parallel(function()
        local inner = lpar.parallel(function() return unistd.getpid() end, {1, 2, 3}, 3)
        return inner[1] == unistd.getpid() and inner[2] == inner[1] and inner[3] == inner[1]
      end, {1, 2}, 2)
      assert.same({true, true}, r)
    end)

    it("gives each worker only its own pipes", function()
      local before = H.fdcount()
      local r = lpar.parallel(function()
        H.sleep(0.2)
        return H.fdcount()
      end, range(4), 4)
      -- the caller's fds, plus the two ends of its own channels
      assert.same({before + 2, before + 2, before + 2, before + 2}, r)
    end)
  end)

  describe("leaves the caller as it found it", function()
    it("keeps its fd count and leaves no child behind", function()
      local fds = H.fdcount()
      for _ = 1, 20 do lpar.parallel(double, range(50), 4) end
      assert.equal(fds, H.fdcount())
      assert.same({}, H.children())
    end)

    it("reaps only its own workers, never another child of the caller", function()
      local pid = unistd.fork()
      if pid == 0 then
        H.sleep(0.3)
        unistd._exit(7)
      end
      lpar.parallel(function() H.sleep(0.5); return 1 end, {1, 2}, 2)
      local _, how, code = wait.wait(pid)
      assert.equal("exited", how)
      assert.equal(7, code)
    end)

    it("restores the caller's SIGINT handler", function()
      local caught = 0
      local old = signal.signal(signal.SIGINT, function() caught = caught + 1 end)
      lpar.parallel(double, range(10), 2)
      signal.raise(signal.SIGINT)
      signal.signal(signal.SIGINT, old)
      assert.equal(1, caught)
    end)

    it("flushes stdio before forking, so nothing is written twice", function()
      local rc, out = lua [[
        local lpar = require "lpar"
        io.write("before ")
        lpar.parallel(function(x) return x end, {1, 2, 3, 4}, 4)
        io.write("after\n")
      ]]
      assert.equal(0, rc)
      assert.equal("before after\n", out)
    end)

    it("runs no finalizer or exit handler of the host in a worker", function()
      local rc, out = lua [[
        local lpar = require "lpar"
        local function gc() io.write("gc\n") end
        if newproxy then -- 5.1 and LuaJIT: only userdata have finalizers
          _G.keep = newproxy(true)
          getmetatable(_G.keep).__gc = gc
        else
          _G.keep = setmetatable({}, {__gc = gc})
        end
        lpar.parallel(function(x) return x end, {1, 2, 3}, 3)
      ]]
      assert.equal(0, rc)
      assert.equal("gc\n", out)
    end)
  end)

  describe("on errors", function()
    it("raises 'item i:' with the message and the worker's traceback", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 3 then error("boom") end
        return x
      end, range(5), 2)
      assert.is_false(ok)
      assert.matches("^item 3: .-module_spec.lua:%d+: boom\nstack traceback:\n", err)
      assert.same({}, H.children())
    end)

    it("stops handing out work after a failure", function()
      local path = os.tmpname()
      local ok = pcall(lpar.parallel, function(x)
        if x == 1 then error("first") end
        local f = io.open(path, "a"); f:write(x, "\n"); f:close()
        H.sleep(0.05)
      end, range(200), {n_workers = 2, chunksize = 1})
      local f = io.open(path); local text = f:read("*a"); f:close()
      os.remove(path)
      assert.is_false(ok)
      local _, ran = text:gsub("\n", "")
      assert.is_true(ran < 50, "ran " .. ran .. " items after the failure")
    end)

    it("preserves a table error value", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 2 then error({code = 7, why = "bad"}) end
      end, {1, 2}, 2)
      assert.is_false(ok)
      assert.same({code = 7, why = "bad"}, err)
    end)

    it("collects errors by item with on_error = 'collect'", function()
      local r, n, errs = lpar.parallel(function(x)
        if x % 3 == 0 then error("no " .. x, 0) end
        return x
      end, range(7), {n_workers = 2, on_error = "collect"})
      assert.equal(7, n)
      assert.same({[1] = 1, [2] = 2, [4] = 4, [5] = 5, [7] = 7}, r)
      local failed = {}
      for i in pairs(errs) do failed[#failed + 1] = i end
      table.sort(failed)
      assert.same({3, 6}, failed)
      assert.matches("^no 3\nstack traceback:", errs[3])
    end)

    it("collects errors in serial mode too", function()
      local r, n, errs = lpar.parallel(function(x)
        if x == 2 then error("two", 0) end
        return x
      end, {1, 2, 3}, {n_workers = 0, on_error = "collect"})
      assert.equal(3, n)
      assert.same({[1] = 1, [3] = 3}, r)
      assert.matches("^two", errs[2])
    end)

    it("raises 'item i:' in serial mode", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 2 then error("two") end
      end, {1, 2}, 0)
      assert.is_false(ok)
      assert.matches("^item 2: .-two", err)
    end)

    it("raises every byte of the message in serial mode, with its traceback", function()
      local ok, err = pcall(lpar.parallel, function() error("a\0b", 0) end, {1}, 0)
      assert.is_false(ok)
      assert.equal("item 1: a\0b\nstack traceback:", err:match("^[^\n]*\n[^\n]*"))
      assert.not_matches("in %?", err) -- no level of lpar's own
    end)

    it("makes an error of the items table's __index item i's in serial mode", function()
      local items = setmetatable({n = 3}, {__index = function(_, i)
        if i == 2 then error("idx", 0) end
        return i
      end})
      local ok, err = pcall(lpar.parallel, function(x) return x end, items, 0)
      assert.is_false(ok)
      assert.matches("^item 2: idx\n", err)
      local r, n, errs = lpar.parallel(function(x) return x end, items,
                                       {n_workers = 0, on_error = "collect"})
      assert.equal(3, n)
      assert.equal(1, r[1])
      assert.equal(3, r[3])
      assert.matches("^idx\n", errs[2])
    end)

    it("names a worker that exits, with its status, and does not hang", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 2 then os.exit(3) end
        return x
      end, range(4), {n_workers = 2, chunksize = 1})
      assert.is_false(ok)
      assert.matches("^item 2: worker %d+ exited with status 3", err)
      assert.same({}, H.children())
    end)

    it("names a worker killed by a signal", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 3 then signal.kill(unistd.getpid(), signal.SIGKILL) end
        return x
      end, range(4), {n_workers = 2, chunksize = 1})
      assert.is_false(ok)
      assert.matches("^item 3: worker %d+ killed by signal 9 %(SIGKILL%)", err)
      assert.same({}, H.children())
    end)

    it("names the item even when a chunk held many", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 57 then os.exit(0) end
        return x
      end, range(100), {n_workers = 1, chunksize = 100})
      assert.is_false(ok)
      assert.matches("^item 57: worker %d+ exited with status 0", err)
    end)

    it("raises 'interrupted' on SIGINT and stops every worker", function()
      local parent = unistd.getpid()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 1 then signal.kill(parent, signal.SIGINT) end
        H.sleep(5)
      end, range(4), 4)
      assert.is_false(ok)
      assert.matches("interrupted", err)
      assert.same({}, H.children())
    end)
  end)

  describe("carries results of every kind", function()
    local function roundtrip(v)
      return lpar.parallel(function() return v end, {1}, 1)[1]
    end

    if INTEGERS then
      it("integers over 64 bits, distinct from floats (5.3, 5.4)", function()
        for _, v in ipairs{0, 1, -1, math.maxinteger, math.mininteger, 9007199254740992} do
          local got = roundtrip(v)
          assert.equal(v, got)
          assert.equal("integer", math.type(got))
        end
        assert.equal("float", math.type(roundtrip(3.0)))
      end)
    else
      it("integral numbers exactly, to 2^53 and past it (5.1, 5.2, LuaJIT: doubles)", function()
        for _, v in ipairs{0, 1, -1, 2 ^ 53, -2 ^ 53, 2 ^ 53 - 1, 2 ^ 63, -2 ^ 63, 2 ^ 64, 3.0} do
          local got = roundtrip(v)
          assert.equal(v, got)
          assert.equal(bits(v), bits(got))
        end
      end)
    end

    it("floats bit for bit", function()
      assert.equal(-math.huge, 1 / roundtrip(-0.0))
      assert.equal(math.huge, roundtrip(math.huge))
      assert.equal(-math.huge, roundtrip(-math.huge))
      local nan = roundtrip(0 / 0)
      assert.is_true(nan ~= nan)
      assert.equal(0.1, roundtrip(0.1))
      assert.equal(bits(5e-324), bits(roundtrip(5e-324)))
      assert.equal(bits(1 / 3), bits(roundtrip(1 / 3)))
    end)

    it("booleans and binary strings", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local s = table.concat(bytes) .. "\0end"
      assert.same({true, false, s, ""}, lpar.parallel(function(i)
        return ({true, false, s, ""})[i]
      end, range(4), 2))
    end)

    it("a 100 MB string", function()
      local r = lpar.parallel(function(i) return string.rep(string.char(64 + i), 100 * MiB) end, {1}, 1)
      assert.equal(100 * MiB, #r[1])
      assert.equal(string.rep("A", 100 * MiB), r[1])
    end)

    it("nested tables with shared subtables and cycles", function()
      local r = lpar.parallel(function()
        local shared = {"s"}
        local t = {a = shared, b = shared, list = {1, 2, {3}}, [true] = "yes", [1.5] = "f"}
        t.self = t
        return t
      end, {1}, 1)[1]
      assert.equal(r, r.self)
      assert.equal(r.a, r.b)
      assert.same({"s"}, r.a)
      assert.same({1, 2, {3}}, r.list)
      assert.equal("yes", r[true])
      assert.equal("f", r[1.5])
    end)
  end)

  describe("sends big results through the ring it shares with each worker", function()
    local rchar, payload = H.rchar, H.payload

    it("so that the caller does not read them from a pipe", function()
      local before = rchar()
      local r, n = lpar.parallel(function(i) return payload(i, MiB) end, range(40), 2)
      local read = rchar() - before
      assert.equal(40, n)
      for i = 1, 40 do assert.equal(payload(i, MiB), r[i]) end
      assert.is_true(read < MiB, "the caller read " .. read .. " bytes")
    end)

    it("intact at every size, around its limits and past them, over many laps", function()
      local sizes = {1000, 64 * 1024 - 40, 64 * 1024, 300 * 1024, 2 * MiB - 40,
        2 * MiB, 3 * MiB, 5 * MiB}
      local items = {}
      for _ = 1, 6 do
        for _, size in ipairs(sizes) do items[#items + 1] = size end
      end
      local r, n = lpar.parallel(function(size) return payload(size, size) end,
        items, {n_workers = 1, chunksize = 4})
      assert.equal(#items, n)
      for i, size in ipairs(items) do assert.equal(payload(size, size), r[i]) end
    end)

    it("while a caller slow to take them keeps the ring full", function()
      local got = 0
      for i, v in lpar.imap(function(i) return payload(i, 700 * 1024) end, range(30), 2) do
        assert.equal(payload(i, 700 * 1024), v)
        got = got + 1
        H.sleep(0.01) -- the workers wait for room in their rings
      end
      assert.equal(30, got)
    end)
  end)

  it("lets a worker collect a run the caller dropped unfinished, untouched", function()
    -- the dropped run is garbage the workers of the next run inherit;
    -- collecting it there must not kill its workers or unmap its rings
    local step, run = lpar.imap(function(x)
      return string.rep("d", MiB) .. unistd.getpid() .. "/" .. x
    end, range(50), 2)
    local _, first = step(run)
    local pid = tonumber(first:match("(%d+)/1$"))
    step, run, first = nil, nil, nil -- luacheck: ignore
    collectgarbage("stop") -- so that the workers, not the caller, collect it first
    for _ = 1, 3 do
      local r, n = lpar.parallel(function(x)
        local s = string.rep("x", 3 * MiB) .. x
        collectgarbage()
        return #s
      end, range(8), 2)
      assert.equal(8, n)
      for i = 1, 8 do assert.equal(3 * MiB + 1, r[i]) end
    end
    local state = H.slurp("/proc/" .. pid .. "/stat"):match("^%d+ %b() (%a)")
    assert.not_equal("Z", state, "a worker of the dropped run was killed")
    collectgarbage("restart")
    collectgarbage() -- now the caller stops it
    assert.is_false(H.alive(pid))
  end)

  describe("refuses results that cannot travel", function()
    it("names the item and the path of a function", function()
      local ok, err = pcall(lpar.parallel, function(x)
        if x == 4 then return {1, {cb = print}} end
        return x
      end, range(5), 2)
      assert.is_false(ok)
      assert.equal("item 4: cannot serialize result: [2].cb is a function", err)
    end)

    it("names userdata and coroutines", function()
      local ok, err = pcall(lpar.parallel, function() return io.stdout end, {1}, 1)
      assert.is_false(ok)
      assert.equal("item 1: cannot serialize result: value is a userdata", err)
      ok, err = pcall(lpar.parallel, function() return {co = coroutine.create(function() end)} end, {1}, 1)
      assert.is_false(ok)
      assert.equal("item 1: cannot serialize result: co is a thread", err)
    end)
  end)

  describe("schedules", function()
    it("hands out chunks of the given size to one worker each", function()
      local r = lpar.parallel(function() H.sleep(0.01); return unistd.getpid() end,
        range(20), {n_workers = 4, chunksize = 5})
      for c = 0, 3 do
        for i = 2, 5 do assert.equal(r[c * 5 + 1], r[c * 5 + i]) end
      end
    end)

    it("gives slow items one at a time to each worker", function()
      -- a worker holding two items would wait at the barrier with its
      -- second one never started, and the call would fail
      local dir = H.tmpdir()
      local r = lpar.parallel(function(i)
        assert(H.barrier(dir, 8, i), "fewer than 8 items ran at once")
        return unistd.getpid()
      end, range(8), 8)
      H.rmdir(dir)
      assert.equal(8, distinct(r))
    end)
  end)

  describe("takes items from an iterator", function()
    it("reads them lazily and sends them to the workers", function()
      local i = 0
      local r, n = lpar.parallel(function(s) return s:upper() end, function()
        i = i + 1
        if i <= 1000 then return "x" .. i end
      end, 3)
      assert.equal(1000, n)
      assert.equal("X1", r[1])
      assert.equal("X1000", r[1000])
    end)
  end)
end)

describe("lpar.imap", function()
  it("yields index and result in item order", function()
    local got = {}
    for i, v in lpar.imap(function(x)
      H.sleep(x % 3 == 0 and 0.05 or 0)
      return x * 10
    end, range(30), 4) do
      got[#got + 1] = {i, v}
    end
    assert.equal(30, #got)
    for k = 1, 30 do assert.same({k, 10 * k}, got[k]) end
  end)

  it("yields in completion order with unordered = true", function()
    local order = {}
    for i in lpar.imap(function(x) H.sleep(x == 1 and 0.5 or 0); return x end,
      range(4), {n_workers = 4, unordered = true}) do
      order[#order + 1] = i
    end
    assert.equal(4, #order)
    assert.equal(1, order[4])
  end)

  it("reads an iterator as workers need it", function()
    local pulled = 0
    local function source()
      pulled = pulled + 1
      return pulled
    end
    if _VERSION == "Lua 5.4" then
      for i in lpar.imap(function(x) return x end, source, 2) do
        if i == 10 then break end
      end
    else -- no closing value: the workers stop when the dropped iterator is collected
      local step, run = lpar.imap(function(x) return x end, source, 2)
      local i
      repeat i = step(run) until i == nil or i >= 10
      assert.equal(10, i)
      step, run = nil, nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
    end
    assert.is_true(pulled < 100000)
    assert.same({}, H.children())
  end)

  it("stops its workers when the loop breaks", function()
    if _VERSION ~= "Lua 5.4" then return pending("5.4: a loop's closing value stops the workers at once") end
    for i in lpar.imap(function(x) H.sleep(0.05); return x end, range(100), 4) do
      if i == 3 then break end
    end
    assert.same({}, H.children())
  end)

  it("stops its workers when the caller drops it unfinished and it is collected", function()
    -- what stops them before 5.4, which has no closing value
    local step, run = lpar.imap(function(x) H.sleep(0.05); return x end, range(100), 4)
    for k = 1, 3 do assert.equal(k, (step(run))) end
    assert.equal(4, #H.children())
    step, run = nil, nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.same({}, H.children())
  end)

  it("returns errors as a third value with on_error = 'collect'", function()
    local errs = {}
    for i, v, err in lpar.imap(function(x)
      if x == 2 then error("two", 0) end
      return x
    end, range(3), {n_workers = 2, on_error = "collect"}) do
      if err then errs[i] = err else assert.equal(i, v) end
    end
    assert.matches("^two", errs[2])
  end)
end)

describe("per-worker init and close", function()
  it("runs init in each worker before its items", function()
    local r = lpar.parallel(function(x) return WORKER_STATE + x end, range(4), -- luacheck: ignore
      {n_workers = 2, init = function() WORKER_STATE = 100 end}) -- luacheck: ignore
    assert.same({101, 102, 103, 104}, r)
    assert.is_nil(rawget(_G, "WORKER_STATE"))
  end)

  it("fails the run when init fails", function()
    local ok, err = pcall(lpar.parallel, double, range(4),
      {n_workers = 2, init = function() error("no database") end})
    assert.is_false(ok)
    assert.matches("^worker init failed: .-no database", err)
    assert.same({}, H.children())
  end)
end)

describe("lpar.encode and lpar.decode", function()
  it("round-trip a value", function()
    local v = {1, "two", {three = 3.0}, [false] = true}
    assert.same(v, lpar.decode(lpar.encode(v)))
  end)
end)

describe("lpar on_event", function()
  it("tells each item's start and end in parallel and imap", function()
    local seen = {}
    local _, _, errs = lpar.parallel(function(x)
      if x == 2 then error("two") end
      return x
    end, {1, 2, 3}, {n_workers = 2, on_error = "collect",
                     on_event = function(ev) seen[#seen + 1] = ev end})
    assert.matches("two", errs[2])
    local ends, starts = {}, 0
    for _, ev in ipairs(seen) do
      if ev.event == "start" then
        starts = starts + 1
      else
        ends[ev.item] = ev.status
      end
    end
    assert.equal(3, starts)
    assert.same({"ok", "failed", "ok"}, ends)
    local n = 0
    for _ in lpar.imap(function(x) return x end, {1, 2, 3, 4},
                       {n_workers = 2, on_event = function(ev)
                         if ev.event == "end" then n = n + 1 end
                       end}) do
    end
    assert.equal(4, n)
    assert.has_error(function() lpar.parallel(print, {1}, {on_event = 3}) end,
                     "bad argument #3 to 'parallel' (on_event must be a function)")
  end)

  it("ends every start once: tries that failed or were lost, and items whose worker was lost", function()
    -- one worker, one chunk of 4: item 1 raises, item 3 kills its worker
    -- (items 2 and 4 of its chunk go back unblamed)
    local function f(x)
      if x == 1 then error("boom", 0) end
      if x == 3 then os.exit(5) end
      return x
    end
    for retries = 0, 2 do
      local open, tries, last = {}, {}, {}
      local function on_event(ev)
        local name = ("item %d, retries %d: "):format(ev.item, retries)
        if ev.event == "start" then
          assert.is_nil(open[ev.item], name .. "a second start before an end")
          assert.equal((tries[ev.item] or 0) + 1, ev.attempt, name .. "attempt")
          open[ev.item] = ev.attempt
        else
          assert.equal(open[ev.item], ev.attempt, name .. "an end without its start")
          open[ev.item], tries[ev.item], last[ev.item] = nil, ev.attempt, ev.status
        end
      end
      for _ in lpar.imap(f, {1, 2, 3, 4}, {n_workers = 1, chunksize = 4, on_error = "collect",
                                          retries = retries, on_event = on_event}) do
      end
      assert.same({}, open)
      assert.same({retries + 1, 1, retries + 1, 1}, tries)
      assert.same({"failed", "ok", "lost", "ok"}, last)
    end
  end)
end)
