-- The lpar command's vocabulary for users of GNU parallel and batch
-- schedulers: --shard, --halt values, -j forms, -a, :::, --colsep, --tag.
-- Each runs the built binary for real.
local H = require "spec.helper"
local hosts = require "spec.hosts"
local unistd = require "posix.unistd"

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Run lpar with a shell-quoted argument string; returns code, out, err.
local function lpar(args, input)
  return H.run(quote(H.cli) .. " " .. args, input)
end

local function writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function lines(s)
  local t = {}
  for l in s:gmatch("([^\n]*)\n") do t[#t + 1] = l end
  return t
end

-- "1\n2\n...n\n"
local function numbers(n)
  local t = {}
  for i = 1, n do t[i] = i .. "\n" end
  return table.concat(t)
end

-- The joblog's item lines as {line, status}, in order.
local function logged(path)
  local t = {}
  for l, st in (H.slurp(path) or ""):gmatch("\n(%d+)\t(%a+)\t") do
    t[#t + 1] = {tonumber(l), st}
  end
  return t
end

local ECHO = quote("return function(s) return 'r' .. s end")

describe("lpar --shard K/N", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("takes input lines K, K+N, K+2N... and logs their real line numbers", function()
    local items = writefile(dir .. "/items", numbers(10))
    local rc, out, err = lpar("--shard 2/3 --joblog " .. dir .. "/log -e " .. ECHO .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("r2\nr5\nr8\n", out)
    assert.same({{2, "ok"}, {5, "ok"}, {8, "ok"}}, logged(dir .. "/log"))
  end)

  it("splits an input among three shards: each line once, none lost", function()
    -- 5000 lines through pipes and files, in batches as on a real run
    local items = writefile(dir .. "/items", numbers(5000) .. "last without newline")
    local all = {}
    for k = 1, 3 do
      local rc, out, err = lpar(("--shard %d/3 -o %s/out%d -e %s %s")
                                :format(k, dir, k, ECHO, items))
      assert.equal(0, rc, err)
      assert.equal("", out)
      local prev = 0
      for _, l in ipairs(lines(H.slurp(dir .. "/out" .. k))) do
        local n = tonumber(l:match("^r(%d+)$"))
        local line = n or 5001
        assert.equal(k, (line - 1) % 3 + 1, "line " .. l .. " in shard " .. k)
        assert.is_true(line > prev) -- in input order
        prev = line
        assert.is_nil(all[line], "twice: " .. l)
        all[line] = l
      end
    end
    for i = 1, 5000 do assert.equal("r" .. i, all[i]) end
    assert.equal("rlast without newline", all[5001])
    -- from stdin too
    local rc, out = H.run(quote(H.cli) .. " --shard 3/3 -e " .. ECHO .. " - <" .. items)
    assert.equal(0, rc)
    assert.equal(H.slurp(dir .. "/out3"), out)
  end)

  it("names the real line of a failure and counts the shard's items", function()
    local items = writefile(dir .. "/items", numbers(9))
    local rc, out, err = lpar("--shard 2/2 -e " ..
      quote("return function(s) if s == '6' then error('six') end return s end") .. " " .. items)
    assert.equal(1, rc)
    assert.equal("2\n4\n8\n", out)
    assert.matches('lpar: line 6 %("6"%): %(command line%):1: six', err)
    assert.matches("lpar: 1 of 4 items failed", err)
  end)

  it("resumes per shard, and refuses the joblog of another shard", function()
    local items = writefile(dir .. "/items", numbers(20))
    local script = writefile(dir .. "/s.lua",
      "return function(s) if s == '11' and os.getenv('FAIL') then error('no') end return s end")
    local common = ("--joblog %s/log -o %s/out %s %s"):format(dir, dir, script, items)
    local rc, _, err = H.run("FAIL=1 " .. quote(H.cli) .. " --halt --shard 2/3 " .. common)
    assert.equal(1, rc, err)
    assert.equal("2\n5\n8\n", H.slurp(dir .. "/out"))
    rc, _, err = lpar("--resume --shard 1/3 " .. common)
    assert.equal(2, rc)
    assert.matches("cannot resume from .*log: it is the joblog of shard 2/3, this run is shard 1/3", err)
    rc, _, err = lpar("--resume " .. common)
    assert.equal(2, rc)
    assert.matches("it is the joblog of shard 2/3, this run is shard 1/1", err)
    rc, _, err = lpar("--resume --shard 2/3 " .. common)
    assert.equal(0, rc, err)
    assert.equal("2\n5\n8\n14\n17\n20\n", H.slurp(dir .. "/out"))
    assert.same({{2, "ok"}, {5, "ok"}, {8, "ok"}, {11, "failed"}, {14, "ok"}, {17, "ok"}, {20, "ok"}},
                logged(dir .. "/log"))
  end)

  it("counts the shard's items for --progress", function()
    local items = writefile(dir .. "/items", numbers(10))
    local rc, _, err = lpar("--progress --shard 1/3 -e " .. ECHO .. " " .. items)
    assert.equal(0, rc, err)
    assert.matches("4/4 100%%", err)
  end)

  it("refuses a bad K/N as a usage error", function()
    for _, v in ipairs({"0/3", "4/3", "1/0", "x", "1/3x", "-1/3", "/3"}) do
      local rc, out, err = lpar("--shard " .. quote(v) .. " -e " .. ECHO .. " -", "a\n")
      assert.equal(2, rc, v)
      assert.equal("", out)
      assert.matches("bad value for '%-%-shard': '" .. v:gsub("%p", "%%%0") .. "'", err)
    end
  end)

  describe("in a Slurm job array", function()
    local slurm, why, unavailable
    lazy_setup(function() slurm, why, unavailable = hosts.slurm(3) end)
    lazy_teardown(function() if slurm then assert(hosts.stop(slurm)) end end)

    it("splits one input among the array's tasks (sbatch --array=1-3)", function()
      if not slurm then
        if unavailable then return pending(why) end
        error(why, 0)
      end
      writefile(dir .. "/items", numbers(300))
      writefile(dir .. "/upper.lua", "return function(s) return 'done ' .. s end")
      -- the README's recipe, as it is written there
      local cmd = ("cd %s && timeout 120 sbatch --array=1-3 --wait --output=log.%%a " ..
                   "--wrap %s"):format(quote(dir), quote(("%s --shard $SLURM_ARRAY_TASK_ID/3 " ..
                   "--joblog job.$SLURM_ARRAY_TASK_ID.log -o out.$SLURM_ARRAY_TASK_ID upper.lua items")
                   :format(H.cli:match("^/") and H.cli or unistd.getcwd() .. "/" .. H.cli)))
      local rc, out, err = H.run(cmd)
      assert.equal(0, rc, out .. err)
      local seen = {}
      for k = 1, 3 do
        local text = H.slurp(dir .. "/out." .. k)
        assert.is_not_nil(text, "no out." .. k .. ": " .. tostring(H.slurp(dir .. "/log." .. k)))
        for _, l in ipairs(lines(text)) do
          local n = tonumber(l:match("^done (%d+)$"))
          assert.equal(k, (n - 1) % 3 + 1)
          assert.is_nil(seen[n])
          seen[n] = true
        end
        assert.equal(100, #logged(dir .. "/job." .. k .. ".log"))
      end
      for i = 1, 300 do assert.is_true(seen[i], "line " .. i) end
    end)
  end)
end)
