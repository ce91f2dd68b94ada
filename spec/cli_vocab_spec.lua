-- The lpar command's vocabulary for users of GNU parallel and batch
-- schedulers: --halt values, -j forms, -a, :::, --colsep, --tag (--shard:
-- shard_spec.lua). Each runs the built binary for real.
local H = require "spec.helper"

local quote = H.quote
local lpar = H.lpar
local writefile = H.writefile
local lines = H.lines

local numbers, logged = H.numbers, H.logged

local ECHO = quote("return function(s) return 'r' .. s end")

-- A script whose item "1" fails once item "2" has started, and whose item
-- "2" returns "two" once the file named by its third argument exists.
local RACE = [[
local dir, until_ = arg[2], arg[3]
local function exists(p) local f = io.open(p) if f then f:close() return true end return false end
local function touch(p) assert(io.open(p, "w")):close() end
local function await(p) for _ = 1, 6000 do if exists(p) then return end os.execute("sleep 0.01") end end
return function(s)
  if s == "1" then await(dir .. "/two-started"); touch(dir .. "/one-failed"); error("one") end
  if s == "2" then touch(dir .. "/two-started"); await(dir .. "/" .. until_); return "two" end
  return s
end
]]

local FAIL3 = quote("return function(s) if tonumber(s) % 3 == 0 then error('bad ' .. s) end return s end")

describe("lpar --halt", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("keeps its meaning alone: stop at the first failure", function()
    local items = writefile(dir .. "/items", numbers(20))
    local rc, out, err = lpar("-j1 --halt -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n", out)
    assert.matches("stopped at the first failure %(%-%-halt%)\nlpar: 1 of 3 items failed\n$", err)
  end)

  it("now,fail=N stops at the Nth failure, with the results before it", function()
    local items = writefile(dir .. "/items", numbers(200))
    -- one worker runs the records in order
    local rc, out, err = lpar("-j 1 --halt now,fail=2 -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n4\n5\n", out)
    assert.matches("line 3 %(\"3\"%)", err)
    assert.matches("line 6 %(\"6\"%)", err)
    assert.not_matches("line 9", err)
    assert.matches("lpar: stopped at line 6 %(%-%-halt now,fail=2: 2 failed of 6%)", err)
    -- as --halt=VALUE too, and the joblog ends at the stop
    rc, out = lpar("-j 1 --halt=now,fail=3 --joblog " .. dir .. "/log -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n4\n5\n7\n8\n", out)
    assert.same({9, "failed"}, logged(dir .. "/log")[9])
    assert.is_nil(logged(dir .. "/log")[10])
  end)

  it("now,fail=N stops at the Nth failure to end, with two workers", function()
    -- failures count as records end, in any order: the two counted are
    -- reported (and any that ended meanwhile, before the workers were
    -- killed), the results written are in order and none past the last
    -- of them, and the records killed or never started are not written
    local items = writefile(dir .. "/items", numbers(200))
    for _ = 1, 5 do
      local rc, out, err = lpar("-j 2 --halt now,fail=2 -e " .. FAIL3 .. " " .. items)
      assert.equal(1, rc)
      local stop, n, of = err:match("lpar: stopped at line (%d+) %(%-%-halt now,fail=2: (%d+) failed of (%d+)%)")
      assert.is_truthy(stop, err)
      assert.equal("2", n)
      assert.equal(0, tonumber(stop) % 3)
      local told, seen = {}, false
      for line in err:gmatch("lpar: line (%d+) %(") do
        told[#told + 1] = tonumber(line)
        seen = seen or line == stop
      end
      assert.is_true(#told >= 2, err)
      assert.is_true(seen, err)
      local got = lines(out)
      assert.equal(tonumber(of), #got + #told)
      local last = 0
      for _, l in ipairs(got) do
        local x = tonumber(l)
        assert.is_true(x > last and x % 3 ~= 0, out)
        last = x
      end
      local top = 0
      for _, l in ipairs(told) do top = math.max(top, l) end
      assert.is_true(last < top, out .. err)
    end
  end)

  it("now,fail=N% stops when that share of the items done so far failed", function()
    local items = writefile(dir .. "/items", numbers(200))
    local rc, out, err = lpar("-j 1 --halt now,fail=30% -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n", out)
    assert.matches("stopped at line 3 %(%-%-halt now,fail=30%%: 1 failed of 3%)", err)
    -- each line's outcome counts, whatever the batch it ran in: the
    -- share is met at line 3 (1 of 3), not judged at the batch's end
    local first = writefile(dir .. "/first", "3\n1\n2\n4\n5\n7\n8\n")
    rc, out, err = lpar("-j1 --halt now,fail=30% -e " .. FAIL3 .. " " .. first)
    assert.equal(1, rc)
    assert.equal("1\n2\n", out)
    assert.matches("stopped at line 3 %(%-%-halt now,fail=30%%: 1 failed of 3%)", err)
    -- one in three fail: 34% is never reached
    rc, out, err = lpar("-j1 --halt now,fail=34% -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal(134, #lines(out))
    assert.matches("lpar: 66 of 200 items failed", err)
  end)

  it("now,success=N and now,done=N stop at that many", function()
    local items = writefile(dir .. "/items", numbers(200))
    local rc, out, err = lpar("-j1 --halt now,success=1 -e " .. FAIL3 .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("1\n", out)
    assert.matches("stopped at line 1 %(%-%-halt now,success=1: 1 succeeded of 1%)", err)
    rc, out, err = lpar("-j1 --halt now,success=4 -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc) -- line 3 failed on the way
    assert.equal("1\n2\n4\n5\n", out)
    assert.matches("stopped at line 5", err)
    rc, out = lpar("-j1 --halt now,done=7 -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n4\n5\n7\n", out)
  end)

  it("now stops the running items at once", function()
    local items = writefile(dir .. "/items", numbers(1000))
    local script = writefile(dir .. "/race.lua", RACE)
    -- item 2 would run for a minute: it is stopped
    local t0 = H.now()
    local rc, out, err = H.run(("timeout 50 %s -j2 --chunk 1 --halt now,fail=1 %s %s %s never")
                               :format(quote(H.cli), script, items, dir))
    assert.equal(1, rc, err)
    assert.is_true(H.now() - t0 < 40)
    assert.equal("", out)
    assert.matches("stopped at line 1 %(%-%-halt now,fail=1", err)
  end)

  it("soon lets the running items finish, and starts no more", function()
    local items = writefile(dir .. "/items", numbers(1000))
    local script = writefile(dir .. "/race.lua", RACE)
    -- item 2 runs on after item 1 failed: its result is written
    local rc, out, err = H.run(("timeout 50 %s -j2 --chunk 1 --halt soon,fail=1 %s %s %s one-failed")
                               :format(quote(H.cli), script, items, dir))
    assert.equal(1, rc, err)
    local got = lines(out)
    assert.equal("two", got[1])
    assert.is_true(#got < 999, #got .. " results")
    for k = 2, #got do assert.equal(tostring(k + 1), got[k]) end
    assert.matches("stopped at line 1 %(%-%-halt soon,fail=1", err)
  end)

  it("never does not stop; a script named like a file is not taken as a value", function()
    local items = writefile(dir .. "/items", numbers(9))
    local rc, out = lpar("--halt never -e " .. FAIL3 .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n4\n5\n7\n8\n", out)
    local script = writefile(dir .. "/s.lua", "return function(s) return s end")
    rc, out = lpar("--halt " .. script .. " " .. items)
    assert.equal(0, rc)
    assert.equal(numbers(9), out)
  end)

  it("refuses a bad value as a usage error", function()
    for _, v in ipairs({"later,fail=1", "now,fails=1", "now,fail=0", "now,fail=x", "now,fail=101%",
                        "now,fail=0%", "soon,success=-1"}) do
      local rc, _, err = lpar("--halt " .. v .. " -e " .. FAIL3 .. " -", "1\n")
      assert.equal(2, rc, v)
      assert.matches("bad value for '%-%-halt': '" .. v:gsub("%p", "%%%0") .. "'", err)
    end
  end)
end)

-- The number of CPUs, as lpar counts them.
local function cpus()
  local p = io.popen("getconf _NPROCESSORS_ONLN")
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end

describe("lpar -j", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  -- The worker count that -j 'v' gives: n items, each waiting until n
  -- workers are up (a barrier of files), then 4n quick ones; counts the
  -- distinct worker pids (-1 if the barrier was not reached).
  local function workers(v, n)
    local script = writefile(dir .. "/w.lua", ([[
local unistd = require "posix.unistd"
local dir, n = %q, %d
return function(s)
  local pid = unistd.getpid()
  if tonumber(s) <= n then
    io.open(dir .. "/b/" .. pid, "w"):close()
    for _ = 1, 3000 do
      local k = 0
      for _ in io.popen("ls " .. dir .. "/b"):lines() do k = k + 1 end
      if k >= n then return pid end
      os.execute("sleep 0.01")
    end
    return -1
  end
  return pid
end
]]):format(dir, n))
    os.execute("mkdir " .. dir .. "/b")
    local items = writefile(dir .. "/items", numbers(5 * n))
    local rc, out, err = lpar("--chunk 1 -j " .. quote(v) .. " " .. script .. " " .. items)
    assert.equal(0, rc, err)
    local seen, count = {}, 0
    for _, l in ipairs(lines(out)) do
      if l == "-1" then return -1 end
      if not seen[l] then count = count + 1 end
      seen[l] = true
    end
    os.execute("rm -rf " .. dir .. "/b")
    return count
  end

  it("takes N%, +N and -N of the CPUs (at least 1)", function()
    local n = cpus()
    assert.equal(math.max(1, n * 50 // 100), workers("50%", math.max(1, n * 50 // 100)))
    assert.equal(n + 1, workers("+1", n + 1))
    assert.equal(math.max(1, n - 1), workers("-1", math.max(1, n - 1)))
    assert.equal(1, workers("-" .. n + 5, 1))
    assert.equal(2 * n, workers("200%", 2 * n))
    assert.equal(3, workers("3", 3))
  end)

  it("refuses a bad value as a usage error", function()
    for _, v in ipairs({"0", "0%", "x", "1.5", "+", "%", "5%%"}) do
      local rc, _, err = lpar("-j " .. quote(v) .. " -e " .. ECHO .. " -", "1\n")
      assert.equal(2, rc, v)
      assert.matches("bad value for '%-j': '" .. v:gsub("%p", "%%%0") .. "'", err)
    end
  end)

  it("runs short options together: -0j2, -0e CODE", function()
    local rc, out, err = lpar("-0j2 -e " .. ECHO .. " -", "a\0b\nc\0")
    assert.equal(0, rc, err)
    assert.equal("ra\nrb\nc\n", out)
    rc, out = lpar("-0e " .. ECHO .. " -", "x\0")
    assert.equal(0, rc)
    assert.equal("rx\n", out)
    rc = lpar("-0o " .. dir .. "/out -e " .. ECHO .. " -", "y\0")
    assert.equal(0, rc)
    assert.equal("ry\n", H.slurp(dir .. "/out"))
    local err2
    rc, out, err2 = lpar("-0x -e " .. ECHO .. " -", "x\0")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("unknown option '%-x' %(in '%-0x'%)", err2)
  end)
end)

describe("lpar items from elsewhere", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("-a FILE, repeated, reads the files in turn; what follows the script is its arguments", function()
    local a = writefile(dir .. "/a", "1\n2\n3") -- no newline at its end
    local b = writefile(dir .. "/b", "4\n5\n")
    local script = writefile(dir .. "/s.lua",
      "local suffix = ... return function(s) if s == '4' then error('four') end return s .. suffix end")
    local rc, out, err = lpar(("-a %s -a %s -a %s --joblog %s/log %s '!'"):format(a, b, a, dir, script))
    assert.equal(1, rc)
    assert.equal("1!\n2!\n3!\n5!\n1!\n2!\n3!\n", out)
    assert.matches("lpar: line 4 %(\"4\"%): .*four", err)
    assert.matches("1 of 8 items failed", err)
    assert.same({4, "failed"}, logged(dir .. "/log")[4])
    assert.equal(8, #logged(dir .. "/log"))
    -- one -a is the items file
    rc, out = lpar(("--arg-file=%s %s '?'"):format(b, script))
    assert.equal(1, rc)
    assert.equal("5?\n", out)
    -- - is stdin, among files
    rc, out = lpar(("-a %s -a - %s ''"):format(b, script), "6\n")
    assert.equal(1, rc)
    assert.equal("5\n6\n", out)
    -- a missing file is named before anything runs
    local err2
    rc, out, err2 = lpar(("-a %s -a %s/none %s ''"):format(b, dir, script))
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("cannot open .*/none: No such file", err2)
  end)

  it("-a with --resume and --shard: the joblog knows the files", function()
    local a = writefile(dir .. "/a", numbers(10))
    local b = writefile(dir .. "/b", numbers(5))
    local cmd = ("--shard 2/2 -a %s -a %s --joblog %s/log -o %s/out -e %s"):format(a, b, dir, dir, ECHO)
    local rc, _, err = lpar(cmd)
    assert.equal(0, rc, err)
    assert.equal("r2\nr4\nr6\nr8\nr10\nr2\nr4\n", H.slurp(dir .. "/out"))
    assert.same({14, "ok"}, logged(dir .. "/log")[7])
    rc, _, err = lpar("--resume " .. cmd)
    assert.equal(0, rc, err)
    assert.equal("r2\nr4\nr6\nr8\nr10\nr2\nr4\n", H.slurp(dir .. "/out"))
    writefile(b, "changed\n")
    rc, _, err = lpar("--resume " .. cmd)
    assert.equal(2, rc)
    assert.matches("cannot resume from .*: the items files differ", err)
  end)

  it("::: a b c gives the items on the command line, each one whole", function()
    local script = writefile(dir .. "/s.lua",
      "local n = select('#', ...) return function(s) return ('[%s] %d'):format(s, n) end")
    local rc, out, err = lpar(script .. " x y ::: a 'b c' '' 'd\ne'")
    assert.equal(0, rc, err)
    assert.equal("[a] 2\n[b c] 2\n[] 2\n[d\ne] 2\n", out)
    rc, out, err = lpar("-e " .. ECHO .. " ::: 1 2 3")
    assert.equal(0, rc, err)
    assert.equal("r1\nr2\nr3\n", out)
    rc, out = lpar("-e " .. ECHO .. " :::")
    assert.equal(0, rc)
    assert.equal("", out)
    rc, out, err = lpar("--shard 2/2 -e " .. ECHO .. " ::: 1 2 3 4")
    assert.equal(0, rc, err)
    assert.equal("r2\nr4\n", out)
    local _
    rc, _, err = lpar("-e " .. quote("return function(s) error('no') end") .. " ::: p q")
    assert.equal(1, rc)
    assert.matches('lpar: item 2 %("q"%)', err)
  end)

  it("::: refuses -a, a second :::, or no script", function()
    local a = writefile(dir .. "/a", "1\n")
    local rc, _, err = lpar("-a " .. a .. " -e " .. ECHO .. " ::: x")
    assert.equal(2, rc)
    assert.matches("both %-a and ':::' give items", err)
    rc, _, err = lpar("-e " .. ECHO .. " ::: x ::: y")
    assert.equal(2, rc)
    assert.matches("only one ':::'", err)
    rc, _, err = lpar("::: x")
    assert.equal(2, rc)
    assert.matches("no script given before ':::'", err)
  end)

  it("--colsep splits each line into f's arguments, by a Lua pattern", function()
    local items = writefile(dir .. "/items", "a,b,c\nx,,z\nsolo\n,\n")
    local script = quote("return function(...) return select('#', ...) .. ':' .. table.concat({...}, '|') end")
    local rc, out, err = lpar("--colsep , -e " .. script .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("3:a|b|c\n3:x||z\n1:solo\n2:|\n", out)
    rc, out, err = lpar("--colsep '%s+' -e " .. script .. " -", "a  b\tc\n")
    assert.equal(0, rc, err)
    assert.equal("3:a|b|c\n", out)
    rc, out, err = lpar("--colsep '\\t' -e " .. script .. " -", "a b\tc\n")
    assert.equal(0, rc, err)
    assert.equal("2:a b|c\n", out)
    rc, out, err = lpar("--colsep . -e " .. script .. " -", "ab\n")
    assert.equal(0, rc, err)
    assert.equal("3:||\n", out) -- a pattern: '.' is any byte ('%.' is a dot)
  end)

  it("--colsep refuses a bad pattern or one that matches nothing", function()
    for _, v in ipairs({"%", "[a", "%s*", ""}) do
      local rc, _, err = lpar("--colsep " .. quote(v) .. " -e " .. ECHO .. " -", "a\n")
      assert.equal(2, rc, v)
      assert.matches("bad value for '%-%-colsep'", err)
    end
  end)

  it("--colsep refuses a pattern that can match an empty string anywhere", function()
    for _, v in ipairs({"%f[%w]", "()", "x*", "^", "$", ",-", "^x?", "(,*)", "(x*)%1", "%f[,],?",
                        "[^,]*"}) do
      local rc, out, err = lpar("--colsep " .. quote(v) .. " -e " .. ECHO .. " -", "a,b\n")
      assert.equal(2, rc, v)
      assert.equal("", out)
      assert.equal("lpar: bad value for '--colsep': '" .. v .. "' (it can match an empty string)",
                   err:match("^[^\n]*"))
    end
  end)

  it("--colsep refuses a malformed pattern even where matching would not reach it", function()
    for _, v in ipairs({"a[", ",(", ",)", ",%2", ",%fx", ",%b("}) do
      local rc, out, err = lpar("--colsep " .. quote(v) .. " -e " .. ECHO .. " -", "a,b\n")
      assert.equal(2, rc, v)
      assert.equal("", out)
      assert.matches("^lpar: bad value for '%-%-colsep': '.*' %(not a Lua pattern: ", err)
    end
  end)

  it("--colsep takes patterns that always take a byte, anchored or not", function()
    for v, want in pairs({[",$"] = "1:a,b\n", ["^a"] = "2:|,b\n", ["(,)"] = "2:a|b\n",
                          ["%b()"] = "1:a,b\n", ["(,)%1"] = "1:a,b\n", [",+"] = "2:a|b\n"}) do
      local script = quote("return function(...) return select('#', ...) .. ':' .. " ..
                           "table.concat({...}, '|') end")
      local rc, out, err = lpar("--colsep " .. quote(v) .. " -e " .. script .. " -", "a,b\n")
      assert.equal(0, rc, err)
      assert.equal(want, out, v)
    end
  end)

  it("--tag starts each result line with its item and a tab", function()
    local items = writefile(dir .. "/items", "a\nskip\nb\n")
    local rc, out, err = lpar("--tag -e " ..
      quote("return function(s) if s ~= 'skip' then return s:upper(), #s end end") .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("a\tA\t1\nb\tB\t1\n", out)
    rc, out, err = lpar("--tag --colsep , -e " .. quote("return function(x, y) return y .. x end") ..
                        " ::: 1,2 3,4")
    assert.equal(0, rc, err)
    assert.equal("1,2\t21\n3,4\t43\n", out)
  end)
end)

describe("lpar -e", function()
  it("takes a function expression as well as a chunk that returns one", function()
    local rc, out, err = lpar("-e 'function(s) return s:upper() end' -", "ab\ncd\n")
    assert.equal(0, rc, err)
    assert.equal("AB\nCD\n", out)
    rc, out, err = lpar("-e '\n  function (s, ...) return s .. select(\"#\", ...) end' -", "x\n")
    assert.equal(0, rc, err)
    assert.equal("x0\n", out)
    rc, out, err = lpar("-e 'return function(s) return #s end' -", "abc\n")
    assert.equal(0, rc, err)
    assert.equal("3\n", out)
  end)

  it("runs several -e in order, as lua5.4 does; the last one gives the function", function()
    local rc, out, err = lpar("-e 'n = 1' -e 'n = n * 10' -e 'function(s) return s .. n end' -", "a\n")
    assert.equal(0, rc, err)
    assert.equal("a10\n", out)
    -- a program: the last returns nothing
    rc, out, err = lpar("-e 'x = 2' -e 'print(x * 21)'")
    assert.equal(0, rc, err)
    assert.equal("42\n", out)
  end)

  it("names the -e that does not compile, and runs none", function()
    local rc, out, err = lpar("-e 'print(1)' -e 'function(s) return s +' -", "a\n")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("lpar: %(command line%):1: .*near '?<eof>", err)
    rc, out, err = lpar("-e 'function x' -", "a\n")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("%(command line%):1:", err)
  end)
end)
