-- Counts the primes below 2 000 000 in 16 ranges, one range per item, on
-- 8 workers, and checks the total against a known count.
--   build/lpar examples/primes.lua
--   LUA_CPATH='build/?.so;;' lua5.4 examples/primes.lua
local lpar = require "lpar"

local function isprime(n)
  if n < 2 then return false end
  if n % 2 == 0 then return n == 2 end
  for d = 3, math.floor(math.sqrt(n)), 2 do
    if n % d == 0 then return false end
  end
  return true
end

local limit, parts = 2000000, 16
local ranges = {}
for i = 1, parts do
  ranges[i] = {lo = (i - 1) * limit // parts, hi = i * limit // parts - 1}
end

local t0 = os.time()
local counts = lpar.parallel(function(r)
  local n = 0
  for k = r.lo, r.hi do
    if isprime(k) then n = n + 1 end
  end
  return n
end, ranges, 8)

local total = 0
for i = 1, parts do total = total + counts[i] end
print(string.format("%d primes below %d (%d ranges, about %d s)", total, limit, parts, os.time() - t0))
assert(total == 148933, "wrong count")
