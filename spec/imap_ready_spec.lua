-- lpar.imap and pool:imap hand back the results that are ready before
-- they ask an iterator that may block: over the lines of a pipe whose
-- writer pauses, the results of the lines written so far come out during
-- the pause.
local lpar = require "lpar"
local H = require "spec.helper"

local tmpname = H.tmpfiles(after_each)

-- A pipe from a writer that writes "a" and "b", then waits until 'flag'
-- exists (30 s at most), then writes "told" (or "late" if it was never
-- told) and "d".
local function writer(flag)
  local sh = ([[
    echo a; echo b
    i=0
    while [ ! -e %s ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -e %s ]; then echo told; else echo late; fi
    echo d]]):format(flag, flag)
  return assert(io.popen("sh -c " .. H.quote(sh), "r"))
end

-- Run imap (made by 'imap' over the pipe's lines) and tell the writer to
-- go on once the results of "a" and "b" are in: the results in the order
-- they came, each with what had happened before it.
local function run(imap)
  local flag = tmpname()
  os.remove(flag) -- told: it exists
  local p = writer(flag)
  local got = {}
  for i, v in imap(function(s) return s:upper() end, p:lines()) do
    got[#got + 1] = i .. v
    if #got == 2 then assert(io.open(flag, "w")):close() end
  end
  p:close()
  return got
end

describe("imap over a pipe that pauses", function()
  after_each(function() assert.same({}, H.children()) end)

  for _, n in ipairs{1, 2, 4} do
    it("lpar.imap hands back the results so far during the pause (" .. n .. " workers)", function()
      local got = run(function(f, it) return lpar.imap(f, it, {n_workers = n}) end)
      assert.same({"1A", "2B", "3TOLD", "4D"}, got)
    end)

    it("pool:imap hands back the results so far during the pause (" .. n .. " workers)", function()
      local pool = H.closing(finally, lpar.pool(n))
      local got = run(function(f, it) return pool:imap(f, it) end)
      assert.same({"1A", "2B", "3TOLD", "4D"}, got)
    end)
  end

  it("pool:imap with unordered results does too", function()
    local pool = H.closing(finally, lpar.pool(2))
    local got = run(function(f, it) return pool:imap(f, it, {unordered = true}) end)
    table.sort(got, function(x, y) return x < y end)
    assert.same({"1A", "2B", "3TOLD", "4D"}, got)
  end)

  it("lpar.imap over io.lines of a file reads it all", function()
    local path = tmpname()
    H.writefile(path, ("x\n"):rep(5000))
    local n = 0
    for i, v in lpar.imap(function(s) return s .. "!" end, io.lines(path), {n_workers = 2}) do
      n = n + 1
      assert.equal(n, i)
      assert.equal("x!", v)
    end
    assert.equal(5000, n)
  end)
end)
