-- The values whose encodings seed the fuzz corpus (see mkcorpus.c): one of
-- each kind, the edge cases of each, and shapes that exercise references.
local shared = {1, 2}
local cyc = {}
cyc.self = cyc
local deep = {}
local d = deep
for _ = 1, 30 do d[1] = {}; d = d[1] end
local mixed = {10, 20, nil, 40, x = 1, [1.5] = "f", [true] = false, [-1] = 0}
mixed[{}] = "table key"
local arr = {}
for i = 1, 300 do arr[i] = i * 3 end
local bytes = {}
for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end

-- in every Lua (FUZZ_LUA): before 5.3, the largest doubles stand for the
-- integers at the edges
local pack = table.pack or function(...) return {n = select("#", ...), ...} end
local maxint, minint = math.maxinteger or 2 ^ 63 - 1024, math.mininteger or -2 ^ 63

return pack(
  nil, true, false,
  0, 1, -1, 63, 64, -64, -65, 127, 128, 300, -300, 1048576, 1099511627776,
  maxint, minint,
  0.0, -0.0, 1.0, 0.1, -2.5, 1 / 0, -1 / 0, 0 / 0, 5e-324, 1.7976931348623157e308,
  "", "a", "hello", "a\0b", table.concat(bytes), string.rep("x", 1000),
  {}, {1, 2, 3}, {"a", "b"}, {x = 1, y = 2}, {1, {2, {3}}},
  {shared, shared}, {a = shared, b = {shared}}, cyc, {cyc, cyc},
  deep, mixed, arr, {n = 3, 1, 2, 3}, {[100] = 1}, {nil, nil, 3},
  {{}, {}, {}}, {[{}] = {}, [{1}] = {2}}
)
