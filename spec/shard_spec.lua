-- lpar --shard K/N: one input split among N runs with no coordinator, and
-- their outputs merged back (--number); the recipes of docs/cli.md ("Many
-- machines") run as written there, on the test hosts of spec/hosts.lua.
local H = require "spec.helper"
local hosts = require "spec.hosts"
local signal = require "posix.signal"
local unistd = require "posix.unistd"

local quote = H.quote
local lpar = H.lpar
local writefile = H.writefile
local lines = H.lines

-- the built lpar, by an absolute path (for commands run elsewhere)
local CLI = H.cli:match("^/") and H.cli or unistd.getcwd() .. "/" .. H.cli
local BIN = CLI:match("^(.*)/[^/]*$")

local numbers, logged = H.numbers, H.logged

-- The text of the fenced block of docs/cli.md just after the marker that
-- holds 'mark'.
local function docblock(mark)
  local text = assert(H.readfile("docs/cli.md"))
  local at = assert(text:find(mark, 1, true), "docs/cli.md has no block marked " .. mark)
  return assert(text:match("^[^\n]*%-%->\n```%w*\n(.-)```", at), "no block after " .. mark)
end

-- s with each plain 'from' replaced by 'to', which must occur 'n' times
local function swap(s, from, to, n)
  local count
  s, count = s:gsub(from:gsub("%p", "%%%0"), (to:gsub("%%", "%%%%")))
  assert(count == n, ("%d times '%s' in the docs' block, expected %d"):format(count, from, n))
  return s
end

-- The results of 'map' as the doc's square.lua gives them: a square, none
-- for multiples of 4, and a failure for multiples of 7.
local SCRIPT = [[
return function(s)
  local n = tonumber(s) or 0
  if n % 7 == 0 and n > 0 then error("seven " .. s) end
  if n % 4 ~= 0 then return s .. "\t" .. n * n end
end
]]

describe("lpar --shard K/N", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("takes input lines K, K+N, K+2N... and logs their real line numbers", function()
    local items = writefile(dir .. "/items", numbers(10))
    local rc, out, err = lpar("--shard 2/3 --joblog " .. dir .. "/log -e " ..
                              quote("return function(s) return 'r' .. s end") .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("r2\nr5\nr8\n", out)
    assert.same({{2, "ok"}, {5, "ok"}, {8, "ok"}}, logged(dir .. "/log"))
  end)

  it("names the real line of a failure, and counts the shard's items", function()
    local items = writefile(dir .. "/items", numbers(9))
    local rc, out, err = lpar("--shard 2/2 -e " ..
      quote("return function(s) if s == '6' then error('six') end return s end") .. " " .. items)
    assert.equal(1, rc)
    assert.equal("2\n4\n8\n", out)
    assert.matches('lpar: line 6 %("6"%): %(command line%):1: six', err)
    assert.matches("lpar: 1 of 4 items failed", err)
    rc, out, err = lpar("--progress --shard 1/3 -e " .. quote("return function(s) return s end") .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("1\n4\n7\n", out)
    assert.matches("3/3 100%%", err)
  end)

  it("--number starts each line with its input line number, whatever the shard", function()
    local items = writefile(dir .. "/items", numbers(10))
    local rc, out, err = lpar("--number --shard 2/3 -e " ..
                              quote("return function(s) if s ~= '5' then return 'r' .. s end end") .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("2\tr2\n8\tr8\n", out)
    rc, out, err = lpar("--number --tag -e " .. quote("return function(s) return #s end") .. " ::: a bb")
    assert.equal(0, rc, err)
    assert.equal("1\ta\t1\n2\tbb\t2\n", out)
    -- a record run again on its own (--retries, a worker lost) keeps its number
    local script = writefile(dir .. "/s.lua", ([[
      return function(s)
        if s == "4" and not io.open(%q) then io.open(%q, "w"):close() error("once") end
        if s == "7" then os.exit(3) end
        return s
      end]]):format(dir .. "/tried", dir .. "/tried"))
    rc, out, err = lpar("-j2 --number --retries 1 --shard 1/3 " .. script .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\t1\n4\t4\n10\t10\n", out)
    assert.matches('lpar: line 7 %("7"%): worker %d+ exited with status 3', err)
  end)

  it("refuses a bad K/N, naming the option and the value", function()
    for _, v in ipairs({"0/3", "4/3", "a/b", "3", "1/0", "1/3x", "-1/3", "/3", "", "1/99999999999999999999"}) do
      for _, form in ipairs({"--shard " .. quote(v), "--shard=" .. quote(v)}) do
        local rc, out, err = lpar(form .. " -e " .. quote("return function(s) return s end") .. " -", "a\n")
        assert.equal(2, rc, v)
        assert.equal("", out)
        assert.equal("lpar: bad value for '--shard': '" .. v .. "' (expected K/N, 1 <= K <= N, like 2/3)",
                     lines(err)[1])
      end
    end
    local rc, _, err = lpar("-e " .. quote("return function(s) return s end") .. " --shard")
    assert.equal(2, rc)
    assert.matches("option '%-%-shard' needs a value", err)
  end)

  it("merges back into the whole run's output, byte for byte, each line run once", function()
    local script = writefile(dir .. "/s.lua", SCRIPT)
    local items = writefile(dir .. "/items", numbers(3000) .. "last without newline")
    local rc, whole, werr = lpar("-j2 " .. script .. " " .. items)
    assert.equal(1, rc, werr)
    for _, n in ipairs({1, 2, 3, 7}) do
      local outs, ran = {}, {}
      for k = 1, n do
        local out = ("%s/out.%d"):format(dir, k)
        outs[k] = out
        local code, _, err = lpar(("-j2 --shard %d/%d --number --joblog %s/job.%d.log -o %s %s %s")
                                  :format(k, n, dir, k, out, script, items))
        -- a failure (a multiple of 7) in this shard: exit 1
        assert.equal((n % 7 ~= 0 or k == 7) and 1 or 0, code, err)
        for _, rec in ipairs(logged(("%s/job.%d.log"):format(dir, k))) do
          local line = rec[1]
          assert.equal(k, (line - 1) % n + 1, "line " .. line .. " in shard " .. k .. "/" .. n)
          assert.is_nil(ran[line], "line " .. line .. " twice")
          ran[line] = rec[2]
        end
        local prev = 0
        for _, l in ipairs(lines(H.slurp(out))) do
          local line = tonumber(l:match("^(%d+)\t"))
          assert.is_true(line > prev and (line - 1) % n + 1 == k, l)
          prev = line
        end
      end
      for i = 1, 3001 do
        assert.equal((i % 7 == 0) and "failed" or "ok", ran[i], "line " .. i .. " of " .. n .. " shards")
      end
      assert.is_nil(ran[3002])
      -- docs/cli.md's merge
      local code, merged, err = H.run("cd " .. quote(dir) .. " && sort -m -n " ..
                                      table.concat(outs, " ") .. " | cut -f2-")
      assert.equal(0, code, err)
      assert.is_true(merged == whole, n .. " shards merged differ from the whole run")
      if n == 3 then -- items from a pipe: the same shard
        local _, piped = H.run(("%s -j2 --shard 3/3 --number %s - < %s 2>/dev/null")
                               :format(quote(CLI), script, items))
        assert.is_true(piped == H.slurp(outs[3]), "shard 3/3 from a pipe differs")
      end
    end
  end)

  it("drops the records of other shards as they come, however long", function()
    if not os.execute("test -x /usr/bin/time") then return pending("no /usr/bin/time") end
    -- line 1: 96 MiB, not this shard's; line 2 is
    local items = dir .. "/items"
    assert(H.run(("head -c %d /dev/zero | tr '\\0' x > %s && printf '\\nsmall\\n' >> %s")
                 :format(96 * 1024 * 1024, quote(items), quote(items))) == 0)
    local script = writefile(dir .. "/s.lua", ([[
      return function(s)
        local f = assert(io.open(%q, "a")) f:write(#s, "\n") f:close()
        return #s
      end]]):format(dir .. "/seen"))
    local rc, out, err = H.run(("/usr/bin/time -f 'peak %%M kB' %s --shard 2/2 %s - < %s")
                               :format(quote(CLI), script, quote(items)))
    assert.equal(0, rc, err)
    assert.equal("5\n", out)
    assert.equal("5\n", H.slurp(dir .. "/seen")) -- the long line reached no worker
    local kb = tonumber(err:match("peak (%d+) kB"))
    assert.is_true(kb < 32 * 1024, "lpar held " .. kb .. " kB")
  end)

  it("resumes a shard killed mid-run, each of its lines once, and refuses another shard's joblog", function()
    local script = writefile(dir .. "/s.lua", [[
      return function(s) os.execute("sleep 0.02") return s * 2 end
    ]])
    local items = writefile(dir .. "/items", numbers(600))
    local log, out = dir .. "/job.2.log", dir .. "/out.2"
    local args = {"-j2", "--shard", "2/3", "--number", "--joblog", log, "-o", out, script, items}
    local p = H.spawncli(args)
    -- killed once some of its results are written and marked
    assert.is_true(H.waitfor(function() return #logged(log) >= 20 end, 60), "no progress")
    assert.equal(0, signal.kill(p.pid, signal.SIGKILL))
    local how, code = H.waitexit(p.pid, 30)
    H.closeall(p)
    assert.equal("killed", how)
    assert.equal(signal.SIGKILL, code)
    assert.is_true(#logged(log) < 200)
    local common = table.concat(args, " ", 4)
    -- another shard (or none) is refused, before anything is cut
    local before = H.slurp(log)
    for _, other in ipairs({"--shard 1/3", "--shard 2/4", ""}) do
      local rc, _, err = lpar("--resume -j2 " .. other .. " " .. common)
      assert.equal(2, rc, other)
      assert.matches("lpar: cannot resume from .*job%.2%.log: it is the joblog of shard 2/3, this run is shard " ..
                     (other == "" and "1/1" or other:match("%S+$")), err)
    end
    assert.equal(before, H.slurp(log))
    local rc, _, err = lpar("--resume -j2 --shard 2/3 " .. common)
    assert.equal(0, rc, err)
    local want = {}
    for i = 2, 600, 3 do want[#want + 1] = i .. "\t" .. i * 2 .. "\n" end
    assert.equal(table.concat(want), H.slurp(out))
    local seen = {}
    for _, rec in ipairs(logged(log)) do
      assert.is_nil(seen[rec[1]], "line " .. rec[1] .. " twice")
      seen[rec[1]] = rec[2]
    end
    for i = 1, 600 do assert.equal(i % 3 == 2 and "ok" or nil, seen[i], "line " .. i) end
    -- the other shards, then the merge: the whole run
    for _, k in ipairs({1, 3}) do
      rc, _, err = lpar(("-j2 --shard %d/3 --number -o %s/out.%d %s %s"):format(k, dir, k, script, items))
      assert.equal(0, rc, err)
    end
    local merged, whole
    rc, merged = H.run("cd " .. quote(dir) .. " && sort -m -n out.1 out.2 out.3 | cut -f2-")
    assert.equal(0, rc)
    rc, whole = lpar("-j2 " .. script .. " " .. items)
    assert.equal(0, rc)
    assert.equal(whole, merged)
  end)

  -- The script of docs/cli.md's recipes, which also notes where it ran.
  local function recipe(d)
    writefile(d .. "/items.txt", numbers(3000))
    local square = H.readfile("docs/cli.md"):match("<!%-%- file: square%.lua %-%->\n```lua\n(.-)```")
    assert(square, "docs/cli.md has no square.lua")
    writefile(d .. "/square.lua", ("local h = os.getenv('LPAR_TEST_HOST') or os.getenv('SLURMD_NODENAME')\n" ..
      "if h then local f = assert(io.open(%q, 'a')) f:write(h, '\\n') f:close() end\n")
      :format(d .. "/hosts.seen") .. square)
    local rc, whole, err = lpar(quote(d .. "/square.lua") .. " " .. quote(d .. "/items.txt"))
    assert.equal(0, rc, err)
    return whole
  end

  -- The hosts that ran a shard, sorted.
  local function ran(d)
    local t = lines(H.slurp(d .. "/hosts.seen") or "")
    table.sort(t)
    return t
  end

  describe("in a Slurm job array (docs/cli.md's recipe)", function()
    local slurm, why, unavailable
    lazy_setup(function() slurm, why, unavailable = hosts.slurm(3) end)
    lazy_teardown(function() if slurm then assert(hosts.stop(slurm)) end end)

    it("runs one shard per task and merges them once all succeeded", function()
      if not slurm then
        if unavailable then return pending(why) end
        error(why, 0)
      end
      local whole = recipe(dir)
      local block = docblock("slurm recipe")
      local rc, out, err = H.run(("cd %s && PATH=%s:$PATH timeout 60 sh -ec %s")
                                 :format(quote(dir), quote(BIN), quote(block)))
      assert.equal(0, rc, out .. err)
      local merge = out:match("(%d+)[;%w]*%s*$")
      assert(merge, "no job id from the recipe: " .. out)
      -- wait for the merge job to leave the queue; one whose dependency
      -- cannot be met any more (a task failed) stays there: fail at once
      -- wait for the merge job to leave the queue (done, or cancelled
      -- because a task failed)
      local state = ""
      local done = H.waitfor(function()
        local _, q = H.run("squeue -h -j " .. merge .. " -o '%T %r'")
        state = q
        return q == ""
      end, 180)
      local logs = {}
      for k = 1, 3 do logs[k] = tostring(H.slurp(dir .. "/log." .. k)) end
      if not done then
        H.run("scancel " .. merge)
        error(("merge job %s still queued after 180 s: %s\n%s"):format(merge, state,
                                                                      table.concat(logs, "\n")), 0)
      end
      local results = H.slurp(dir .. "/results.txt")
      assert(results, "no results.txt (merge job cancelled?):\n" .. table.concat(logs, "\n"))
      assert.is_true(results == whole,
                     "results.txt differs from the whole run: " .. tostring(H.slurp(dir .. "/merge.log")))
      for k = 1, 3 do
        assert.equal(1000, #logged(dir .. "/job." .. k .. ".log"), logs[k])
        for _, l in ipairs(lines(H.slurp(dir .. "/out." .. k))) do
          local line = tonumber(l:match("^(%d+)\t"))
          assert.equal(k, (line - 1) % 3 + 1, l)
        end
      end
      local nodes = ran(dir)
      assert.equal(3, #nodes)
      for _, n in ipairs(nodes) do assert.matches("^n%d$", n) end
    end)
  end)

  describe("with one ssh per host (docs/cli.md's recipe)", function()
    local ssh, why, unavailable
    lazy_setup(function() ssh, why, unavailable = hosts.ssh(3) end)
    lazy_teardown(function() if ssh then assert(hosts.stop(ssh)) end end)

    it("runs shard k on host hk and merges their outputs", function()
      if not ssh then
        if unavailable then return pending(why) end
        error(why, 0)
      end
      local whole = recipe(dir)
      -- as written, but with the test hosts' ssh config and the built lpar
      local text = swap(docblock("ssh recipe"), "&& lpar ", "&& " .. CLI .. " ", 1)
      local block = swap(text, "ssh h$k", "ssh -F " .. ssh.config .. " h$k", 1)
      -- a shard that cannot reach its host: said, and nothing merged
      local lost = swap(text, "ssh h$k", "ssh -F " .. ssh.config .. " h$((k == 2 ? 9 : k))", 1)
      local rc, out, err = H.run(("cd %s && timeout 120 sh -ec %s"):format(quote(dir), quote(lost)))
      assert.equal(0, rc, out .. err)
      assert.matches("a shard failed: nothing merged\n$", err)
      assert.is_nil(H.slurp(dir .. "/results.txt"))
      os.remove(dir .. "/hosts.seen")
      rc, out, err = H.run(("cd %s && timeout 120 sh -ec %s"):format(quote(dir), quote(block)))
      assert.equal(0, rc, out .. err)
      assert.equal("", err)
      assert.is_true(H.slurp(dir .. "/results.txt") == whole, "results.txt differs from the whole run")
      assert.same({"h1", "h2", "h3"}, ran(dir))
      for k = 1, 3 do
        for _, l in ipairs(lines(H.slurp(dir .. "/out." .. k))) do
          local line = tonumber(l:match("^(%d+)\t"))
          assert.equal(k, (line - 1) % 3 + 1, l)
        end
      end
    end)
  end)
end)
