-- The codec: every kind of value through lpar.encode / lpar.decode and
-- back from workers, the refusals, and the decoder's answers to bad bytes.
local lpar = require "lpar"
local H = require "spec.helper"

-- Written in the Lua that 5.1, 5.2, 5.3, 5.4 and LuaJIT all parse: where
-- the Luas differ, each case says what each one does (see the table in
-- docs/module.md).
local JIT = rawget(_G, "jit") ~= nil
local INTEGERS = math.type ~= nil -- 5.3 and 5.4 keep integers apart from floats
local strlib = string.pack and string or require "compat53.string" -- pack, before 5.3

local function rt(v) return lpar.decode(lpar.encode(v)) end

-- -0.0, made at run time (5.1 may fold a -0.0 constant into 0)
local NEGZERO = -(1 / math.huge)

-- A random 64-bit integer (5.3's math.random takes no range that wide;
-- integer arithmetic wraps), or with doubles a random integral double
-- within 2^53 or a random double of any size.
local function rand64()
  if INTEGERS then return math.random(0, 4294967295) * 4294967296 + math.random(0, 4294967295) end
  if math.random() < 0.5 then return math.floor((math.random() - 0.5) * 2 ^ 54) end
  return (math.random() - 0.5) * 2 ^ math.random(-1000, 1000)
end

-- The bits of a float, to compare -0.0 and NaNs exactly.
local function bits(x) return strlib.pack("<d", x) end
local function float(s) return (strlib.unpack("<d", s)) end

-- The LEB128 bytes of v: any 64-bit integer (negatives as unsigned) where
-- there are integers, a non-negative integral double below 2^64 elsewhere.
local varint
if INTEGERS then
  varint = load [[
    local v, s = ..., {}
    while v >= 0x80 or v < 0 do
      s[#s + 1] = string.char(v & 0x7f | 0x80)
      v = v >> 7
    end
    s[#s + 1] = string.char(v)
    return table.concat(s)
  ]]
else
  varint = H.uvarint
end
-- the varint of -1 as 5.3 and 5.4 write it (as unsigned: 2^64 - 1)
local MINUS1 = string.rep("\255", 9) .. "\1"

-- The message of the error f raises.
local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function nest(n)
  local t = {}
  local inner = t
  for _ = 2, n do
    inner[1] = {}
    inner = inner[1]
  end
  return t, inner
end

local function depth(t)
  local d = 0
  while type(t) == "table" do d, t = d + 1, t[1] end
  return d
end

local allbytes = {}
for i = 0, 255 do allbytes[#allbytes + 1] = string.char(i) end
allbytes = table.concat(allbytes)

-- Floats whose bits must come back unchanged.
local floats = {
  0.0, NEGZERO, 1.0, -1.0, 0.1, -2.5, math.pi, 1e308, -1e-308,
  math.huge, -math.huge, 0 / 0, -(0 / 0),
  float("\1\0\0\0\0\0\xf8\x7f"), -- a NaN with a payload
  float("\1\0\0\0\0\0\0\0"), -- the smallest denormal
  float("\xff\xff\xff\xff\xff\xff\x0f\x00"), -- the largest denormal
  2.0 ^ 53, 2.0 ^ 63, -2.0 ^ 63, 1.7976931348623157e308,
}

-- Integers at the edges: of 5.3 and 5.4's 64 bits, or with doubles those
-- that a double holds exactly (all within 2^53, then some beyond)
local ints = {
  0, 1, -1, 63, 64, -64, -65, 127, 128, 255, 256, 16383, 16384,
  2147483648, -2147483648,
}
for _, i in ipairs(INTEGERS and {
  9007199254740993, 4611686018427387904, -- 2^53 + 1, 2^62
  math.maxinteger, math.mininteger, math.maxinteger - 1, math.mininteger + 1,
} or {2 ^ 53 - 1, -(2 ^ 53 - 1), 2 ^ 53, -2 ^ 53, 2 ^ 62, -2 ^ 63, 2 ^ 63 - 1024}) do
  ints[#ints + 1] = i
end

describe("lpar.encode and lpar.decode", function()
  it("round-trip nil and booleans", function()
    assert.is_nil(rt(nil))
    assert.is_true(rt(true))
    assert.is_false(rt(false))
  end)

  it("round-trip integers at the edges and keep them integers", function()
    for _, i in ipairs(ints) do
      local d = rt(i)
      assert.equal(i, d)
      assert.equal(INTEGERS and "integer" or "number", INTEGERS and math.type(d) or type(d))
    end
    for _ = 1, 1000 do
      local i = rand64()
      assert.equal(i, rt(i))
    end
  end)

  if INTEGERS then
    it("keep floats floats, 1.0 apart from 1", function()
      assert.equal("float", math.type(rt(1.0)))
      assert.equal("integer", math.type(rt(1)))
      assert.equal("float", math.type(rt(2.0 ^ 53)))
      local d = rt({1, 1.0, [2.5] = 3.0})
      assert.equal("integer", math.type(d[1]))
      assert.equal("float", math.type(d[2]))
      assert.equal("float", math.type(d[2.5]))
    end)
  else
    it("send an integral double as an integer, and -0.0 and the rest as floats", function()
      -- 1.0 and 1 are one number here; a Lua with integers gets 1
      assert.equal(lpar.encode(1), lpar.encode(1.0))
      assert.equal("\3\2", lpar.encode(1.0))
      assert.equal("\3\1", lpar.encode(-1.0))
      assert.equal("\4" .. bits(2.5), lpar.encode(2.5))
      assert.equal("\4" .. bits(NEGZERO), lpar.encode(NEGZERO))
      assert.equal("\4" .. bits(2 ^ 63), lpar.encode(2 ^ 63)) -- past the integers
      assert.equal("\3" .. MINUS1, lpar.encode(-2 ^ 63))
      local d = rt({1, 1.0, [2.5] = 3.0})
      assert.same({1, 1, [2.5] = 3}, d)
    end)
  end

  it("round-trip floats bit for bit", function()
    for _, x in ipairs(floats) do
      local d = rt(x)
      assert.equal(INTEGERS and "float" or "number", INTEGERS and math.type(d) or type(d))
      if JIT and x ~= x then
        -- LuaJIT has one NaN: any other it meets (a payload, a sign) it
        -- turns into that one, as lpar.decode hands it over
        assert.is_true(d ~= d)
        assert.equal(bits(0 / 0), bits(d))
      else
        assert.equal(bits(x), bits(d))
      end
    end
    assert.equal(-math.huge, 1 / rt(NEGZERO))
    assert.equal(math.huge, 1 / rt(0.0))
    local nan = rt(0 / 0)
    assert.is_true(nan ~= nan)
    assert.equal(0.1, rt(0.1))
    assert.equal(5e-324, rt(5e-324))
  end)

  it("round-trip strings with every byte, NULs and none", function()
    assert.equal("", rt(""))
    assert.equal(allbytes, rt(allbytes))
    assert.equal("\0", rt("\0"))
    assert.equal("a\0b\0\0c", rt("a\0b\0\0c"))
    assert.equal(string.rep("\0", 1000), rt(string.rep("\0", 1000)))
  end)

  it("round-trip a 1 MB string of random bytes", function()
    local t = {}
    for i = 1, 131072 do
      t[i] = INTEGERS and strlib.pack("<j", rand64()) or strlib.pack("<I4I4",
        math.random(0, 65535) * 65536 + math.random(0, 65535),
        math.random(0, 65535) * 65536 + math.random(0, 65535))
    end
    local s = table.concat(t)
    assert.equal(1048576, #s)
    assert.equal(s, rt(s))
  end)

  it("round-trip a 100 MB string", function()
    local s = string.rep(allbytes, 100 * 4096) -- 100 MiB
    local e = lpar.encode(s)
    assert.is_true(#e > #s and #e <= #s + 11)
    local d = lpar.decode(e)
    e = nil -- luacheck: ignore
    assert.equal(#s, #d)
    assert.is_true(s == d)
  end)

  it("round-trip nested tables", function()
    local t = {
      1, "two", 3.0, {4, {5, {6}}},
      name = "x", inner = {a = {b = {c = {}}}, list = {true, false}},
    }
    assert.same(t, rt(t))
    assert.same({}, rt({}))
    assert.same({{}, {{}}}, rt({{}, {{}}}))
  end)

  it("round-trip arrays with holes", function()
    local cases = {
      {1, nil, 3}, {nil, nil, 3}, {nil, 2}, {1, 2, nil, nil, 5},
      {[1] = "a", [1000] = "b"}, {[2] = 2, [4] = 4, [8] = 8},
      {nil, nil, nil, n = 3}, -- as table.pack(nil, nil, nil) makes it
    }
    for _, t in ipairs(cases) do
      local d = rt(t)
      assert.same(t, d)
      for k, v in pairs(t) do assert.equal(v, d[k]) end
      for k, v in pairs(d) do assert.equal(v, t[k]) end
    end
  end)

  it("round-trip tables whose array part is filled out of order", function()
    local t = {}
    for i = 100, 1, -1 do t[i] = i end
    t[50] = nil
    t.x = "y"
    assert.same(t, rt(t))
  end)

  it("round-trip mixed keys: integers, floats, booleans, strings", function()
    local t = {
      [1.5] = "f", [-0.25] = "g", [math.huge] = "inf", [-math.huge] = "-inf",
      [true] = "t", [false] = "f", [0] = "zero", [-1] = "minus",
      [""] = "empty", ["\0"] = "nul", x = 1,
      10, 20, 30,
    }
    if INTEGERS then
      t[math.mininteger], t[math.maxinteger] = "min", "max"
    else -- the largest integral keys a double holds (2^63 is past the integers)
      t[-2 ^ 63], t[2 ^ 63], t[2 ^ 53] = "min", "max", "2^53"
    end
    local d = rt(t)
    assert.same(t, d)
    assert.equal("f", d[1.5])
    assert.equal("t", d[true])
    assert.equal("f", d[false])
  end)

  it("round-trip tables used as keys", function()
    local k = {1, 2}
    local d = rt({[k] = "v", other = k})
    local key, n = nil, 0
    for kk in pairs(d) do
      if type(kk) == "table" then key, n = kk, n + 1 end
    end
    assert.equal(1, n)
    assert.same({1, 2}, key)
    assert.equal("v", d[key])
    assert.equal(key, d.other) -- the same table, as key and as value
  end)

  it("keep shared subtables shared", function()
    local s = {1, 2}
    local t = {s, s, a = s, b = {s}}
    local d = rt(t)
    assert.same({1, 2}, d[1])
    assert.equal(d[1], d[2])
    assert.equal(d[1], d.a)
    assert.equal(d[1], d.b[1])
    assert.are_not.equal(s, d[1]) -- a copy, not the caller's table
  end)

  it("keep cycles", function()
    local t = {name = "t"}
    t.self = t
    local d = rt(t)
    assert.equal(d, d.self)
    assert.equal("t", d.self.self.name)

    local a, b = {}, {}
    a.b, b.a = b, a
    local da = rt({a, b})
    assert.equal(da[1], da[2].a)
    assert.equal(da[2], da[1].b)

    local l = {}
    l[1] = l
    local dl = rt(l)
    assert.equal(dl, dl[1])
  end)

  it("do not carry metatables", function()
    local d = rt(setmetatable({1}, {__index = function() return "m" end}))
    assert.is_nil(getmetatable(d))
    assert.is_nil(d[2])
  end)

  it("accept 200 levels of nesting", function()
    local t = nest(200)
    assert.equal(200, depth(rt(t)))
  end)

  it("refuse deeper nesting when encoding, naming the path", function()
    local msg = errmsg(lpar.encode, (nest(201)))
    assert.matches("^cannot serialize: %[1%]%[1%]", msg)
    assert.matches("is nested too deeply %(limit 200 levels%)$", msg)
    assert.is_true(#msg < 200) -- the middle of the path is elided
    local outer, inner = nest(5)
    inner.deep = (nest(200))
    assert.matches("^cannot serialize: %[1%]%[1%]%[1%]%[1%]%.deep%[1%]",
      errmsg(lpar.encode, outer))
  end)

  it("refuse deeper nesting when decoding", function()
    local ok = string.rep("\6\1", 199) .. "\6\0\8" .. string.rep("\8", 199)
    assert.equal(200, depth(lpar.decode(ok)))
    local bad = string.rep("\6\1", 201) .. "\0" .. string.rep("\8", 201)
    assert.equal("bad encoding (value nested too deeply (limit 200 levels) at byte 401)",
      errmsg(lpar.decode, bad))
  end)

  it("refuse a function, naming where it is", function()
    assert.equal("cannot serialize: value is a function", errmsg(lpar.encode, print))
    assert.equal("cannot serialize: [2].cb is a function",
      errmsg(lpar.encode, {1, {cb = print}}))
    assert.equal("cannot serialize: a.b[3] is a function",
      errmsg(lpar.encode, {a = {b = {1, 2, function() end}}}))
  end)

  it("refuse userdata and coroutines", function()
    assert.equal("cannot serialize: value is a userdata", errmsg(lpar.encode, io.stdout))
    assert.equal("cannot serialize: value is a thread",
      errmsg(lpar.encode, coroutine.create(function() end)))
    assert.equal("cannot serialize: out is a userdata",
      errmsg(lpar.encode, {out = io.stdout}))
    assert.equal("cannot serialize: [1][1] is a thread",
      errmsg(lpar.encode, {{coroutine.create(function() end)}}))
  end)

  it("name keys that are not identifiers in the path", function()
    assert.equal('cannot serialize: ["a b"].f is a function',
      errmsg(lpar.encode, {["a b"] = {f = print}}))
    assert.equal('cannot serialize: ["1x"] is a function',
      errmsg(lpar.encode, {["1x"] = print}))
    assert.equal('cannot serialize: ["q\\"\\\\\\000\\010"] is a function',
      errmsg(lpar.encode, {["q\"\\\0\n"] = print}))
    assert.equal("cannot serialize: [1.5] is a function",
      errmsg(lpar.encode, {[1.5] = print}))
    assert.equal("cannot serialize: [true] is a function",
      errmsg(lpar.encode, {[true] = print}))
    assert.equal("cannot serialize: [false].x is a function",
      errmsg(lpar.encode, {[false] = {x = print}}))
    local long = string.rep("k", 100)
    assert.equal('cannot serialize: ["' .. string.rep("k", 40) .. '..."] is a function',
      errmsg(lpar.encode, {[long] = print}))
  end)

  it("refuse functions used as keys or inside table keys", function()
    assert.equal("cannot serialize: [function key] is a function",
      errmsg(lpar.encode, {[print] = 1}))
    assert.equal("cannot serialize: [table key].f is a function",
      errmsg(lpar.encode, {[{f = print}] = 1}))
  end)

  it("leave the stack and the value alone when refusing", function()
    local t = {1, {cb = print}}
    for _ = 1, 100 do pcall(lpar.encode, t) end
    assert.equal(print, t[2].cb)
    assert.equal(3, select("#", 1, lpar.encode(2), 3))
  end)

  it("check their arguments", function()
    -- a function called by pcall: 5.3 and 5.4 name it by where it is
    -- loaded, 5.1, 5.2 and LuaJIT cannot name it
    local enc, dec = "lpar.encode", "lpar.decode"
    if _VERSION < "Lua 5.3" then enc, dec = "?", "?" end
    assert.equal("bad argument #1 to '" .. enc .. "' (value expected)", errmsg(lpar.encode))
    assert.matches("bad argument #1 to '" .. dec .. "' (string expected, got nil)",
      errmsg(lpar.decode, nil), 1, true)
    assert.matches("bad argument #1 to '" .. dec .. "' (string expected, got table)",
      errmsg(lpar.decode, {}), 1, true)
  end)
end)

describe("lpar.decode on bad bytes", function()
  local good = lpar.encode({
    1, -300, 2.5, "str", {true, false, nil}, k = {x = "y"}, [1.5] = 1099511627776,
  })

  it("refuses every truncation of a valid encoding", function()
    for i = 0, #good - 1 do
      local msg = errmsg(lpar.decode, good:sub(1, i))
      -- a cut table may already be shorter than its announced array
      assert.is_truthy(msg:match("^bad encoding %(truncated [%w ]+ at byte %d+%)$")
        or msg:match("^bad encoding %(table longer than its frame at byte %d+%)$"), msg)
    end
    assert.equal("bad encoding (truncated value at byte 0)", errmsg(lpar.decode, ""))
    assert.equal("bad encoding (truncated float at byte 1)", errmsg(lpar.decode, "\4\0\0"))
    assert.equal("bad encoding (truncated string at byte 2)", errmsg(lpar.decode, "\5\3ab"))
    assert.equal("bad encoding (truncated table at byte 3)", errmsg(lpar.decode, "\6\1\0"))
    assert.equal("bad encoding (truncated integer at byte 1)", errmsg(lpar.decode, "\3\128"))
  end)

  it("refuses bad tags", function()
    assert.equal("bad encoding (bad value tag at byte 0)", errmsg(lpar.decode, "\9"))
    assert.equal("bad encoding (bad value tag at byte 0)", errmsg(lpar.decode, "\255"))
    assert.equal("bad encoding (bad value tag at byte 0)", errmsg(lpar.decode, "\8"))
    assert.equal("bad encoding (bad value tag at byte 2)", errmsg(lpar.decode, "\6\1\42\8"))
    for tag = 9, 255 do
      assert.matches("bad value tag", errmsg(lpar.decode, string.char(tag)))
    end
  end)

  it("refuses trailing bytes", function()
    assert.equal("bad encoding (trailing bytes at byte 2)",
      errmsg(lpar.decode, lpar.encode(1) .. "\0"))
    assert.equal("bad encoding (trailing bytes at byte " .. #good .. ")",
      errmsg(lpar.decode, good .. good))
  end)

  it("refuses varints longer than 64 bits", function()
    assert.equal("bad encoding (integer longer than 64 bits at byte 1)",
      errmsg(lpar.decode, "\3" .. string.rep("\255", 10) .. "\1"))
    assert.equal("bad encoding (integer longer than 64 bits at byte 1)",
      errmsg(lpar.decode, "\3" .. string.rep("\255", 9) .. "\2"))
    local min = lpar.decode("\3" .. string.rep("\255", 9) .. "\1") -- -2^63, a double holds it
    assert.equal(INTEGERS and math.mininteger or -2 ^ 63, min)
    if INTEGERS then assert.equal("integer", math.type(min)) end
  end)

  it("refuses huge announced lengths at once, without allocating", function()
    collectgarbage("collect")
    collectgarbage("stop")
    local kb = collectgarbage("count")
    local huge = varint(2 ^ 62)
    assert.equal("bad encoding (truncated string at byte 10)",
      errmsg(lpar.decode, "\5" .. huge .. "abc"))
    assert.equal("bad encoding (table longer than its frame at byte 10)",
      errmsg(lpar.decode, "\6" .. huge .. "\0\8"))
    assert.equal("bad encoding (table longer than its frame at byte 11)",
      errmsg(lpar.decode, "\6" .. MINUS1 .. "\0\8"))
    assert.equal("bad encoding (reference to an unknown table at byte 10)",
      errmsg(lpar.decode, "\7" .. huge))
    local grew = collectgarbage("count") - kb
    collectgarbage("restart")
    -- the messages and strings above; never the announced lengths
    assert.is_true(grew < 64, "the Lua heap grew by " .. grew .. " KiB")
  end)

  it("keeps memory bounded when nested tables all announce the rest", function()
    -- 199 tables, each claiming (nearly) all 2 MB that follow as its
    -- array: preallocating each at face value would take gigabytes
    local len, head = 2000000, {}
    for d = 1, 199 do head[d] = "\6" .. varint(len - 4 * d) end
    local s = table.concat(head) .. string.rep("\0", len)
    collectgarbage()
    collectgarbage("stop")
    local before, t0 = collectgarbage("count"), H.now()
    local msg = errmsg(lpar.decode, s)
    local grew = (collectgarbage("count") - before) / 1024
    collectgarbage("restart")
    assert.matches("^bad encoding %(", msg)
    assert.is_true(H.now() - t0 < 2, "took too long")
    assert.is_true(grew < 100, string.format("decoding took %.0f MB", grew))
  end)

  it("refuses nil and NaN keys", function()
    assert.equal("bad encoding (nil table key at byte 3)",
      errmsg(lpar.decode, "\6\0\0\3\2\8"))
    assert.equal("bad encoding (NaN table key at byte 11)",
      errmsg(lpar.decode, "\6\0" .. "\4" .. bits(0 / 0) .. "\3\2\8"))
    assert.equal("bad encoding (NaN table key at byte 11)",
      errmsg(lpar.decode, "\6\0" .. "\4" .. bits(-(0 / 0)) .. "\3\2\8"))
  end)

  it("refuses references to tables not seen yet", function()
    assert.equal("bad encoding (reference to an unknown table at byte 2)",
      errmsg(lpar.decode, "\7\0"))
    assert.equal("bad encoding (reference to an unknown table at byte 4)",
      errmsg(lpar.decode, "\6\1\7\1\8"))
    local d = lpar.decode("\6\1\7\0\8") -- a table holding itself
    assert.equal(d, d[1])
  end)

  it("accepts non-minimal varints and repeated keys", function()
    assert.equal(1, lpar.decode("\3\130\0"))
    assert.same({x = 2}, lpar.decode("\6\0\5\1x\3\2\5\1x\3\4\8"))
    assert.same({7}, lpar.decode("\6\1\3\2\3\2\3\14\8")) -- pair [1] = 7 wins
  end)

  it("never crashes on random bytes", function()
    local tags = {"\0", "\1", "\2", "\3", "\4", "\5", "\6", "\7", "\8", "\128", "\255"}
    for _ = 1, 3000 do
      local t = {}
      for i = 1, math.random(1, 24) do
        t[i] = math.random() < 0.6 and tags[math.random(#tags)]
          or string.char(math.random(0, 255))
      end
      local ok, v = pcall(lpar.decode, table.concat(t))
      if not ok then assert.matches("^bad encoding %(", v) end
    end
  end)
end)

describe("values from workers", function()
  it("come back identical, every kind", function()
    local values = {
      true, false, 0, -1, 2 ^ 53, -2 ^ 53, 1.0, NEGZERO,
      math.huge, -math.huge, 0 / 0, 5e-324, 0.1, "", "a\0b", allbytes,
      {1, nil, 3, x = {y = "z"}, [1.5] = true, [false] = 0},
    }
    if INTEGERS then values[5], values[6] = math.maxinteger, math.mininteger end
    local r, n = lpar.parallel(function(i) return values[i] end,
      (function()
        local t = {}
        for i = 1, #values do t[i] = i end
        return t
      end)(), 3)
    assert.equal(#values, n)
    for i, v in ipairs(values) do
      assert.equal(type(v), type(r[i]))
      if not INTEGERS and type(v) == "number" then -- doubles: every bit
        assert.equal(bits(v), bits(r[i]))
      elseif INTEGERS and math.type(v) == "float" then
        assert.equal("float", math.type(r[i]))
        assert.equal(bits(v), bits(r[i]))
      elseif INTEGERS and math.type(v) == "integer" then
        assert.equal("integer", math.type(r[i]))
        assert.equal(v, r[i])
      else
        assert.same(v, r[i])
      end
    end
  end)

  it("keep shared subtables and cycles", function()
    local r = lpar.parallel(function(i)
      local s = {i}
      local t = {s, s, k = s}
      t.self = t
      return t
    end, {1, 2, 3, 4}, 2)
    for i = 1, 4 do
      local t = r[i]
      assert.equal(t, t.self)
      assert.equal(t[1], t[2])
      assert.equal(t[1], t.k)
      assert.same({i}, t[1])
    end
  end)

  it("bring back large strings and tables", function()
    local r = lpar.parallel(function(i)
      if i == 1 then return string.rep(allbytes, 4096 * 16) end -- 16 MiB
      local t = {}
      for k = 1, 100000 do t[k] = k * i end
      return t
    end, {1, 2}, 2)
    assert.equal(string.rep(allbytes, 4096 * 16), r[1])
    assert.equal(100000, #r[2])
    assert.equal(200000, r[2][100000])
  end)

  it("name the item and the path of a result that cannot travel", function()
    local msg = errmsg(lpar.parallel, function(x)
      if x == 4 then return {1, {cb = print}} end
      return x
    end, {1, 2, 3, 4, 5}, 2)
    assert.matches("item 4: cannot serialize result: [2].cb is a function", msg, 1, true)
  end)

  it("refuse userdata and coroutines in results", function()
    local _, _, errs = lpar.parallel(function(x)
      if x == 1 then return io.stdout end
      if x == 2 then return {co = coroutine.create(function() end)} end
      return x
    end, {1, 2, 3}, {n_workers = 2, on_error = "collect"})
    assert.matches("cannot serialize result: value is a userdata", tostring(errs[1]), 1, true)
    assert.matches("cannot serialize result: co is a thread", tostring(errs[2]), 1, true)
    assert.is_nil(errs[3])
  end)
end)

-- Bytes the engine (engine.c) writes around encoded values.
describe("frames the engine sends to workers", function()
  it("are always whole, even when a streamed chunk finds no item", function()
    -- Such a chunk once left 24 bytes in the worker's buffer, their
    -- 16-byte header never written, and sent them later: the worker read
    -- a garbage header. Valgrind slows the parent down enough to show it.
    -- valgrind cannot run a build instrumented by the sanitizers
    if H.run("command -v valgrind") ~= 0 or H.run("ldd " .. H.cli .. " | grep -q libasan") == 0 then
      return
    end
    local code, out, err = H.run("valgrind -q --trace-children=no --error-exitcode=97 "
      .. H.cli .. " -e 'return function(s) return s end'", "a\n")
    assert.not_matches("uninitialised", err)
    assert.equal("a\n", out)
    assert.equal(0, code)
  end)
end)

-- The decoder's memory bound (docs/wire.md, "Values"): decoding n bytes,
-- whether it succeeds or fails at the last byte, grows the Lua heap by at
-- most BOUND * n bytes plus SLACK. spec/fixtures/codec/memprobe.c decodes
-- a file in a Lua state whose allocator records the peak, the collector
-- stopped, so garbage and the transient copies of a table being resized
-- all count.
describe("the decoder's memory", function()
  -- the bound of each Lua (docs/wire.md): 5.4's, and the others', whose
  -- tables and strings cost more (LuaJIT's less)
  local BOUND = JIT and 41 or ({["Lua 5.4"] = 46, ["Lua 5.3"] = 50, ["Lua 5.2"] = 54,
                                ["Lua 5.1"] = 57})[_VERSION]
  local SLACK = 64 * 1024
  local probe = os.tmpname()
  local input = os.tmpname()

  setup(function()
    local rc, out, err = H.run("cc -std=c11 -D_GNU_SOURCE -O1 -Isrc " ..
      H.cflags .. " -o " .. probe ..
      " spec/fixtures/codec/memprobe.c " .. H.build .. "/liblpar.a " ..
      H.libs .. " -lm")
    assert.equal(0, rc, out .. err)
  end)

  teardown(function()
    os.remove(probe)
    os.remove(input)
  end)

  -- Decode s in the probe: ok, peak bytes, and bytes used or the message.
  local function measure(s)
    local f = assert(io.open(input, "wb"))
    f:write(s)
    f:close()
    local rc, out, err = H.run(probe .. " " .. input)
    assert.equal(0, rc, err)
    local status, peak, rest = out:match("^(%a+) (%d+) (.-)\n$")
    assert.is_not_nil(status, out)
    return status == "ok", tonumber(peak), rest
  end

  local function array(n, piece) return "\6" .. varint(n) .. piece:rep(n) .. "\8" end
  local function pairs_(piece, n) return "\6\0" .. piece:rep(n) .. "\8" end
  -- a table that announces all the bytes after its length as its array
  -- part, then holds 'body' and is cut short: everything decoded is garbage
  local function failing(body) return "\6" .. varint(#body) .. body end
  -- n distinct strings of 1 to 3 bytes, each followed by 'after'
  local function strings(n, after)
    local t = {}
    for i = 0, n - 1 do
      local s = i < 256 and string.char(i)
        or i < 256 + 65536 and strlib.pack("<I2", i - 256) or strlib.pack("<I3", i)
      t[#t + 1] = "\5" .. varint(#s) .. s .. (after or "")
    end
    return table.concat(t)
  end
  -- Tables are counted so that the decoder's table of references, and the
  -- hash parts, have just doubled when the input ends.
  local k = 131073 -- 2^17 + 1
  local cases = {
    {"an array of nils", true, array(1048576, "\0")},
    {"an array of small integers", true, array(524288, "\3\2")},
    {"an array of booleans", true, array(524289, "\2")},
    {"an array of empty tables", true, array(k, "\6\0\8")},
    {"arrays of tables nested to the limit", true,
      array(1025, ("\6\1"):rep(198) .. "\6\0\8" .. ("\8"):rep(198))},
    {"nested tables that all announce the rest", false, (function()
      local head, len = {}, 3 * k
      for d = 1, 199 do head[d] = "\6" .. varint(len - 4 * d) end
      return table.concat(head) .. ("\6\0\8"):rep(k)
    end)()},
    {"distinct short strings", true, "\6" .. varint(3 * k) .. strings(3 * k) .. "\8"},
    {"a hash of distinct string keys", true, "\6\0" .. strings(3 * k, "\2") .. "\8"},
    {"a hash of table keys", true, pairs_("\6\0\8\2", k)},
    {"a hash of table keys and table values", true, pairs_("\6\0\8\6\0\8", math.floor(k / 2) + 1)},
    {"an outer table that fails at the end, of empty tables", false,
      failing(("\6\0\8"):rep(k))},
    {"an outer table that fails at the end, of a hash of tables", false,
      failing(pairs_("\6\0\8\6\0\8", math.floor(k / 2) + 1):sub(1, -2))},
    {"an outer table that fails at the end, of strings", false,
      failing(strings(3 * k))},
  }

  for _, case in ipairs(cases) do
    local name, fine, s = case[1], case[2], case[3]
    it("stays within " .. BOUND .. " bytes per input byte: " .. name, function()
      local ok, peak, rest = measure(s)
      if fine then
        assert.is_true(ok, rest)
        assert.equal(#s, tonumber(rest))
      else
        assert.is_false(ok)
        assert.matches("^truncated", rest)
      end
      assert.is_true(peak <= BOUND * #s + SLACK, string.format(
        "%s: %d bytes took %d bytes of Lua heap, %.1f per byte", name, #s, peak, peak / #s))
    end)
  end
end)
