-- The lpar command, run as a user runs it: the built binary, fixtures in
-- spec/fixtures/cli/, exit status, stdout and stderr.
local H = require "spec.helper"
local unistd = require "posix.unistd"
local poll = require "posix.poll"
local signal = require "posix.signal"
local cjson = require "cjson"

local FIX = "spec/fixtures/cli/"

local quote = H.quote
local lpar = H.lpar
local writefile = H.writefile
local readfile = H.readfile
local lines = H.lines
local pidsof = H.pidsof
local anyalive = H.anyalive
local spawn = H.spawncli
local readuntil = H.readuntil
local waitexit = H.waitexit
local closeall = H.closeall

local tmpname = H.tmpfiles(after_each)

describe("lpar output", function()
  it("prints each kind of result as documented", function()
    if not H.cliintegers() then return pending("5.3+: integers apart from floats") end
    local items = table.concat({
      "str:hello", "int:42", "float:0.5", "float:3", "true", "false", "multi",
      "table", "array", "nil", "none", "nils", "hole", "str:", "int:-7",
    }, "\n") .. "\n"
    local code, out, err = lpar(FIX .. "kinds.lua", items)
    assert.equal("", err)
    assert.equal(0, code)
    local l = lines(out)
    assert.equal(12, #l)
    assert.equal("hello", l[1])
    assert.equal("42", l[2])
    assert.equal("0.5", l[3])
    assert.equal("3.0", l[4])
    assert.equal("true", l[5])
    assert.equal("false", l[6])
    assert.equal("1\ttwo\t3.5\tfalse", l[7])
    assert.same({name = "x", list = {1, 2, 3}}, cjson.decode(l[8]))
    assert.equal('["a","b"]', l[9])
    assert.equal("\tb", l[10])
    assert.equal("", l[11])
    assert.equal("-7", l[12])
  end)

  it("reports a result it cannot print as a failed item", function()
    local code, out, err = lpar(FIX .. "kinds.lua", "str:a\nfunc\nstr:b\n")
    assert.equal(1, code)
    assert.equal("a\nb\n", out)
    assert.matches('lpar: line 2 %("func"%): cannot print a function result', err)
  end)

  it("keeps input order when items take uneven times", function()
    local items = "300\n0\n120\n0\n0\n60\n10\n0\n200\n0\n"
    local code, out = lpar("-j4 " .. FIX .. "sleepy.lua", items)
    assert.equal(0, code)
    assert.equal(items, out)
  end)

  it("writes in completion order with --unordered", function()
    local code, out = lpar("-j4 --chunk 1 --unordered " .. FIX .. "sleepy.lua",
                           "400\n1\n2\n3\n")
    assert.equal(0, code)
    local l = lines(out)
    table.sort(l, function(a, b) return tonumber(a) < tonumber(b) end)
    assert.same({"1", "2", "3", "400"}, l)
    assert.equal("400", lines(out)[4])
  end)

  it("keeps input order over many quick items", function()
    local t = {}
    for i = 1, 20000 do t[i] = tostring(i) end
    local input = table.concat(t, "\n") .. "\n"
    local code, out = lpar("-e 'return function(s) return s end'", input)
    assert.equal(0, code)
    assert.equal(input, out)
  end)

  it("spreads items that turn slow over the workers", function()
    local input = ("q\n"):rep(5000) .. ("s\n"):rep(24)
    local code, out = lpar("-j4 " .. FIX .. "turns.lua", input)
    assert.equal(0, code)
    local pids, n = {}, 0
    for pid in out:gmatch("%d+") do
      if not pids[pid] then n = n + 1 end
      pids[pid] = true
    end
    assert.equal(24, #lines(out))
    assert.is_true(n >= 3, n .. " workers ran the slow items")
  end)

  it("sends what f prints to stderr, not among the results", function()
    local code, out, err = lpar(FIX .. "noisy.lua", "a\nb\n")
    assert.equal(0, code)
    assert.equal("a\nb\n", out)
    assert.matches("noise a", err)
    assert.matches("more noise", err)
  end)

  it("shows progress on stderr only", function()
    local path = writefile(tmpname(), ("x\n"):rep(100))
    local code, out, err = lpar("--progress " .. FIX .. "upper.lua " .. path)
    assert.equal(0, code)
    assert.equal(("X\n"):rep(100), out)
    assert.matches("100/100 100%%", err)
  end)
end)

describe("lpar input", function()
  it("treats each line as an item, newline and a CR before it stripped", function()
    local code, out = lpar(FIX .. "echo.lua", "a\r\nb\rc\r\n\r\nd\n")
    assert.equal(0, code)
    assert.equal("1:a\n3:b\rc\n0:\n1:d\n", out)
  end)

  it("takes empty lines as items", function()
    local code, out = lpar(FIX .. "echo.lua", "\n\nx\n\n")
    assert.equal(0, code)
    assert.equal("0:\n0:\n1:x\n0:\n", out)
  end)

  it("takes a last line without newline as an item", function()
    local code, out = lpar(FIX .. "echo.lua", "a\nbc")
    assert.equal(0, code)
    assert.equal("1:a\n2:bc\n", out)
  end)

  it("prints nothing for an empty input and starts no worker", function()
    local log = tmpname()
    os.remove(log)
    local code, out, err = lpar(FIX .. "hooks.lua - " .. log, "")
    assert.equal(0, code)
    assert.equal("", out)
    assert.equal("", err)
    assert.is_nil(readfile(log))
  end)

  it("splits on NUL with -0, newlines and CRs kept", function()
    local code, out = lpar("-0 " .. FIX .. "echo.lua", "a\nb\0c\r\0\0last")
    assert.equal(0, code)
    assert.equal("3:a\nb\n2:c\r\n0:\n4:last\n", out)
  end)

  it("passes bytes through untouched: invalid UTF-8, a 1 MB line", function()
    local long = ("\xff\xfe\0\1abc"):rep(150000)
    local code, out = lpar(FIX .. "echo.lua", "\xc3\x28\n" .. long .. "\nz\n")
    assert.equal(0, code)
    assert.equal("2:\xc3\x28\n" .. #long .. ":" .. long .. "\n1:z\n", out)
  end)

  it("reads a file given after the script, and '-' as stdin", function()
    local path = writefile(tmpname(), "x\ny\n")
    local code, out = lpar(FIX .. "upper.lua " .. path, "ignored\n")
    assert.equal(0, code)
    assert.equal("X\nY\n", out)
    code, out = lpar(FIX .. "upper.lua -", "s\n")
    assert.equal(0, code)
    assert.equal("S\n", out)
  end)

  it("streams: results appear while the input is still open", function()
    local p = spawn({FIX .. "upper.lua"})
    unistd.write(p.stdin, "a\nb\n")
    local out, ok = readuntil(p.stdout, function(s) return s == "A\nB\n" end, 10)
    assert.is_true(ok, "got only " .. ("%q"):format(out))
    unistd.write(p.stdin, "c\n")
    out, ok = readuntil(p.stdout, function(s) return s == "C\n" end, 10)
    assert.is_true(ok, "got only " .. ("%q"):format(out))
    unistd.close(p.stdin)
    p.stdin = nil
    local how, code = waitexit(p.pid, 10)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(0, code)
  end)

  it("keeps its workers while the input trickles: init runs once per worker", function()
    -- four quiet gaps, each waited out until the results before it came
    local log = tmpname()
    local script = tmpname()
    writefile(script, ([[
      local unistd = require "posix.unistd"
      return {
        init = function()
          local f = assert(io.open(%q, "a"))
          f:write(unistd.getpid(), "\n")
          f:close()
        end,
        map = function(s) return s .. " " .. unistd.getpid() end,
      }]]):format(log))
    local p = spawn({"-j2", script})
    local pids = {}
    for k = 1, 5 do
      unistd.write(p.stdin, "x" .. k .. "\n")
      local out, ok = readuntil(p.stdout, function(s) return s:find("\n$") ~= nil end, 20)
      assert.is_true(ok, "got only " .. ("%q"):format(out))
      local item, pid = out:match("^(x%d+) (%d+)\n$")
      assert.equal("x" .. k, item)
      pids[tonumber(pid)] = true
    end
    unistd.close(p.stdin)
    p.stdin = nil
    local how, code = waitexit(p.pid, 20)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(0, code)
    local inits = pidsof(log)
    local seen = {}
    for _, pid in ipairs(inits) do
      assert.is_nil(seen[pid], "init ran twice in worker " .. pid)
      seen[pid] = true
    end
    assert.is_true(#inits <= 2, #inits .. " inits for -j2")
    for pid in pairs(pids) do assert.is_true(seen[pid], "worker " .. pid .. " ran no init") end
  end)

  it("streams a long input with bounded memory", function()
    -- 2 million lines through a pipe: peak RSS stays small. A sanitizer
    -- build keeps freed memory in quarantine (no bound there), and its
    -- allocator is not safe to fork from the threaded CLI now and then:
    -- it streams fewer lines, forking less.
    local asan = os.getenv("ASAN_OPTIONS") ~= nil
    local n = asan and 200000 or 2000000
    local code, out, err = H.run("seq " .. n .. " | /usr/bin/time -f 'rss=%M' " ..
                                 quote(H.cli) .. " " .. FIX .. "upper.lua | tail -1")
    assert.equal(0, code)
    assert.equal(n .. "\n", out)
    local rss = tonumber(err:match("rss=(%d+)"))
    local limit = asan and math.huge or 64 * 1024
    assert.is_true(rss < limit, "peak RSS " .. tostring(rss) .. " KB")
  end)
end)

describe("lpar scripts", function()
  it("takes the script from -e", function()
    local code, out = lpar("-e 'return function(s) return s:upper() end'", "ab\n")
    assert.equal(0, code)
    assert.equal("AB\n", out)
  end)

  it("runs init once per worker before its items, and close after", function()
    local log = tmpname()
    os.remove(log)
    local items = {}
    for i = 1, 40 do items[i] = tostring(i) end
    local code, out = lpar("-j4 --chunk 1 " .. FIX .. "hooks.lua - " .. log,
                           table.concat(items, "\n") .. "\n")
    assert.equal(0, code)
    assert.equal(table.concat(items, "\n") .. "\n", out)
    local state, seen = {}, 0
    for l in readfile(log):gmatch("[^\n]+") do
      local what, pid, rest = l:match("^(%a+) (%d+) ?(.*)$")
      if what == "init" then
        assert.is_nil(state[pid], "init twice in " .. pid)
        state[pid] = "ready"
      elseif what == "item" then
        assert.equal("ready", state[pid])
        assert.matches(" true$", rest)
        seen = seen + 1
      else
        assert.equal("ready", state[pid])
        state[pid] = "closed"
      end
    end
    assert.equal(40, seen)
    for pid, s in pairs(state) do assert.equal("closed", s, pid) end
  end)

  it("runs a script that returns nothing, with parallel and arg", function()
    local code, out = lpar(FIX .. "job.lua x y", "")
    assert.equal(0, code)
    assert.equal("1 4 9\ttrue\n" .. FIX .. "job.lua\t2\tx\ty\nx\ty\ttrue\n", out)
  end)

  it("gives a map script the arguments after the items file", function()
    local code, out = lpar("-e 'return function(s) return s .. arg[2] end' - !", "a\n")
    assert.equal(0, code)
    assert.equal("a!\n", out)
  end)
end)

describe("lpar failures", function()
  it("reports a failed item with line, item, error and traceback", function()
    local code, out, err = lpar(FIX .. "fail.lua", "ok1\nbad one\nok2\n")
    assert.equal(1, code)
    assert.equal("ok1\nok2\n", out)
    assert.matches('lpar: line 2 %("bad one"%): ' .. FIX:gsub("%p", "%%%0") ..
                   'fail.lua:3: cannot take  one\n', err)
    assert.matches("stack traceback:\n", err)
    assert.matches("fail.lua:3: in ", err)
    assert.matches("lpar: 1 of 3 items failed", err)
    assert.not_matches("lpar.cli", err)
  end)

  it("shortens a long item and escapes control bytes in the report", function()
    local code, _, err = lpar(FIX .. "fail.lua", "bad\t" .. ("x"):rep(100) .. "\n")
    assert.equal(1, code)
    local shown = err:match("^lpar: line 1 (%b()): ")
    assert.equal('("bad\\t' .. ("x"):rep(36) .. '"...)', shown)
  end)

  it("stops at the first failure with --halt", function()
    local items = "a\nb\nbad1\nc\nbad2\nd\n"
    local code, out, err = lpar("-j1 --halt " .. FIX .. "fail.lua", items)
    assert.equal(1, code)
    assert.equal("a\nb\n", out)
    assert.matches("line 3", err)
    assert.not_matches("line 5", err)
    assert.matches("stopped at the first failure", err)
  end)

  it("names the item whose worker died, and finishes the others", function()
    local t = {}
    for i = 1, 3000 do t[i] = tostring(i) end
    t[1500] = "exit"
    local code, out, err = lpar(FIX .. "crash.lua", table.concat(t, "\n") .. "\n")
    assert.equal(1, code)
    table.remove(t, 1500)
    assert.equal(table.concat(t, "\n") .. "\n", out)
    assert.matches('lpar: line 1500 %("exit"%): worker %d+ exited with status 3', err)
    assert.matches("1 of 3000 items failed", err)
  end)

  it("stops an item that runs past --timeout and goes on", function()
    local code, out, err = lpar("--timeout 0.25 " .. FIX .. "sleepy.lua",
                                "0\n5000\n1\n")
    assert.equal(1, code)
    assert.equal("0\n1\n", out)
    assert.matches('lpar: line 2 %("5000"%): timed out after 0.25 s', err)
  end)

  it("fails an item that needs more than --max-memory and goes on", function()
    local code, out, err = lpar("--max-memory 64M " .. FIX .. "quoted.lua", "a\nhog\nb\n")
    assert.equal(1, code)
    assert.equal("a\nb\n", out)
    assert.matches('lpar: line 2 %("hog"%): not enough memory %(limit 64M%)', err)
  end)

  it("fails with status 2 when init fails in a worker", function()
    local code, out, err = lpar(FIX .. "badinit.lua", "a\n")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("lpar: worker init failed: .*no database", err)
  end)
end)

describe("lpar retries, joblog and resume", function()
  it("tries a failed item again with --retries", function()
    local dir = tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. dir))
    local log = tmpname()
    local code, out, err = lpar(("--retries 2 --joblog %s %sflaky.lua - %s")
                                :format(log, FIX, dir), "a\nflaky1\nb\nflaky2\n")
    os.execute("rm -rf " .. dir)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("a\nflaky1\nb\nflaky2\n", out)
    local attempts = {}
    for line, status, n in readfile(log):gmatch("(%d+)\t(%a+)\t[%d.]+\t(%d+)\t") do
      assert.equal("ok", status)
      attempts[tonumber(line)] = tonumber(n)
    end
    assert.same({1, 2, 1, 2}, attempts)
  end)

  it("reports an item that fails every try", function()
    local log = tmpname()
    local code, out, err = lpar("--retries 1 --joblog " .. log .. " " .. FIX .. "fail.lua",
                                "a\nbad\n")
    assert.equal(1, code)
    assert.equal("a\n", out)
    assert.matches('line 2 %("bad"%)', err)
    assert.matches("\n2\tfailed\t[%d.]+\t2\t%d+%.%d%d%d\t:\t[^\t\n]*cannot take \n", readfile(log))
  end)

  it("writes a joblog line per item, in order, and -o writes a file", function()
    local log, res = tmpname(), tmpname()
    local code, out = lpar(("--joblog %s -o %s %sfail.lua"):format(log, res, FIX),
                           "a\nbad\nc\n")
    assert.equal(1, code)
    assert.equal("", out)
    assert.equal("a\nc\n", readfile(res))
    local text = readfile(log)
    assert.matches("^# lpar joblog 3\n.*\n# line\tstatus\tseconds\tattempts\tstart\thost\terror\n", text)
    local seen = {}
    for line, status in text:gmatch("\n(%d+)\t(%a+)\t") do
      seen[#seen + 1] = line .. " " .. status
    end
    assert.same({"1 ok", "2 failed", "3 ok"}, seen)
    assert.matches("\n# out 4 3 %x+\n$", text)
  end)

  it("resumes a run killed with SIGKILL at any moment, losing and repeating nothing", function()
    local items, log, res = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    local t = {}
    for i = 1, 3000 do t[i] = tostring(i) end
    local want = table.concat(t, "\n") .. "\n"
    writefile(items, want)
    local args = {"--resume", "--joblog", log, "-o", res, FIX .. "slowecho.lua", items}
    math.randomseed(7)
    local killed = 0
    for _ = 1, 6 do
      local p = spawn(args)
      unistd.close(p.stdin)
      p.stdin = nil
      H.sleep(0.02 + math.random() * 0.15)
      if signal.kill(p.pid, signal.SIGKILL) == 0 then killed = killed + 1 end
      assert.is_not_nil(waitexit(p.pid, 10))
      closeall(p)
    end
    assert.is_true(killed >= 1)
    local code, out, err = lpar(table.concat(args, " "))
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("", out)
    assert.equal(want, readfile(res))
    local count = {}
    for line in readfile(log):gmatch("\n(%d+)\tok\t") do
      count[line] = (count[line] or 0) + 1
    end
    for i = 1, 3000 do assert.equal(1, count[tostring(i)], "line " .. i) end
  end)
end)

describe("lpar usage errors", function()
  local function usage(args, pattern)
    local code, out, err = lpar(args, "x\n")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches(pattern, err)
    return err
  end

  it("rejects an unknown option", function()
    local err = usage("--bogus " .. FIX .. "upper.lua", "lpar: unknown option '%-%-bogus'")
    assert.matches("usage: lpar", err)
    usage("-x " .. FIX .. "upper.lua", "unknown option '%-x'")
  end)

  it("rejects an option without its value", function()
    usage("-j", "option '%-j' needs a value")
    usage("-e", "option '%-e' needs a value")
    usage("--chunk", "option '%-%-chunk' needs a value")
  end)

  it("rejects bad option values", function()
    usage("-j 0 " .. FIX .. "upper.lua", "bad value for '%-j': '0'")
    usage("--jobs=x " .. FIX .. "upper.lua", "bad value for '%-%-jobs': 'x'")
    usage("--chunk 1.5 " .. FIX .. "upper.lua", "bad value for '%-%-chunk'")
    usage("--timeout 0 " .. FIX .. "upper.lua", "bad value for '%-%-timeout'")
    usage("--timeout soon " .. FIX .. "upper.lua", "bad value for '%-%-timeout'")
    usage("--halt=yes " .. FIX .. "upper.lua", "bad value for '%-%-halt': 'yes'")
  end)

  it("rejects --resume without --joblog and -o, or with --unordered", function()
    usage("--resume -o x " .. FIX .. "upper.lua", "%-%-resume needs %-%-joblog FILE and %-o FILE")
    usage("--resume --joblog x --unordered -o y " .. FIX .. "upper.lua",
          "%-%-resume needs ordered output")
    usage("--retries -1 " .. FIX .. "upper.lua", "bad value for '%-%-retries'")
    usage("--max-memory 10K " .. FIX .. "upper.lua", "bad value for '%-%-max%-memory'")
    usage("--max-memory lots " .. FIX .. "upper.lua", "bad value for '%-%-max%-memory'")
  end)

  it("reads --max-memory as the module reads max_memory, naming a bad value", function()
    usage("--max-memory '2 ' " .. FIX .. "upper.lua",
          "bad value for '%-%-max%-memory': '2 ' is not a size %(expected bytes or like '512M', " ..
          "from 1 MiB to 1 PiB%)")
    usage("--max-memory 2x " .. FIX .. "upper.lua", "bad value for '%-%-max%-memory': '2x' is not a size")
    usage("--max-memory 10k " .. FIX .. "upper.lua", "bad value for '%-%-max%-memory': '10k' is below 1 MiB")
    for _, v in ipairs{"512m", "0.5g", "64MiB", "64mb"} do
      local code, out, err = lpar("--max-memory " .. v .. " " .. FIX .. "upper.lua", "a\n")
      assert.equal("", err)
      assert.equal(0, code)
      assert.equal("A\n", out)
    end
  end)

  it("needs a script", function()
    usage("", "lpar: no script given")
    usage("-j 2", "lpar: no script given")
  end)

  it("reports a missing script file", function()
    usage(FIX .. "nosuch.lua", "lpar: cannot open " .. FIX:gsub("%p", "%%%0") .. "nosuch.lua")
  end)

  it("reports a missing or unreadable items file", function()
    usage(FIX .. "upper.lua /nonexistent/items", "lpar: cannot open /nonexistent/items: No such file")
    usage(FIX .. "upper.lua " .. FIX, "lpar: cannot read .*: Is a directory")
  end)

  it("reports a syntax error as script.lua:line before starting workers", function()
    local script = tmpname()
    writefile(script, "-- a syntax error on line 3\nreturn function(s)\n  return s +\nend\n")
    local err = usage(script, "^lpar: " .. script:gsub("%p", "%%%0") .. ":4: ")
    assert.equal(1, select(2, err:gsub("\n", "")))
    usage("-e 'return function('", "^lpar: %(command line%):1: ")
  end)

  it("refuses a precompiled script (scripts load as text, on every Lua)", function()
    local script = tmpname()
    writefile(script, string.dump(load("return function(s) return s end")))
    usage(script .. " ::: a", "^lpar: " .. script:gsub("%p", "%%%0") ..
          " is precompiled Lua %(bytecode%): lpar loads scripts as text\n$")
  end)

  it("reports an error raised while the script loads", function()
    usage(FIX .. "loaderr.lua", "^lpar: " .. FIX:gsub("%p", "%%%0") ..
          "loaderr.lua:2: attempt to index .*nil value")
  end)

  it("rejects a script that returns something else than a function", function()
    usage(FIX .. "badret.lua", "must return a function, a table with a 'map' function, or nothing")
  end)

  it("prints help and version on stdout with status 0", function()
    local code, out = lpar("--help")
    assert.equal(0, code)
    assert.matches("^usage: lpar %[options%] script.lua", out)
    assert.matches("exit status", out)
    code, out = lpar("-h")
    assert.equal(0, code)
    assert.matches("^usage:", out)
    code, out = lpar("--version")
    assert.equal(0, code)
    -- the version and the Lua the command runs
    assert.matches("^lpar %d+%.%d+%.%d+ %(Lua[JIT]* %d%.%d%)\n$", out)
  end)
end)

describe("lpar and its output pipe", function()
  local big
  setup(function()
    big = os.tmpname()
    local t = {}
    for i = 1, 300000 do t[i] = "line " .. i end
    writefile(big, table.concat(t, "\n") .. "\n")
  end)
  teardown(function() os.remove(big) end)

  it("exits quietly when the reader goes away (| head -1), workers reaped", function()
    local log = tmpname()
    os.remove(log)
    local cmd = ("bash -c 'timeout 30 %s %s %s %s | head -1; echo rc=${PIPESTATUS[0]} >&2'")
      :format(H.cli, FIX .. "pids.lua", big, log)
    local code, out, err = H.run(cmd)
    assert.equal(0, code)
    assert.equal("line 1\n", out)
    assert.equal("rc=141\n", err)
    local pids = pidsof(log)
    assert.is_true(#pids >= 1)
    assert.is_nil(anyalive(pids))
  end)
end)

describe("lpar and signals", function()
  local function signalled(sig, want, text)
    local log = tmpname()
    os.remove(log)
    local p = spawn({"-j2", "--chunk", "1", FIX .. "sleepy.lua", "-", log})
    unistd.write(p.stdin, "0\n1\n20000\n20000\n")
    local out, ok = readuntil(p.stdout, function(s) return s == "0\n1\n" end, 10)
    assert.is_true(ok, "got only " .. ("%q"):format(out))
    signal.kill(p.pid, sig)
    local how, code = waitexit(p.pid, 5)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(want, code)
    assert.equal("lpar: " .. text .. "\n", err)
    local pids = pidsof(log)
    assert.is_true(#pids >= 1)
    assert.is_nil(anyalive(pids))
  end

  it("exits 143 on SIGTERM, workers stopped and reaped", function()
    signalled(signal.SIGTERM, 143, "terminated")
  end)

  it("exits 130 on SIGINT, workers stopped and reaped", function()
    signalled(signal.SIGINT, 130, "interrupted")
  end)

  it("exits 130 on SIGINT in a script that runs parallel itself", function()
    local p = spawn({FIX .. "jobslow.lua"})
    local _, ok = readuntil(p.stdout, function(s) return s == "started\n" end, 10)
    assert.is_true(ok)
    H.sleep(0.2)
    signal.kill(p.pid, signal.SIGINT)
    local how, code = waitexit(p.pid, 5)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(130, code)
    assert.equal("lpar: interrupted\n", err)
  end)

  it("exits 130 on SIGINT while waiting for input", function()
    local p = spawn({FIX .. "upper.lua"})
    unistd.write(p.stdin, "a\n")
    local _, ok = readuntil(p.stdout, function(s) return s == "A\n" end, 10)
    assert.is_true(ok)
    signal.kill(p.pid, signal.SIGINT)
    local how, code = waitexit(p.pid, 5)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(130, code)
  end)
end)

-- Engine behaviour the CLI relies on.
describe("lpar.imap over an iterator (engine)", function()
  it("spreads slow items over the workers", function()
    local engine = require "lpar"
    local time = require "posix.time"
    local i, per = 0, {}
    local function f()
      time.nanosleep({tv_sec = 0, tv_nsec = 20000000})
      return unistd.getpid()
    end
    local function items()
      i = i + 1
      if i <= 32 then return i end
    end
    for _, pid in engine.imap(f, items, {n_workers = 4}) do
      per[pid] = (per[pid] or 0) + 1
    end
    for _, n in pairs(per) do assert.is_true(n <= 16) end
  end)

  it("emits results while the iterator waits for input (lpar.pending)", function()
    -- The iterator never blocks: with no line at hand it returns
    -- lpar.pending and the pipe's fd. The second line is written only once
    -- the first result came out, and the end only after the second: an
    -- engine that waited for the iterator would never see them.
    local engine = require "lpar"
    local r, w = unistd.pipe()
    unistd.write(w, "1\n")
    local buf, asked = "", 0
    local function items()
      asked = asked + 1
      while true do
        local line, rest = buf:match("^([^\n]*)\n(.*)$")
        if line then -- "end" ends the items: the workers hold the pipe too
          buf = rest
          return tonumber(line)
        end
        if poll.rpoll(r, 0) ~= 1 then return engine.pending, r end
        local s = unistd.read(r, 4096)
        if not s or s == "" then return nil end
        buf = buf .. s
      end
    end
    local got = {}
    for _, v in engine.imap(function(x) return x * 10 end, items, {n_workers = 2}) do
      got[#got + 1] = v
      if v == 10 then unistd.write(w, "2\n") end
      if v == 20 then unistd.write(w, "end\n") end
    end
    unistd.close(w)
    unistd.close(r)
    assert.same({10, 20}, got)
    assert.is_true(asked < 1000, "the iterator was asked " .. asked .. " times")
  end)

  it("refuses lpar.pending with nothing to wait for", function()
    local engine = require "lpar"
    local ok, err = pcall(engine.parallel, function(x) return x end,
                          function() return engine.pending end, 2)
    assert.is_false(ok)
    assert.matches("lpar.pending with no fd to wait on", err)
  end)
end)

describe("lpar's files in a sticky world-writable directory", function()
  local dir
  before_each(function()
    dir = H.tmpdir()
    assert(os.execute("chmod 1777 " .. dir))
  end)
  after_each(function() H.rmdir(dir) end)

  -- a uid not this user's
  local other = unistd.geteuid() == 65534 and 65533 or 65534

  -- a symlink dir/name -> target, owned by 'uid' (nil: by this user)
  local function link(name, target, uid)
    local path = dir .. "/" .. name
    assert(unistd.link(target, path, true))
    if uid then
      local ok = os.execute(("chown -h %d %s 2>/dev/null"):format(uid, path))
      if not ok then return nil end
    end
    return path
  end

  local ECHO = quote("function(s) return s end")

  it("refuses a symlink there that someone else planted, for -o and --joblog", function()
    local victim = writefile(tmpname(), "secret\n")
    local out = link("out", victim, other)
    if not out then return pending("chown -h needs root") end
    local log = link("log", victim, other)
    local said = "lpar: refusing to write %s: a symlink in the sticky world%%-writable directory " ..
                 "%s, owned by uid " .. other .. ", neither yours nor the directory owner's"
    local q = dir:gsub("%p", "%%%0")
    local code, stdout, err = lpar("-o " .. out .. " -e " .. ECHO .. " ::: a")
    assert.equal(2, code)
    assert.equal("", stdout)
    assert.matches("^" .. said:format(q .. "/out", q), err)
    code, stdout, err = lpar("--joblog " .. log .. " -e " .. ECHO .. " ::: a")
    assert.equal(2, code)
    assert.equal("", stdout)
    assert.matches("^" .. said:format(q .. "/log", q), err)
    code, stdout, err = lpar("--joblog " .. dir .. "/j -o " .. out .. " -e " .. ECHO .. " ::: a")
    assert.equal(2, code)
    assert.equal("", stdout)
    assert.matches("^" .. said:format(q .. "/out", q), err)
    assert.equal("secret\n", readfile(victim))
  end)

  it("refuses a symlink there that someone else planted, for --events", function()
    local victim = writefile(tmpname(), "secret\n")
    local ev = link("ev", victim, other)
    if not ev then return pending("chown -h needs root") end
    local q = dir:gsub("%p", "%%%0")
    local said = "lpar: refusing to write " .. q .. "/ev: a symlink in the sticky world%-writable " ..
                 "directory " .. q .. ", owned by uid " .. other
    for _, more in ipairs({"", "--joblog " .. dir .. "/j -o " .. dir .. "/o --resume "}) do
      local code, stdout, err = lpar(more .. "--events " .. ev .. " -e " .. ECHO .. " ::: a")
      assert.equal(2, code, err)
      assert.equal("", stdout)
      assert.matches("^" .. said, err)
      assert.equal("secret\n", readfile(victim))
    end
    -- the user's own symlink is followed
    local mine = link("mine", victim)
    local code, _, err = lpar("--events " .. mine .. " -e " .. ECHO .. " ::: a")
    assert.equal(0, code, err)
    assert.matches('^{"item":1,"event":"start"', readfile(victim))
  end)

  it("follows a symlink there that is the user's own or the directory owner's", function()
    local target = writefile(tmpname(), "")
    local mine = link("mine", target)
    local code, out, err = lpar("-o " .. mine .. " -e " .. ECHO .. " ::: a")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("", out)
    assert.equal("a\n", readfile(target))
    local owner = assert(require("posix.sys.stat").stat(dir)).st_uid
    local log = link("log", target, owner)
    code, out, err = lpar("--joblog " .. log .. " -e " .. ECHO .. " ::: b")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("b\n", out)
    assert.matches("^# lpar joblog", readfile(target))
  end)
end)
