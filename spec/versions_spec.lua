-- What lpar promises under each Lua it serves (5.1, 5.2, 5.3, 5.4 and
-- LuaJIT): written in the Lua all of them parse, and run by scripts/test
-- under each interpreter against the build for it.
local lpar = require "lpar"
local H = require "spec.helper"

local JIT = rawget(_G, "jit") ~= nil
local INTEGERS = math.type ~= nil -- 5.3 and 5.4 have an integer subtype
local NAME = JIT and "LuaJIT 2.1" or _VERSION

local function same(x, y) -- equal, -0.0 apart from 0, NaN equal to NaN
  if x ~= x then return y ~= y end
  if x == 0 and y == 0 then return 1 / x == 1 / y end
  return x == y
end

-- The bytes of an integer as the codec writes it: its tag (3), then the
-- zigzag varint, built with doubles (n >= 0, even, within 2^63).
local function intbytes(n)
  return string.char(3) .. H.uvarint(2 * n)
end

describe("the Lua lpar runs on", function()
  it("is named by the module and by the command", function()
    assert.equal(NAME, lpar._LUA)
    local code, out = H.lpar("--version")
    assert.equal(0, code)
    assert.equal("lpar " .. lpar._VERSION:match("%d+%.%d+%.%d+") .. " (" .. NAME .. ")\n", out)
  end)
end)

describe("numbers under every Lua", function()
  local values = {0, 1, -1, 0.1, 1 / 3, -2.5, 2 ^ 52 + 0.5, 2 ^ 53, -2 ^ 53,
                  2 ^ 63, -2 ^ 63, 2 ^ 64, 1e308, 5e-324, 2.2250738585072014e-308,
                  1 / 0, -1 / 0}
  values[#values + 1] = 0 / 0
  values[#values + 1] = -1 * 0 -- -0.0 built at run time (5.1 folds a -0.0 constant into 0)
  values[#values + 1] = 0.0 * -1

  it("come back from workers exactly", function()
    local r = lpar.parallel(function(x) return {x, -x} end, values)
    for i = 1, #values do
      assert.is_true(same(values[i], r[i][1]), "item " .. i .. ": " .. tostring(values[i]))
      assert.is_true(same(-values[i], r[i][2]), "item " .. i .. ": " .. tostring(-values[i]))
    end
  end)

  it("come back exactly from encode and decode, as table keys too", function()
    for i = 1, #values do
      local v = values[i]
      assert.is_true(same(v, lpar.decode(lpar.encode(v))), tostring(v))
      if v == v then
        local t = lpar.decode(lpar.encode({[v] = i}))
        assert.equal(i, t[v])
      end
    end
  end)

  if INTEGERS then
    it("keep integers and floats apart (5.3, 5.4)", function()
      local r = lpar.parallel(function(x) return x end, {3, 3.0, math.maxinteger, math.mininteger})
      assert.equal("integer", math.type(r[1]))
      assert.equal("float", math.type(r[2]))
      assert.equal(math.maxinteger, r[3])
      assert.equal(math.mininteger, r[4])
    end)
  else
    it("refuse an integer from 5.3 or 5.4 that a double cannot hold", function()
      local ok, err = pcall(lpar.decode, intbytes(2 ^ 53) .. "") -- 2^53: exact
      assert.is_true(ok, err)
      assert.equal(2 ^ 53, err)
      -- 2^53 + 1, which no double holds: zigzag 2^54 + 2, built by hand
      local bytes = string.char(3, 130, 128, 128, 128, 128, 128, 128, 32)
      ok, err = pcall(lpar.decode, bytes)
      assert.is_false(ok)
      assert.matches("integer 9007199254740993 %(from a Lua with integers, 5%.3 or 5%.4%) " ..
        "has no exact value in " .. NAME:gsub("%.", "%%.") .. "'s numbers %(doubles%)", err)
    end)
  end
end)

describe("values that cannot travel", function()
  it("are named by their path", function()
    local ok, err = pcall(lpar.parallel, function() return {a = {io.stdout}} end, {1})
    assert.is_false(ok)
    assert.matches("item 1: cannot serialize result: a%[1%] is a userdata", err)
  end)

  if JIT then
    it("include LuaJIT's FFI cdata", function()
      local ok, err = pcall(lpar.parallel, function()
        return {n = {require("ffi").new("int", 3)}}
      end, {1})
      assert.is_false(ok)
      assert.matches("item 1: cannot serialize result: n%[1%] is a cdata", err)
    end)
  end
end)

describe("the module under every Lua", function()
  it("runs imap inside a coroutine that yields between results", function()
    local co = coroutine.wrap(function()
      for _, v in lpar.imap(function(x) return x * 10 end, {1, 2, 3}) do
        coroutine.yield(v)
      end
    end)
    assert.equal(10, co())
    assert.equal(20, co())
    assert.equal(30, co())
  end)

  it("stops an imap's workers once its loop is left and the iterator collected", function()
    for i in lpar.imap(function(x) H.sleep(0.05) return x end, H.range(100), 4) do
      if i == 3 then break end
    end
    collectgarbage()
    collectgarbage()
    assert.same({}, H.children())
  end)

  it("keeps item order over many items and workers", function()
    local r, n = lpar.parallel(function(x) return x * x end, H.range(1000), 4)
    assert.equal(1000, n)
    for i = 1, 1000 do assert.equal(i * i, r[i]) end
  end)

  it("sends closures and their upvalues to a pool, closed with pool:close()", function()
    local pool = lpar.pool(2)
    local k, t = 7, {base = 100}
    local r = pool:map(function(x) return t.base + k * x end, {1, 2, 3})
    assert.same({107, 114, 121}, r)
    local job = pool:submit(function(x) return x .. "!" end, {"a", "b"})
    assert.same({"a!", "b!"}, (job:wait()))
    pool:close()
  end)

  it("reports an error raised in a worker with its item", function()
    local ok, err = pcall(lpar.parallel, function(x)
      if x == 2 then error("two") end
      return x
    end, {1, 2, 3})
    assert.is_false(ok)
    assert.matches("item 2: .*two", err)
  end)
end)

describe("faults under every Lua", function()
  local signal, unistd = require "posix.signal", require "posix.unistd"
  local fds
  before_each(function() fds = H.fdcount() end)
  after_each(function()
    assert.same({}, H.children())
    assert.equal(fds, H.fdcount())
  end)

  local deaths = {
    {"SIGKILL", function() signal.kill(unistd.getpid(), signal.SIGKILL) end, "killed by signal 9 %(SIGKILL%)"},
    {"os.exit(3)", function() os.exit(3) end, "exited with status 3"},
  }
  for _, case in ipairs(deaths) do
    for _, front in ipairs({"parallel", "pool"}) do
      it("names the item whose worker died of " .. case[1] .. " and finishes the others, with " .. front,
         function()
        local die = case[2]
        local function f(x)
          if x == 5 then die() end
          return x * 10
        end
        local r, n, errs
        if front == "parallel" then
          r, n, errs = lpar.parallel(f, H.range(20), {n_workers = 2, chunksize = 4, on_error = "collect"})
        else
          local pool = lpar.pool({n_workers = 2})
          r, n, errs = pool:map(f, H.range(20), {chunksize = 4, on_error = "collect"})
          pool:close()
        end
        assert.equal(20, n)
        assert.matches("^worker %d+ " .. case[3] .. "$", errs[5])
        for i = 1, 20 do
          if i ~= 5 then assert.equal(i * 10, r[i]) end
        end
      end)
    end
  end

  it("stops an item past its timeout and goes on", function()
    local r, n, errs = lpar.parallel(function(x)
      if x == 2 then while true do end end
      return x
    end, {1, 2, 3}, {n_workers = 2, timeout = 1, on_error = "collect"})
    assert.equal(3, n)
    assert.equal(1, r[1])
    assert.equal(3, r[3])
    assert.matches("timed out after 1%.?0? s", errs[2])
  end)

  it("fails a pool whose init fails, naming it", function()
    local ok, err = pcall(lpar.pool, {n_workers = 1, init = function() error("no db", 0) end})
    assert.is_false(ok)
    assert.matches("worker init failed: no db", err)
  end)
end)

describe("the command under every Lua", function()
  it("runs a script on each line, in order", function()
    local code, out = H.lpar([[-e 'return function(l) return l .. #l end']], "a\nbb\nccc\n")
    assert.equal(0, code)
    assert.equal("a1\nbb2\nccc3\n", out)
  end)

  it("prints numbers as this Lua does", function()
    local code, out = H.lpar([[-e 'return function(l) return tonumber(l) / 2 end']], "4\n3\n")
    assert.equal(0, code)
    assert.equal(tostring(4 / 2) .. "\n" .. tostring(3 / 2) .. "\n", out)
  end)

  it("names a failed line", function()
    local code, _, err = H.lpar([[-e 'return function(l) error("bad " .. l, 0) end']], "x\n")
    assert.equal(1, code)
    assert.matches("line 1 %(\"x\"%).*bad x", err)
  end)
end)

describe("a remote host on another Lua", function()
  -- LPAR_OTHER: an lpar command built for another Lua (scripts/test gives
  -- 5.4's to the other Luas' runs); the host's command is plain env
  local other = os.getenv("LPAR_OTHER")

  it("is refused when it connects, naming both Luas", function()
    if not other then return pending("LPAR_OTHER names no lpar of another Lua") end
    local p = assert(io.popen(H.quote(other) .. " --version"))
    local theirs = p:read("*a"):match("%((.-)%)")
    p:close()
    assert.is_truthy(theirs)
    assert.are_not.equal(NAME, theirs)
    local short = function(n) return (n:match("^LuaJIT") and "LuaJIT" or n):gsub("%p", "%%%0") end
    local ok, err = pcall(lpar.pool, {n_workers = 1, hosts = {"1/env"}, remote_lpar = other})
    assert.is_false(ok)
    assert.matches("its agent is lpar [%d.]+ %(protocol %d+, " .. short(theirs) ..
      ", .*%); this is lpar [%d.]+ %(protocol %d+, " .. short(NAME) .. ", ", err)
  end)
end)

