-- Persistent pools: workers forked once by lpar.pool and reused; functions
-- and items that travel to them; jobs polled without blocking; faults.
local lpar = require "lpar"
local H = require "spec.helper"
local unistd = require "posix.unistd"
local signal = require "posix.signal"
local poll = require "posix.poll"
local fcntl = require "posix.fcntl"

-- Pids of this process's children, zombies included.
local function children()
  local pids = {}
  for _, kid in ipairs(H.children()) do pids[#pids + 1] = kid.pid end
  return pids
end

local range = H.range

-- 5.3 and 5.4 keep integers and floats apart; 5.1, 5.2 and LuaJIT have
-- doubles only (spec/versions_spec.lua)
local INTEGERS = math.type ~= nil
local MiB = 1048576

local le = H.le

-- A value as text that tells every double apart (-0.0 from 0.0 too), and
-- on 5.3+ an integer from a float: %q's hexadecimal floats there.
local function exact(v)
  if INTEGERS or type(v) == "string" then return string.format("%q", v) end
  if type(v) == "number" then return ("%.17g"):format(v) end
  return tostring(v)
end

local function double(x) return x * 2 end

-- Busy-wait s seconds inside a worker (no sleep function in plain Lua).
local function spin(s)
  local t = os.clock()
  while os.clock() - t < s do end
end

local slurp = H.slurp

-- For items in pool workers (functions sent as bytecode carry no C
-- functions, so these take what they need with require). gatherat adds
-- the file 'key' to 'dir' and waits until 'dir' holds n files: n workers
-- are then running at once. waitgate waits until the file 'path' exists.
-- Both give up after a minute, returning false.
local function gatherat(dir, n, key)
  local dirent, time = require "posix.dirent", require "posix.time"
  io.open(dir .. "/" .. key, "w"):close()
  local t0 = os.time()
  repeat
    local c = 0
    for name in dirent.files(dir) do
      if name ~= "." and name ~= ".." then c = c + 1 end
    end
    if c >= n then return true end
    time.nanosleep({tv_sec = 0, tv_nsec = 5000000})
  until os.time() - t0 > 60
  return false
end

local function waitgate(path)
  local time = require "posix.time"
  local t0 = os.time()
  repeat
    local f = io.open(path)
    if f then f:close() return true end
    time.nanosleep({tv_sec = 0, tv_nsec = 5000000})
  until os.time() - t0 > 60
  return false
end

local function touch(path) assert(io.open(path, "w")):close() end

local function lines(path)
  local t = {}
  for l in (slurp(path) or ""):gmatch("[^\n]+") do t[#t + 1] = l end
  table.sort(t)
  return t
end

local function sorted(t)
  local r = {}
  for _, v in ipairs(t) do r[#r + 1] = v end
  table.sort(r)
  return r
end

local lua = H.lua

-- Wait until cond() holds, pumping the pool; false after 'limit' seconds.
local function eventually(pool, cond, limit)
  local deadline = H.now() + (limit or 5)
  while H.now() < deadline do
    pool:pump()
    if cond() then return true end
    H.sleep(0.01)
  end
  return false
end

describe("lpar.pool", function()
  local pool

  before_each(function() pool = lpar.pool{n_workers = 2} end)
  after_each(function() pool:close() end)

  it("forks its workers once and reuses them", function()
    local pids = pool:pids()
    assert.equal(2, #pids)
    assert.equal(2, #children())
    for _ = 1, 5 do pool:map(double, range(10)) end
    assert.same(pids, pool:pids())
    assert.equal(2, #children())
  end)

  it("runs items in the workers, not in the caller", function()
    local me = unistd.getpid()
    local r = pool:map(function() return require("posix.unistd").getpid() end,
      range(20), {chunksize = 1})
    for _, pid in ipairs(r) do
      assert.not_equal(me, pid)
      assert.is_true(pid == pool:pids()[1] or pid == pool:pids()[2])
    end
  end)

  it("returns results in item order and the item count", function()
    local r, n = pool:map(double, range(1000))
    assert.equal(1000, n)
    for i = 1, 1000 do assert.equal(2 * i, r[i]) end
  end)

  it("leaves holes for nil results and counts items.n", function()
    local r, n = pool:map(function(x) if x and x % 2 == 0 then return x end end,
      {n = 6, 1, 2, 3, 4, nil, 6})
    assert.equal(6, n)
    assert.same({[2] = 2, [4] = 4, [6] = 6}, r)
  end)

  it("takes items from an iterator", function()
    local r, n = pool:map(double, coroutine.wrap(function()
      for i = 1, 5 do coroutine.yield(i) end
    end))
    assert.equal(5, n)
    assert.same({2, 4, 6, 8, 10}, r)
  end)

  it("returns an empty table for no items", function()
    local r, n = pool:map(double, {})
    assert.same({}, r)
    assert.equal(0, n)
  end)

  it("carries values of every kind both ways, bit-exact", function()
    -- the widest integers: 64 bits on 5.3+, 2^53 (and past it, powers of
    -- two) in doubles
    local wide = INTEGERS and {math.maxinteger, math.mininteger} or {2 ^ 53, -2 ^ 53, 2 ^ 63}
    local items = {wide[1], wide[2], 0, -1 * 0.0, 1 / 0, -1 / 0,
      0.1, "", "a\0b", true, false, {1, {2, {3}}, k = "v"}, wide[3] or 1 / 3}
    local r = pool:map(function(x) return {x} end, items)
    for i, v in ipairs(items) do
      if type(v) == "table" then
        assert.same(v, r[i][1])
      else
        if INTEGERS then assert.equal(math.type(v), math.type(r[i][1])) end
        assert.equal(exact(v), exact(r[i][1]))
      end
    end
    local nan = pool:map(function() return 0 / 0 end, {1})[1]
    assert.is_true(nan ~= nan)
  end)

  it("raises 'item i:' with the message and the worker's traceback", function()
    local ok, err = pcall(pool.map, pool, function(x)
      if x == 3 then error("boom") end
      return x
    end, range(5))
    assert.is_false(ok)
    assert.matches("^item 3: .-pool_spec.lua:%d+: boom\nstack traceback:\n", err)
    assert.not_matches("busted", err) -- only the user's levels
  end)

  it("collects errors by item with on_error = 'collect'", function()
    local r, n, errs = pool:map(function(x)
      if x % 3 == 0 then error("no " .. x, 0) end
      return x
    end, range(7), {on_error = "collect"})
    assert.equal(7, n)
    assert.same({[1] = 1, [2] = 2, [4] = 4, [5] = 5, [7] = 7}, r)
    assert.matches("^no 3\nstack traceback:", errs[3])
    assert.matches("^no 6\nstack traceback:", errs[6])
    assert.is_nil(errs[1])
  end)

  it("keeps non-string error values", function()
    local _, _, errs = pool:map(function() error({code = 7}) end, {1},
      {on_error = "collect"})
    assert.same({code = 7}, errs[1])
  end)

  it("stays usable after a failed call", function()
    assert.has_error(function()
      pool:map(function() error("x") end, range(10))
    end)
    assert.same({2, 4, 6}, (pool:map(double, {1, 2, 3})))
    assert.equal(2, #pool:pids())
  end)

  it("refuses a result that cannot travel, for that item", function()
    local ok, err = pcall(pool.map, pool, function(x)
      if x == 2 then return {cb = print} end
      return x
    end, range(3))
    assert.is_false(ok)
    assert.matches("^item 2: cannot serialize result: cb is a function", err)
  end)

  it("refuses an item that cannot travel", function()
    local ok, err = pcall(pool.map, pool, double, {1, io.stdout})
    assert.is_false(ok)
    assert.matches("item 2: cannot send item: value is a userdata", err, 1, true)
  end)

  it("hands out fixed chunks with chunksize", function()
    local r = pool:map(function(x) return require("posix.unistd").getpid() + 0 * x end,
      range(8), {chunksize = 4})
    assert.equal(r[1], r[4])
    assert.equal(r[5], r[8])
  end)

  it("runs a nested lpar.parallel serially inside a worker", function()
    local r = pool:map(function(x)
      local inner = require("lpar").parallel(function(y) return y + 1 end, {x, x})
      return inner[1] + inner[2]
    end, {1, 2})
    assert.same({4, 6}, r)
    assert.equal(2, #children())
  end)

  it("cannot be made inside a worker", function()
    local _, _, errs = pool:map(function()
      require("lpar").pool{n_workers = 1}
    end, {1}, {on_error = "collect"})
    assert.matches("cannot make a pool inside a worker", errs[1])
  end)

  it("checks its arguments", function()
    assert.has_error(function() pool:map(42, {1}) end,
      "bad argument #1 to 'map' (function expected, got number)")
    assert.has_error(function() pool:map(double, "abc") end,
      "bad argument #2 to 'map' (table or iterator function expected, got string)")
    assert.has_error(function() pool:map(double, {1}, {n_workers = 2}) end,
      "bad argument #3 to 'map' (unknown option 'n_workers')")
    assert.has_error(function() pool:map(double, {1}, {on_error = "ignore"}) end,
      "bad argument #3 to 'map' (on_error must be 'raise' or 'collect')")
    assert.has_error(function() pool:map(double, {1}, {timeout = -1}) end,
      "bad argument #3 to 'map' (timeout must be a positive number of seconds)")
    assert.has_error(function() pool:map(double, {1}, {chunksize = 0}) end,
      "bad argument #3 to 'map' (chunksize must be at least 1)")
    assert.has_error(function() pool.map({}, double, {1}) end)
  end)
end)

describe("lpar.pool options", function()
  it("checks them", function()
    assert.has_error(function() lpar.pool{n_workers = 0} end,
      "bad argument #1 to 'pool' (n_workers must be a positive integer)")
    assert.has_error(function() lpar.pool{workers = 2} end,
      "bad argument #1 to 'pool' (unknown option 'workers')")
    assert.has_error(function() lpar.pool{init = 1} end,
      "bad argument #1 to 'pool' (init must be a function)")
    assert.same({}, children())
  end)

  it("takes a worker count as a number, and defaults to one per CPU", function()
    local p = H.closing(finally, lpar.pool(3))
    assert.equal(3, p:size())
    local q = H.closing(finally, lpar.pool())
    assert.is_true(q:size() >= 1)
  end)

  it("runs init once in each worker, before any item", function()
    local path = os.tmpname()
    local p = H.closing(finally, lpar.pool{n_workers = 2, init = function()
      _G.WORKER_BASE = 100
      local f = io.open(path, "a")
      f:write(require("posix.unistd").getpid(), "\n")
      f:close()
    end})
    assert.same({101, 102, 103}, (p:map(function(x) return WORKER_BASE + x end, {1, 2, 3}))) -- luacheck: ignore
    local got = lines(path)
    for i, v in ipairs(got) do got[i] = tonumber(v) end
    assert.same(sorted(p:pids()), sorted(got))
    assert.is_nil(_G.WORKER_BASE)
    os.remove(path)
  end)

  it("raises 'worker init failed' and leaves no worker behind", function()
    local ok, err = pcall(lpar.pool, {n_workers = 2, init = function() error("no db") end})
    assert.is_false(ok)
    assert.matches("^worker init failed: .-pool_spec.lua:%d+: no db\nstack traceback:", err)
    assert.same({}, children())
  end)

  it("runs close in each worker when the pool closes", function()
    local path = os.tmpname()
    local p = lpar.pool{n_workers = 2, close = function()
      local f = io.open(path, "a")
      f:write(require("posix.unistd").getpid(), "\n")
      f:close()
    end}
    local pids = sorted(p:pids())
    p:close()
    local got = lines(path)
    for i, v in ipairs(got) do got[i] = tonumber(v) end
    assert.same(pids, sorted(got))
    os.remove(path)
  end)

  it("gives workers the globals and modules of the parent at fork time", function()
    _G.PARENT_GLOBAL = 41
    local p = H.closing(finally, lpar.pool{n_workers = 1})
    _G.PARENT_GLOBAL = 0
    assert.same({42}, (p:map(function(x) return PARENT_GLOBAL + x end, {1}))) -- luacheck: ignore
    _G.PARENT_GLOBAL = nil
  end)

  it("reseeds math.random in each worker", function()
    local p = H.closing(finally, lpar.pool{n_workers = 2})
    -- 5.1's math.random(m) takes a C int: its floats there
    local r = p:map(function() return INTEGERS and math.random(2 ^ 40) or math.random() end,
      {1, 2}, {chunksize = 1})
    assert.not_equal(r[1], r[2])
  end)
end)

describe("function transfer", function()
  local pool

  setup(function() pool = lpar.pool{n_workers = 2} end)
  teardown(function() pool:close() end)

  local function one(f) return (pool:map(f, {1}))[1] end

  it("carries upvalues that are plain values", function()
    local n, s, b, none, t = 10, "str", true, nil, {1, 2, {x = 3}}
    assert.same({11, "str", true, true, 3},
      one(function(x) return {n + x, s, b, none == nil, t[3].x} end))
  end)

  it("keeps tables shared between upvalues shared, and cycles", function()
    local shared = {v = 1}
    local a, b = shared, shared
    local cyc = {}
    cyc.self = cyc
    assert.same({true, true}, one(function()
      return {rawequal(a, b), rawequal(cyc.self, cyc)}
    end))
  end)

  it("gives the worker copies: changes do not come back", function()
    local t = {n = 0}
    pool:map(function() t.n = t.n + 1 end, range(4))
    assert.equal(0, t.n)
  end)

  it("rebinds _ENV to the worker's globals", function()
    -- busted runs specs in an environment of their own: _G is not it
    local p = H.closing(finally, lpar.pool{n_workers = 1, init = function() _G.SEEN_IN_WORKER = "w" end})
    _G.SEEN_IN_WORKER = "parent"
    assert.same({"w"}, (p:map(function() return SEEN_IN_WORKER end, {1}))) -- luacheck: ignore
    _G.SEEN_IN_WORKER = nil
  end)

  it("carries Lua functions held as upvalues, recursively", function()
    local function sq(x) return x * x end
    local function sumsq(x) return sq(x) + sq(x + 1) end
    local function fact(k) if k <= 1 then return 1 end return k * fact(k - 1) end
    assert.same({5, 13}, (pool:map(function(x) return sumsq(x) end, {1, 2})))
    assert.same({1, 2, 6, 24}, (pool:map(fact, range(4))))
  end)

  it("keeps upvalues shared between closures shared (but in 5.1)", function()
    local count = 0
    local function bump() count = count + 1 end
    local r = pool:map(function() bump(); bump(); return count end, {1},
      {chunksize = 1})
    if _VERSION == "Lua 5.1" and not rawget(_G, "jit") then
      -- 5.1 has no upvalue identities: each function gets its own copy
      assert.same({0}, r)
    else
      assert.same({2}, r)
    end
    assert.equal(0, count)
  end)

  it("carries functions of loaded modules by name", function()
    local fmt, floor, concat = string.format, math.floor, table.concat
    local str, getpid = string, require("posix.unistd").getpid
    assert.equal("3|1-2|x|yes", one(function(x)
      return fmt("%d", floor(x + 2.5)) .. "|" .. concat({1, 2}, "-") .. "|" ..
        str.rep("x", x) .. "|" .. (getpid() > 0 and "yes" or "no")
    end))
    assert.same({"A", "B"}, (pool:map(string.upper, {"a", "b"})))
    assert.same({"1", "2"}, (pool:map(tostring, {1, 2})))
  end)

  it("keeps the source and lines of the function for tracebacks", function()
    local ok, err = pcall(pool.map, pool, function() local x = nil; return x.y end, {1})
    assert.is_false(ok)
    assert.matches("^item 1: .-pool_spec.lua:%d+: attempt to index", err)
  end)

  it("carries large upvalues", function()
    local big = string.rep("x", 4 * 1024 * 1024)
    assert.equal(#big, one(function() return #big end))
  end)

  it("refuses a userdata upvalue, naming it, before sending anything", function()
    local path = os.tmpname()
    local fh = io.stdout
    local ok, err = pcall(pool.submit, pool, function()
      local f = io.open(path, "a"); f:write("ran\n"); f:close()
      fh:write("")
    end, {1})
    assert.is_false(ok)
    assert.equal("cannot send the function: upvalue 'fh' is a userdata", err:match("cannot send.*"))
    assert.equal(0, pool:pump())
    -- each worker runs what it is sent in order: once both have run a later
    -- item, anything sent before would have run too
    local dir = H.tmpdir()
    pool:map(function(i) assert(gatherat(dir, 2, i)) end, {1, 2}, {chunksize = 1})
    H.rmdir(dir)
    assert.equal("", slurp(path))
    os.remove(path)
  end)

  it("refuses a coroutine upvalue", function()
    local co = coroutine.create(function() end)
    assert.has_error(function() pool:map(function() return co end, {1}) end,
      "cannot send the function: upvalue 'co' is a thread")
  end)

  it("refuses a C function that is not in a loaded module", function()
    local iter = string.gmatch("a b", "%a")
    assert.has_error(function() pool:map(function() return iter() end, {1}) end,
      "cannot send the function: upvalue 'iter' is a C function outside the loaded modules")
    assert.has_error(function() pool:map(iter, {1}) end,
      "cannot send the function: it is a C function outside the loaded modules")
  end)

  it("refuses a table upvalue holding a function, with the path", function()
    local cfg = {hooks = {on = function() end}}
    assert.has_error(function() pool:map(function() return cfg end, {1}) end,
      "cannot send the function: upvalue 'cfg' cannot travel: hooks.on is a function")
  end)

  it("names the function that holds a bad upvalue", function()
    local fh = io.stderr
    local function helper() return fh end
    assert.has_error(function() pool:map(function() return helper() end, {1}) end,
      "cannot send the function: upvalue 'fh' of 'helper' is a userdata")
  end)

  it("refuses a callable table", function()
    local callable = setmetatable({}, {__call = function() end})
    assert.has_error(function() pool:map(callable, {1}) end,
      "bad argument #1 to 'map' (function expected, got table)")
  end)
end)

describe("pool:submit and jobs", function()
  local pool

  before_each(function() pool = lpar.pool{n_workers = 2} end)
  after_each(function() pool:close() end)

  it("returns at once and finishes in the background", function()
    local gate = os.tmpname()
    os.remove(gate)
    -- no item can finish before the gate opens: submit must not wait for them
    local job = pool:submit(function(x) assert(waitgate(gate)); return x end, range(4))
    assert.equal("running", job:status())
    assert.is_false(job:done())
    touch(gate)
    local r, n = job:wait()
    os.remove(gate)
    assert.equal(4, n)
    assert.same(range(4), r)
    assert.equal("done", job:status())
  end)

  it("never blocks in done() and progress(), which advance the job", function()
    -- item x waits for the file x in dir: nothing finishes until the spec
    -- opens gates, so a done() that blocked would wait for a minute and
    -- then see the job failed
    local dir = H.tmpdir()
    local job = pool:submit(function(x) assert(waitgate(dir .. "/" .. x)); return x end,
      range(8), {chunksize = 1})
    for _ = 1, 200 do
      assert.is_false(job:done())
      assert.same({0, 8}, {job:progress()})
    end
    touch(dir .. "/1")
    touch(dir .. "/2")
    assert.is_true(H.waitfor(function() job:done(); return job:progress() == 2 end))
    assert.is_false(job:done())
    assert.same({2, 8}, {job:progress()})
    for i = 3, 8 do touch(dir .. "/" .. i) end
    assert.is_true(H.waitfor(function() return job:done() end))
    assert.same({8, 8}, {job:progress()})
    H.rmdir(dir)
    assert.same(range(8), (job:wait()))
    assert.same(range(8), (job:wait())) -- again, the same
  end)

  it("runs several jobs, oldest first, each with its own function", function()
    local a = pool:submit(function(x) return x + 1 end, range(50))
    local b = pool:submit(function(x) return x * 10 end, range(50))
    local c = pool:submit(function(x) return -x end, range(50))
    local rb = b:wait()
    local ra, rc = a:wait(), c:wait()
    for i = 1, 50 do
      assert.equal(i + 1, ra[i])
      assert.equal(i * 10, rb[i])
      assert.equal(-i, rc[i])
    end
  end)

  it("fails a job on an item error: done() is true, wait() raises", function()
    local job = pool:submit(function(x) if x == 2 then error("bad two") end return x end, range(3))
    assert.is_true(eventually(pool, function() return job:done() end))
    assert.equal("failed", job:status())
    local ok, err = pcall(job.wait, job)
    assert.is_false(ok)
    assert.matches("^item 2: .-bad two", err)
  end)

  it("cancels a job: its workers are replaced and the pool goes on", function()
    local pids = pool:pids()
    local job = pool:submit(function(x) spin(10); return x end, range(4))
    H.sleep(0.1)
    pool:pump()
    assert.is_true(job:cancel())
    assert.is_false(job:cancel())
    assert.is_true(job:done())
    assert.equal("cancelled", job:status())
    assert.has_error(function() job:wait() end, "cancelled")
    assert.same({3, 4}, (pool:map(function(x) return x + 2 end, {1, 2})))
    local now = pool:pids()
    assert.equal(2, #now)
    for _, pid in ipairs(now) do -- both were running its items: replaced
      assert.is_true(pid ~= pids[1] and pid ~= pids[2])
    end
    for _, pid in ipairs(pids) do
      assert.is_true(eventually(pool, function() return not H.alive(pid) end))
    end
  end)

  it("finishes a job whose handle was dropped", function()
    local path = os.tmpname()
    pool:submit(function(x)
      local f = io.open(path, "a"); f:write(x, "\n"); f:close()
    end, range(5))
    collectgarbage()
    collectgarbage()
    assert.is_true(eventually(pool, function() return #lines(path) == 5 end))
    assert.equal(0, pool:pump())
    os.remove(path)
  end)

  it("gives a host an fd that is readable when there is output", function()
    local fd = pool:fd()
    assert.is_number(fd)
    local job = pool:submit(function(x) spin(0.2); return x end, {1})
    pool:pump()
    local t0 = H.now()
    local ready = poll.rpoll(fd, 0)
    assert.equal(0, ready)
    ready = poll.rpoll(fd, 5000)
    assert.equal(1, ready)
    assert.is_true(H.now() - t0 > 0.1)
    assert.is_true(eventually(pool, function() return job:done() end))
    assert.equal(0, poll.rpoll(fd, 0)) -- handled: quiet again
  end)

  it("wakes the fd for a timeout, which job:done() then applies", function()
    local job = pool:submit(function() spin(30) end, {1}, {timeout = 0.2})
    local fd, t0 = pool:fd(), H.now()
    while not job:done() do poll.rpoll(fd, 1000) end
    assert.is_true(H.now() - t0 < 3)
    assert.has_error(function() job:wait() end, "item 1: timed out after 0.2 s")
  end)
end)

describe("pool retries", function()
  local pool, dir

  before_each(function()
    pool = lpar.pool{n_workers = 2}
    dir = H.tmpdir()
  end)
  after_each(function()
    pool:close()
    H.rmdir(dir)
  end)

  -- Item x notes each attempt in the file x of dir and returns how many
  -- attempts there were, counting this one.
  local function attempt(d, x)
    local f = assert(io.open(d .. "/" .. x, "a+"))
    f:write(".")
    f:seek("set")
    local n = #f:read("*a")
    f:close()
    return n
  end

  local function attempts(x) return #(slurp(dir .. "/" .. x) or "") end

  it("runs a failed item again, up to 'retries' more times", function()
    local d = dir
    local r, n = pool:map(function(x)
      local k = attempt(d, x)
      if x == 2 and k < 3 then error("not yet") end
      return x * 10 + k
    end, range(4), {retries = 2})
    assert.equal(4, n)
    assert.same({11, 23, 31, 41}, r)
    assert.equal(3, attempts(2))
  end)

  it("fails the item when its retries run out, as without them", function()
    local d = dir
    local ok, err = pcall(pool.map, pool, function(x)
      attempt(d, x)
      if x == 3 then error("never") end
      return x
    end, range(4), {retries = 1})
    assert.is_false(ok)
    assert.matches("^item 3: .-never", err)
    assert.equal(2, attempts(3))
    local r, _, errs = pool:map(function(x)
      if x == 1 then error("always") end
      return x
    end, range(3), {retries = 3, on_error = "collect"})
    assert.same({[2] = 2, [3] = 3}, r)
    assert.matches("always", errs[1])
    assert.same({2, 4}, (pool:map(double, {1, 2}))) -- the pool goes on
  end)

  it("runs an item that killed its worker again, on a fresh worker", function()
    local d = dir
    local r = pool:map(function(x)
      if x == 2 and attempt(d, x) == 1 then os.exit(3) end
      return require("posix.unistd").getpid()
    end, range(3), {retries = 1})
    assert.equal(3, #r)
    assert.equal(2, attempts(2))
    assert.equal(2, #pool:pids())
  end)

  it("checks the option", function()
    assert.has_error(function() pool:map(double, {1}, {retries = -1}) end,
      "bad argument #3 to 'map' (retries must be a non-negative integer)")
    assert.has_error(function() pool:map(double, {1}, {retries = "x"}) end,
      "bad argument #3 to 'map' (retries must be a number, got string)")
  end)
end)

describe("pool results through the ring", function()
  local pool

  before_each(function() pool = lpar.pool{n_workers = 2} end)
  after_each(function() pool:close() end)

  local rchar, payload = H.rchar, H.payload

  it("so that the caller does not read big results from a pipe", function()
    local before = rchar()
    local r, n = pool:map(function(i) return payload(i, MiB) end, range(40))
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
    for _ = 1, 2 do -- the same workers, job after job
      local r, n = pool:map(function(size) return payload(size, size) end,
        items, {chunksize = 4})
      assert.equal(#items, n)
      for i, size in ipairs(items) do assert.equal(payload(size, size), r[i]) end
    end
  end)

  it("while a job that is not waited for keeps the rings full", function()
    local job = pool:submit(function(i) return payload(i, 700 * 1024) end, range(30))
    -- the workers fill their rings and wait for room; the caller pumps
    -- only now and then
    assert.is_true(H.waitfor(function() pool:pump(); return job:done() end, 60))
    local r = job:wait()
    for i = 1, 30 do assert.equal(payload(i, 700 * 1024), r[i]) end
  end)

  it("names a worker that points outside its ring, and goes on", function()
    local bad = le(7, 4) .. le(0, 4) .. le(16, 8) .. le(2 ^ 40, 8) .. le(MiB, 8)
    local r, _, errs = pool:map(function(x)
      if x == 2 then
        local ux, sys = require "posix.unistd", require "posix.sys.stat"
        for fd = 3, 64 do -- the results pipe is the only FIFO a worker holds
          local st = sys.fstat(fd)
          if st and sys.S_ISFIFO(st.st_mode) ~= 0 then ux.write(fd, bad) end
        end
        require("posix.time").nanosleep({tv_sec = 1, tv_nsec = 0})
      end
      return x
    end, range(3), {on_error = "collect", chunksize = 1})
    assert.equal(1, r[1])
    assert.equal(3, r[3])
    assert.matches("bad place in the ring", errs[2])
    assert.same({2, 4}, (pool:map(double, {1, 2})))
  end)
end)

describe("pool max_memory", function()
  it("fails an item that needs more, names the limit, and goes on", function()
    -- in a fresh process: the limit counts the heap the workers inherit
    local rc, out, err = lua([[
      local lpar = require "lpar"
      local pool = lpar.pool{n_workers = 2, max_memory = "8M"}
      local r, n, errs = pool:map(function(x)
        if x == 2 then
          local t = {}
          for i = 1, 1e7 do t[i] = i end
          return #t
        end
        return x
      end, {1, 2, 3}, {on_error = "collect"})
      print(n, r[1], r[2], r[3], errs[2])
      print(pool:map(function(x) return x * 2 end, {5})[1])
      print(pcall(pool.map, pool, function() return string.rep("x", 16 * 1048576) end, {1}))
      pool:close()
    ]])
    assert.equal(0, rc, err)
    assert.equal("3\t1\tnil\t3\tnot enough memory (limit 8 MiB)\n10\n" ..
      "false\titem 1: not enough memory (limit 8 MiB)\n", out)
  end)

  -- A worker that could not make a sent item a string under its limit
  -- used to exit (status 3), failing the items after it with it.
  it("fails alone an item its worker cannot take under the limit; the rest of its chunk runs", function()
    local rc, out, err = lua([[
      local lpar = require "lpar"
      local pool = lpar.pool{n_workers = 1, max_memory = "10M"}
      pool:map(function(x) return x end, {1}) -- its worker starts now
      local its, i = {"a", "BIG", "cc", "ddd"}, 0
      local function nxt()
        i = i + 1
        if its[i] == "BIG" then return string.rep("x", 10 * 1048576 + 100000) end
        return its[i]
      end
      for k, v, e in pool:imap(function(s) return #s end, nxt, {chunksize = 4, on_error = "collect"}) do
        print(k, v, e)
      end
      pool:close()
    ]])
    assert.equal(0, rc, err)
    assert.equal("1\t1\tnil\n2\tnil\tnot enough memory (limit 10 MiB)\n3\t2\tnil\n4\t3\tnil\n", out)
  end)

  it("refuses a limit below the heap the workers would inherit", function()
    local rc, out, err = lua([[
      local lpar = require "lpar"
      big = string.rep("x", 20 * 1048576)
      collectgarbage() -- what building it left (5.1 and LuaJIT leave more)
      print(pcall(lpar.pool, {n_workers = 2, max_memory = "4M"}))
    ]])
    assert.equal(0, rc, err)
    local heap = out:match("^false\tmax_memory 4 MiB is below the (%d+)%.%d MiB the worker " ..
      "inherited from the caller\n$")
    assert.is_not_nil(heap, out)
    if _VERSION == "Lua 5.1" then -- and LuaJIT
      -- they keep the buffer the string was built in, halved at each
      -- collection (docs/module.md): more than the string
      assert.is_true(tonumber(heap) >= 20, out)
    else
      assert.equal("20", heap)
    end
  end)

  it("checks the option, naming the value", function()
    local hint = " (expected bytes or like '512M', from 1 MiB to 1 PiB))"
    assert.has_error(function() lpar.pool{max_memory = "12"} end,
      "bad argument #1 to 'pool' (max_memory '12' is below 1 MiB" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "lots"} end,
      "bad argument #1 to 'pool' (max_memory 'lots' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "2 "} end,
      "bad argument #1 to 'pool' (max_memory '2 ' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "2G "} end,
      "bad argument #1 to 'pool' (max_memory '2G ' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = " 2G"} end,
      "bad argument #1 to 'pool' (max_memory ' 2G' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "0x100000"} end,
      "bad argument #1 to 'pool' (max_memory '0x100000' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "2048P"} end,
      "bad argument #1 to 'pool' (max_memory '2048P' is not a size" .. hint)
    assert.has_error(function() lpar.pool{max_memory = "2048T"} end,
      "bad argument #1 to 'pool' (max_memory '2048T' is above 1 PiB" .. hint)
    assert.has_error(function() lpar.pool{max_memory = true} end,
      "bad argument #1 to 'pool' (max_memory must be a size, got boolean)")
  end)

  it("takes sizes in any case, with a fraction, i and B", function()
    collectgarbage() -- the garbage of the specs before: the workers inherit it
    for _, v in ipairs{"512m", "512M", "0.5g", "1.5GiB", "64mb", "67108864", 64 * MiB} do
      local pool = H.closing(finally, lpar.pool{n_workers = 1, max_memory = v})
      assert.same({2}, pool:map(function(x) return x * 2 end, {1}))
      pool:close()
    end
  end)
end)

describe("pool faults", function()
  local pool

  before_each(function() pool = lpar.pool{n_workers = 2} end)
  after_each(function() pool:close() end)

  it("replaces a worker killed while idle", function()
    local pids = pool:pids()
    signal.kill(pids[1], signal.SIGKILL)
    assert.is_true(eventually(pool, function()
      local now = pool:pids()
      return #now == 2 and now[1] ~= pids[1]
    end))
    assert.same({2, 4}, (pool:map(double, {1, 2})))
  end)

  it("names a worker killed while running an item, then goes on", function()
    local path = os.tmpname()
    local job = pool:submit(function(x)
      if x == 1 then
        local f = io.open(path, "w")
        f:write(require("posix.unistd").getpid())
        f:close()
        spin(10)
      end
      return x
    end, range(4), {chunksize = 1})
    -- the other items are done and item 1's worker has written its pid
    assert.is_true(eventually(pool, function()
      return job:progress() == 3 and tonumber(slurp(path)) ~= nil
    end))
    local victim = tonumber(slurp(path))
    os.remove(path)
    signal.kill(victim, signal.SIGKILL)
    local ok, err = pcall(job.wait, job)
    assert.is_false(ok)
    assert.equal("item 1: worker " .. victim .. " killed by signal 9 (SIGKILL)", err)
    assert.same({2, 4, 6}, (pool:map(double, {1, 2, 3})))
    assert.equal(2, #pool:pids())
  end)

  it("collects a worker's death as the error of its item", function()
    local r, n, errs = pool:map(function(x)
      if x == 3 then os.exit(5) end
      return x
    end, range(6), {on_error = "collect", chunksize = 2})
    assert.equal(6, n)
    assert.same({[1] = 1, [2] = 2, [4] = 4, [5] = 5, [6] = 6}, r)
    assert.matches("^worker %d+ exited with status 5", errs[3])
    assert.equal(2, #pool:pids())
  end)

  it("stops an item that runs past its timeout", function()
    local t0 = H.now()
    local r, _, errs = pool:map(function(x)
      if x == 2 then spin(30) end
      return x
    end, range(3), {timeout = 0.25, on_error = "collect"})
    assert.is_true(H.now() - t0 < 3)
    assert.same({[1] = 1, [3] = 3}, r)
    assert.equal("timed out after 0.25 s", errs[2])
  end)

  it("ends a blocking wait on SIGINT: 'interrupted', and the pool goes on", function()
    local rc, out = lua([[
      local lpar = require "lpar"
      local pool = lpar.pool{n_workers = 2}
      local job = pool:submit(function() local t = os.clock() while os.clock() - t < 30 do end end, {1, 2})
      os.execute(string.format("(sleep 0.3; kill -INT %d) &", require("posix.unistd").getpid()))
      local t0 = os.time()
      local ok, err = pcall(job.wait, job)
      print(ok, err, job:status(), os.time() - t0 < 10)
      print(pool:map(function(x) return x * 3 end, {1, 2})[2])
      pool:close()
    ]])
    assert.equal(0, rc)
    assert.equal("false\tinterrupted\tcancelled\ttrue\n6\n", out)
  end)

  it("ends a blocking wait on SIGTERM too with sigterm = true: 'terminated'", function()
    local rc, out, err = lua([[
      local lpar = require "lpar"
      local pool = lpar.pool{n_workers = 2, sigterm = true}
      local job = pool:submit(function(x)
        if x == 1 then -- once the caller's wait takes SIGTERM, send it
          local unistd, signal = require "posix.unistd", require "posix.signal"
          local ppid = unistd.getppid()
          for _ = 1, 6000 do
            local f = io.open("/proc/" .. ppid .. "/status")
            local caught = f:read("*a"):match("SigCgt:%s*%x*(%x%x%x%x)")
            f:close()
            if math.floor(tonumber(caught, 16) / 16384) % 2 == 1 then -- bit 14: SIGTERM
              signal.kill(ppid, signal.SIGTERM)
              break
            end
            require("posix.time").nanosleep({tv_sec = 0, tv_nsec = 10000000})
          end
        end
        local t = os.clock()
        while os.clock() - t < 60 do end
      end, {1, 2})
      local ok, e = pcall(job.wait, job)
      print(ok, e, job:status())
      print(pool:map(function(x) return x * 3 end, {1, 2})[2])
      pool:close()
    ]])
    assert.equal(0, rc, err)
    assert.equal("false\tterminated\tcancelled\n6\n", out)
  end)

  it("survives SIGINT sent to the workers' process group", function()
    local before = sorted(pool:pids())
    for _, pid in ipairs(before) do signal.kill(pid, signal.SIGINT) end
    -- a process acts on a pending signal before it runs any more of its
    -- own code: once both workers have run an item, SIGINT has reached them
    local dir = H.tmpdir()
    local r = pool:map(function(i)
      assert(gatherat(dir, 2, i))
      return require("posix.unistd").getpid()
    end, {1, 2}, {chunksize = 1})
    H.rmdir(dir)
    assert.same(before, sorted(r))
    assert.same(before, sorted(pool:pids()))
  end)
end)

describe("closing a pool", function()
  it("reaps every worker, frees its fds, and is idempotent", function()
    local fds = H.fdcount()
    local p = lpar.pool{n_workers = 3}
    p:map(double, range(10))
    p:close()
    p:close()
    assert.same({}, children())
    assert.equal(fds, H.fdcount())
    assert.equal("lpar.Pool (closed)", tostring(p))
    assert.has_error(function() p:map(double, {1}) end, "pool is closed")
  end)

  it("fails the jobs still running with 'pool closed'", function()
    local p = lpar.pool{n_workers = 1}
    local job = p:submit(function() spin(10) end, {1})
    p:close()
    assert.equal("cancelled", job:status())
    assert.has_error(function() job:wait() end, "pool closed")
    assert.same({}, children())
  end)

  it("closes when collected", function()
    local p = lpar.pool{n_workers = 2}
    p:map(double, {1})
    assert.equal(2, #children())
    p = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.same({}, children())
  end)

  it("keeps its fds out of lpar.parallel's workers", function()
    local p = H.closing(finally, lpar.pool{n_workers = 1})
    local fd = p:fd()
    local r = lpar.parallel(function()
      return require("posix.fcntl").fcntl(fd, require("posix.fcntl").F_GETFD) == nil
    end, {1, 2}, 2)
    assert.same({true, true}, r)
    local _ = fcntl
  end)

  it("is harmless in a process that inherited a copy", function()
    local p = H.closing(finally, lpar.pool{n_workers = 1})
    local r = lpar.parallel(function()
      local ok, err = pcall(p.map, p, function(x) return x end, {1})
      collectgarbage()
      return ok and "ran" or err
    end, {1}, 1)
    assert.matches("pool belongs to another process", r[1])
    assert.same({1}, (p:map(function(x) return x end, {1})))
  end)

  it("lets its workers die with the parent", function()
    local rc, out = lua([[
      local lpar = require "lpar"
      local p = lpar.pool{n_workers = 2}
      io.write(table.concat(p:pids(), " "), "\n")
      io.flush()
      require("posix.signal").kill(require("posix.unistd").getpid(), 9)
    ]])
    assert.equal(128 + 9, rc)
    local pids = {}
    for pid in out:gmatch("%d+") do pids[#pids + 1] = tonumber(pid) end
    assert.equal(2, #pids)
    local deadline = H.now() + 5
    while (H.alive(pids[1]) or H.alive(pids[2])) and H.now() < deadline do H.sleep(0.02) end
    assert.is_false(H.alive(pids[1]))
    assert.is_false(H.alive(pids[2]))
  end)

  it("closes at exit of a script that forgot to", function()
    local rc, out, err = lua([[
      local lpar = require "lpar"
      P = lpar.pool{n_workers = 2, close = function() io.stderr:write("bye\n") end}
      print(P:map(function(x) return x + 1 end, {1})[1])
    ]])
    assert.equal(0, rc)
    assert.equal("2\n", out)
    assert.equal("bye\nbye\n", err)
  end)
end)

describe("pool:imap nonblocking", function()
  it("takes items from an iterator said never to wait, results in order", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2, on_demand = true})
    local k, got = 0, {}
    local function items()
      if k >= 5000 then return nil end
      k = k + 1
      return k
    end
    for i, v, err in pool:imap(function(x) return x * 2 end, items, {nonblocking = true}) do
      assert.is_nil(err)
      got[#got + 1] = i
      assert.equal(2 * i, v)
    end
    assert.equal(5000, #got)
    for i, v in ipairs(got) do assert.equal(i, v) end
  end)

  it("takes batches from one too, with lpar.pending alone between them", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2, on_demand = true})
    local given, waited = 0, false
    local function batches(want)
      if given >= 3000 then return nil end
      -- once, no batch yet: asked again as a result is taken
      if given >= 1000 and not waited then
        waited = true
        return lpar.pending
      end
      local n = math.min(want, 100, 3000 - given)
      given = given + n
      return ("x"):rep(n), n
    end
    local total = 0
    for _, v in pool:imap(function(b) return #b end, batches,
                          {batched = true, nonblocking = true}) do
      total = total + v
    end
    assert.equal(3000, total)
    assert.is_true(waited)
  end)
end)

describe("pool:imap batched", function()
  local pool

  before_each(function() pool = lpar.pool{n_workers = 2, on_demand = true} end)
  after_each(function() pool:close() end)

  -- An iterator of batches (strings of 'x', one per record) over n
  -- records, noting each 'want' it is called with.
  local function batches(n, wants)
    local given = 0
    return function(want)
      if given >= n then return nil end
      wants[#wants + 1] = want
      local k = math.min(want, n - given)
      given = given + k
      return ("x"):rep(k), k
    end
  end

  it("asks the iterator for one record, then for the policy's number", function()
    local wants, total = {}, 0
    for _, v in pool:imap(function(b) return #b end, batches(20000, wants), {batched = true}) do
      total = total + v
    end
    assert.equal(20000, total)
    assert.equal(1, wants[1])
    -- trivial records: once their time is known, batches of many
    local most = 1
    for _, w in ipairs(wants) do most = math.max(most, w) end
    assert.is_true(most > 1, "every batch held one record")
    assert.is_true(most <= 4096)
  end)

  it("asks for 'chunksize' records at a time", function()
    local wants, total = {}, 0
    for _, v in pool:imap(function(b) return #b end, batches(100, wants),
                          {batched = true, chunksize = 7}) do
      total = total + v
    end
    assert.equal(100, total)
    for _, w in ipairs(wants) do assert.equal(7, w) end
  end)

  it("needs an iterator, and a record count after each batch", function()
    assert.has_error(function() pool:imap(double, {1, 2}, {batched = true}) end,
                     "bad argument #3 to 'imap' (batched needs an iterator function of items)")
    local ok, err = pcall(function()
      for _ in pool:imap(double, function() return 1 end, {batched = true}) do end
    end)
    assert.is_false(ok)
    assert.matches("the items iterator (batched) gave nil as the record count of its batch 1, " ..
                   "not a positive integer", err, 1, true)
    -- a count given, but not a positive integer, is named as it is
    for _, bad in ipairs({0, -1, 1.5, "x"}) do
      ok, err = pcall(function()
        local sent = false
        for _ in pool:imap(double, function()
          if sent then return nil end
          sent = true
          return 1, bad
        end, {batched = true}) do end
      end)
      assert.is_false(ok)
      assert.matches("gave " .. tostring(bad) .. " as the record count of its batch 1", err, 1, true)
    end
  end)
end)

describe("lpar.pool on_event", function()
  it("tells each item's start and end, with status, attempt and seconds", function()
    local pool = lpar.pool({n_workers = 2})
    local evs = {}
    local f = function(x)
      if x == 3 then error("three") end
      return x * 2
    end
    for _ in pool:imap(f, {1, 2, 3, 4}, {on_error = "collect",
                                         on_event = function(ev) evs[#evs + 1] = ev end}) do
    end
    local started, ended = {}, {}
    for _, ev in ipairs(evs) do
      assert.equal(1, ev.attempt)
      if ev.event == "start" then
        assert.is_nil(ended[ev.item])
        assert.is_true(ev.place == 1 or ev.place == 2)
        started[ev.item] = true
      else
        assert.equal("end", ev.event)
        assert.is_true(started[ev.item])
        assert.is_number(ev.seconds)
        ended[ev.item] = ev
      end
    end
    assert.same({"ok", "ok", "failed", "ok"},
                {ended[1].status, ended[2].status, ended[3].status, ended[4].status})
    assert.matches("three", ended[3].error)
    assert.equal("error", ended[3].kind)
    local seen = {}
    pool:submit(function(x) return x end, {1, 2},
                {on_event = function(ev) seen[#seen + 1] = ev.event .. ev.item end}):wait()
    table.sort(seen)
    assert.same({"end1", "end2", "start1", "start2"}, seen)
    assert.has_error(function() pool:imap(f, {1}, {on_event = 1}) end)
    pool:close()
  end)
end)

describe("lpar.pool on_event when a loop breaks", function()
  it("ends the items running as cancelled", function()
    local pool = lpar.pool({n_workers = 2})
    local started, ended = {}, {}
    local function f(x)
      if x > 1 then os.execute("sleep 30") end -- killed by the cancel
      return x
    end
    local iter, _, _, job = pool:imap(f, {1, 2, 3, 4}, {chunksize = 1, on_event = function(ev)
      if ev.event == "start" then started[ev.item] = true else ended[ev.item] = ev.status end
    end})
    assert.equal(1, iter())
    assert.is_true(H.waitfor(function()
      pool:pump()
      return started[2]
    end, 30))
    assert.is_true(job:cancel())
    assert.equal("ok", ended[1])
    assert.equal("cancelled", ended[2])
    for item in pairs(started) do assert.is_string(ended[item], "item " .. item) end
    pool:close()
  end)
end)

describe("lpar.pool job:halt", function()
  it("hands out nothing more; the items handed out finish", function()
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local pool = lpar.pool({n_workers = 2})
    local k = 0
    local function items()
      k = k + 1
      if k <= 50 then return k, 1 end
    end
    -- items past 6 wait (up to 30 s) until the test says go
    local function f(x)
      if x > 6 then
        local deadline = os.time() + 30
        while not io.open(go) and os.time() < deadline do os.execute("sleep 0.01") end
      end
      return x
    end
    local iter, _, _, job = pool:imap(f, items, {batched = true})
    local got = {}
    for i, v in iter, nil, nil, job do
      got[#got + 1] = v
      if i == 3 then
        assert.is_true(job:halt())
        H.writefile(go, "")
      end
    end
    H.rmdir(dir)
    assert.equal("done", job:status())
    assert.is_true(#got < 50, #got .. " results")
    for i = 1, #got do
      if got[i] ~= nil then assert.equal(i, got[i]) end
    end
    assert.has_error(function() pool:submit(f, {1}):halt() end)
    pool:close()
  end)
end)
