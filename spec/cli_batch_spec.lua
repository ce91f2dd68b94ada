-- How the lpar command batches records: the one rule of the engine's
-- policy sizes them (see docs/cli.md, "Streaming").
local H = require "spec.helper"

local FIX = "spec/fixtures/cli/"
local tmpname = H.tmpfiles(after_each)

describe("lpar batches", function()
  it("hands out one record at a time while a batch is overdue", function()
    -- "s1" holds its worker until "s2" starts; the 4000 quick records
    -- between them show the other worker that s1's batch is overdue, so
    -- the batch with "s2" holds no quick record: s2 sees all the "a"
    -- records after it run in the other worker
    local dir = H.tmpdir()
    local n = 4000
    local items = tmpname()
    H.writefile(items, ("f\n"):rep(n) .. "s1\n" .. ("f\n"):rep(n) .. "s2\n" .. ("a\n"):rep(n))
    local code, out, err = H.lpar(("-j2 %s %s %s 1 %d"):format(FIX .. "hostage.lua", H.quote(items),
                                                                H.quote(dir), n), nil, 120)
    H.rmdir(dir)
    assert.equal(0, code, err)
    local got = H.lines(out)
    assert.equal(3 * n + 2, #got)
    assert.equal("s1", got[n + 1])
    assert.equal("s2 free", got[2 * n + 2])
  end)

  -- a script whose lines "sN" sleep N ms and note their worker's pid in
  -- the directory arg[2]; other lines are quick
  local SLEEPY = [[
local time = require "posix.time"
local unistd = require "posix.unistd"
local dir = arg[2]
return function(s)
  local ms = tonumber(s:match("^s(%d+)$"))
  if ms then
    io.open(("%s/%d.%d"):format(dir, unistd.getpid(), math.random(1e9)), "w"):close()
    time.nanosleep({tv_sec = math.floor(ms / 1000), tv_nsec = (ms % 1000) * 1000000})
  end
  return s
end
]]

  -- the distinct pids of the workers that ran slow lines
  local function pids(dir)
    local t, n = {}, 0
    for name in require("posix.dirent").files(dir) do
      local pid = name:match("^(%d+)%.")
      if pid and not t[pid] then t[pid], n = true, n + 1 end
    end
    return n
  end

  for _, case in ipairs({
    -- a batch sized by one quick line holds the slow ones
    {"after one quick line", "1\n" .. ("s300\n"):rep(12), 2, 2},
    -- the slow lines a batch hands back run one at a time, though quick
    -- ones follow them
    {"among quick ones", ("1\n"):rep(20000) .. ("s200\n"):rep(16) .. ("1\n"):rep(1000), 4, 3},
  }) do
    it("spreads slow lines over the workers " .. case[1], function()
      local dir = H.tmpdir()
      local script = H.writefile(tmpname() .. ".lua", SLEEPY)
      local items = H.writefile(tmpname(), case[2])
      local code, out, err = H.lpar(("-j%d --unordered %s %s %s"):format(case[3], H.quote(script),
                                                                         H.quote(items), H.quote(dir)), nil, 120)
      local n = pids(dir)
      H.rmdir(dir)
      assert.equal(0, code, err)
      assert.equal(#H.lines(case[2]), #H.lines(out))
      assert.is_true(n >= case[4], "the slow lines ran on " .. n .. " worker(s)")
    end)
  end

  it("names the line whose worker died in a batch, though it would pass again", function()
    -- line 31 kills its worker the first time only; a batch of 50 holds it
    local dir = H.tmpdir()
    local script = H.writefile(tmpname() .. ".lua", [[
local signal = require "posix.signal"
local unistd = require "posix.unistd"
local mark = arg[2] .. "/killed"
return function(s)
  if s == "31" and not io.open(mark) then
    io.open(mark, "w"):close()
    signal.kill(unistd.getpid(), signal.SIGKILL)
  end
  return s
end
]])
    local items = H.writefile(tmpname(), H.numbers(100))
    local code, out, err = H.lpar(("-j2 --chunk 50 %s %s %s"):format(H.quote(script), H.quote(items),
                                                                    H.quote(dir)), nil, 120)
    H.rmdir(dir)
    assert.equal(1, code, err)
    assert.matches('^lpar: line 31 %("31"%): worker %d+ killed by signal 9', err)
    local want = H.numbers(100):gsub("\n31\n", "\n")
    assert.equal(want, out)
  end)
end)

