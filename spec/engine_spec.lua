-- The one engine under every front end: items from iterators that say
-- "not yet" (lpar.pending), workers started only for items that exist,
-- the job waited for served first, jobs that end inside the pump.
local lpar = require "lpar"
local H = require "spec.helper"
local unistd = require "posix.unistd"

-- An iterator over 'list' that returns lpar.pending (and 'fd', if given)
-- where the list holds "pending"; counts its calls in calls[1].
local function script(list, fd, calls)
  local k = 0
  return function()
    calls[1] = calls[1] + 1
    k = k + 1
    if list[k] == "pending" then return lpar.pending, fd end
    return list[k]
  end
end

-- The results of a generic for over what imap returns (its closing value
-- included).
local function collect(step, state, init, closing)
  local t = {}
  for i, v in step, state, init, closing do t[i] = v end
  return t
end

describe("lpar.pending", function()
  after_each(function() assert.same({}, H.children()) end)

  it("with an fd that cannot be polled (a regular file) asks again at once", function()
    local f = assert(io.open("/etc/hostname"))
    local fd = require("posix.stdio").fileno(f)
    local calls = {0}
    local got = collect(lpar.imap(function(x) return x * 10 end,
                                  script({1, "pending", 3}, fd, calls), 2))
    f:close()
    assert.same({10, 30}, got)
  end)

  it("with a bad fd fails the call, naming the fd", function()
    local calls = {0}
    local ok, err = pcall(collect, lpar.imap(function(x) return x end,
                                             script({"pending", 2}, 9999, calls), 2))
    assert.is_false(ok)
    assert.matches("cannot wait on fd 9999 for the items iterator: Bad file descriptor", err)
  end)

  it("without an fd waits for the items in flight, in lpar.parallel too", function()
    local calls = {0}
    local r, n = lpar.parallel(function(x) return x * 10 end,
                               script({1, 2, "pending", 4}, nil, calls), 2)
    assert.equal(3, n)
    assert.same({10, 20, 40}, r)
  end)

  it("without an fd waits for results done but not taken yet (imap)", function()
    -- items 1 and 2, then "not yet" until the caller took both results:
    -- both are done, none in flight, when it is asked again
    local given, taken = 0, 0
    local function items()
      if given < 2 or (taken == 2 and given < 3) then
        given = given + 1
        return given
      end
      if taken < 2 then return lpar.pending end
      return nil
    end
    local got = {}
    for i, v in lpar.imap(function(x) return x * 10 end, items, 2) do
      got[i] = v
      taken = taken + 1
    end
    assert.same({10, 20, 30}, got)
  end)

  it("is waited out where no engine runs: n_workers = 0 and pool:map", function()
    local calls = {0}
    local r, n = lpar.parallel(function(x) return x * 10 end,
                               script({1, "pending", 3}, nil, calls), 0)
    assert.equal(2, n)
    assert.same({10, 30}, r)
    local pool = H.closing(finally, lpar.pool{n_workers = 1})
    calls = {0}
    r, n = pool:map(function(x) return x * 10 end, script({1, "pending", 3}, nil, calls))
    assert.equal(2, n)
    assert.same({10, 30}, r)
  end)

  it("followed by the end of the items ends pool:imap", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2})
    local calls = {0}
    local got = collect(pool:imap(function(x) return x end, script({1, "pending"}, nil, calls)))
    assert.same({1}, got)
  end)

  it("on one fd from two jobs of one pool wakes both", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2})
    local r, w = unistd.pipe()
    local seen = {}
    -- each iterator takes one byte when the pipe has one, else waits on it
    local function bytes(tag)
      local k = 0
      return function()
        if k == 1 then return nil end
        if require("posix.poll").rpoll(r, 0) ~= 1 then return lpar.pending, r end
        k = 1
        return tag .. unistd.read(r, 1)
      end
    end
    local step1, _, _, job1 = pool:imap(function(x) return x end, bytes("A"))
    local step2, _, _, job2 = pool:imap(function(x) return x end, bytes("B"))
    unistd.write(w, "x")
    local _, v1 = step1()
    seen[#seen + 1] = v1
    unistd.write(w, "y")
    local _, v2 = step2()
    seen[#seen + 1] = v2
    assert.is_nil((step1()))
    assert.is_nil((step2()))
    job1:cancel()
    job2:cancel()
    unistd.close(r)
    unistd.close(w)
    assert.same({"Ax", "By"}, seen)
  end)
end)

describe("workers for items from an iterator", function()
  after_each(function() assert.same({}, H.children()) end)

  it("start only for items that exist: init runs once for one item", function()
    local path = os.tmpname()
    local k = 0
    local r, n = lpar.parallel(function(x) return x end, function()
      k = k + 1
      if k == 1 then return "only" end
    end, {n_workers = 8, init = function()
      local f = io.open(path, "a")
      f:write("init\n")
      f:close()
    end})
    assert.equal(1, n)
    assert.same({"only"}, r)
    assert.equal("init\n", H.readfile(path))
    os.remove(path)
  end)

  it("start none for an iterator that has no item", function()
    local path = os.tmpname()
    local _, n = lpar.parallel(function(x) return x end, function() return nil end,
                               {n_workers = 8, init = function()
                                 local f = io.open(path, "a")
                                 f:write("init\n")
                                 f:close()
                               end})
    assert.equal(0, n)
    assert.equal("", H.readfile(path))
    os.remove(path)
  end)
end)

describe("a job waited for in the body of another job's loop", function()
  it("goes first on the pool's workers", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2})
    local pulled = 0
    local function endless()
      pulled = pulled + 1
      return pulled
    end
    local atpull
    for i in pool:imap(function(x)
      local t = os.clock()
      while os.clock() - t < 0.001 do end
      return x
    end, endless) do
      if i == 2 then
        local r = pool:map(function(x) return x + 1 end, {41})
        assert.equal(42, r[1])
        atpull = pulled
        break
      end
    end
    -- the one-item map did not wait for the imap to fill its window
    assert.is_true(atpull < 1000, "the imap pulled " .. tostring(atpull) .. " items meanwhile")
  end)
end)

describe("pool methods in a worker", function()
  it("say the pool belongs to another process, close too", function()
    local pool
    local function f()
      local ok, err = pcall(pool.close, pool)
      return tostring(ok) .. " " .. tostring(err)
    end
    -- on demand: the worker forks at the job, with 'pool' set
    pool = lpar.pool{n_workers = 1, on_demand = true, functions = {f}}
    local r = pool:map(f, {1})
    pool:close()
    assert.matches("^false .*pool belongs to another process$", r[1])
  end)
end)

describe("a pool job that fails", function()
  it("leaves no zombie of the workers it killed", function()
    local pool = H.closing(finally, lpar.pool{n_workers = 2})
    local items = {}
    for i = 1, 30 do items[i] = i end
    local ok, err = pcall(pool.map, pool, function(x)
      require("posix.time").nanosleep({tv_sec = 0, tv_nsec = 10000000})
      return x
    end, items, {progress = function(done) if done > 5 then error("stop", 0) end end})
    assert.is_false(ok)
    assert.equal("stop", err)
    for _, c in ipairs(H.children()) do
      assert.is_true(c.state ~= "Z", "zombie worker " .. c.pid)
    end
  end)
end)

describe("a close hook that fails", function()
  it("is described as every failure is", function()
    local rc, _, err = H.lua([[
      local lpar = require "lpar"
      lpar.parallel(function(x) return x end, {1}, {close = function() error({}) end})
    ]])
    assert.equal(0, rc)
    assert.matches("^lpar: worker %d+: close failed: %(error object is a table value%)\n", err)
  end)
end)

describe("an items iterator that raises", function()
  -- the second call comes while the first worker starts: it is asked
  -- ahead, to see whether another worker is worth starting
  for _, front in ipairs{"parallel", "imap"} do
    for _, n in ipairs{2, 8} do
      it("on its second call fails " .. front .. " with n_workers = " .. n, function()
        local f = H.program(([[
          local lpar = require "lpar"
          local i = 0
          local function items()
            i = i + 1
            if i == 2 then error("boom", 0) end
            if i > 150 then return nil end
            return i
          end
          local ok, e = pcall(function()
            if %q == "parallel" then return lpar.parallel(function(x) return x end, items, %d) end
            for _ in lpar.imap(function(x) return x end, items, %d) do end
          end)
          io.write(tostring(ok), " ", tostring(e))
        ]]):format(front, n, n))
        local rc, out, err = H.run("timeout -k 5 30 " .. H.interp .. " " .. f)
        os.remove(f)
        assert.equal("", err)
        assert.equal(0, rc)
        assert.equal("false boom", out)
      end)
    end
  end
end)
