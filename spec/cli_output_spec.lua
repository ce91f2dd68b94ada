-- The lpar command: scripts that return nothing (programs), what a script
-- returns and does while it loads, the forms of the output (--json,
-- --null-output) and how failures are reported (--quiet, the first few).
-- Each runs the built binary for real.
local H = require "spec.helper"

local quote = H.quote
local lpar = H.lpar
local writefile = H.writefile

describe("lpar with a script that returns nothing (a program)", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("gives --timeout to its lpar.parallel calls", function()
    local rc, out, err = lpar("--timeout 1 -e " ..
      quote("lpar.parallel(function() while true do end end, {1}) print('not here')"), nil, 30)
    assert.equal(2, rc, err)
    assert.equal("", out)
    assert.matches("timed out after 1", err)
  end)

  it("gives -j to its lpar.parallel and lpar.imap calls, and to the global 'parallel'", function()
    -- one worker runs every item: one pid
    local code = [[
      local function pid() local f = io.open("/proc/self/stat") local n = f:read("*n") f:close() return n end
      local seen, n = {}, 0
      local function f() local t = os.clock() + 0.01 repeat until os.clock() > t return pid() end
      for _, p in ipairs(parallel(f, {1, 2, 3, 4, 5, 6, 7, 8})) do
        if not seen[p] then seen[p], n = true, n + 1 end
      end
      for _, p in require("lpar").imap(f, {1, 2, 3, 4, 5, 6, 7, 8}) do
        if not seen[p] then seen[p], n = true, n + 1 end
      end
      print(n, require("lpar").default_workers)
    ]]
    local rc, out, err = lpar("-j1 -e " .. quote(code), nil, 60)
    assert.equal(0, rc, err)
    assert.equal("2\t1\n", out) -- a worker for each call
  end)

  it("gives --retries to its calls: an item that fails once succeeds", function()
    local mark = dir .. "/failed-once"
    local code = ([[
      local r = lpar.parallel(function(x)
        local f = io.open(%q)
        if not f then io.open(%q, "w"):close() error("first time") end
        f:close()
        return x * 2
      end, {21})
      print(r[1])
    ]]):format(mark, mark)
    local rc, out, err = lpar("--retries 1 -e " .. quote(code), nil, 60)
    assert.equal(0, rc, err)
    assert.equal("42\n", out)
  end)

  it("writes its standard output to the file of -o", function()
    local rc, out, err = lpar("-o " .. dir .. "/out -e " ..
      quote("print('hello') io.write('world') io.stdout:write('!\\n')"))
    assert.equal(0, rc, err)
    assert.equal("", out)
    assert.equal("hello\nworld!\n", H.readfile(dir .. "/out"))
  end)

  it("refuses options that cannot apply to it, naming them", function()
    local items = writefile(dir .. "/items", "a\n")
    local rc, out, err = lpar("--joblog " .. dir .. "/log --tag -e 'x = 1'")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("lpar: %-%-joblog, %-%-tag does not apply: the script returned nothing, " ..
                   "so it ran as a program", err)
    rc, out, err = lpar("-a " .. items .. " -e 'x = 1'")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("lpar: %-a does not apply", err)
    rc, out, err = lpar("--halt never -e 'x = 1'")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("lpar: %-%-halt never does not apply", err)
    rc, out, err = lpar("--halt soon,fail=3 -e 'x = 1' ::: a b")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("lpar: ':::', %-%-halt soon,fail=3 does not apply", err)
  end)

  it("still runs with arguments that are not files", function()
    local rc, out, err = lpar("-e " .. quote("print(arg[1], ...)") .. " ten 10")
    assert.equal(0, rc, err)
    assert.equal("ten\tten\t10\n", out)
  end)
end)

describe("lpar with what a script returns", function()
  local dir, items
  before_each(function()
    dir = H.tmpdir()
    items = writefile(dir .. "/items", "a\nb\n")
  end)
  after_each(function() H.rmdir(dir) end)

  it("refuses nil or false returned explicitly", function()
    local rc, out, err = lpar("-e 'return nil' " .. items)
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("lpar: the script returned nil, expected a function or a table with 'map'", err)
    local script = writefile(dir .. "/s.lua", "return false\n")
    rc, out, err = lpar(script .. " " .. items)
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("s.lua returned false, expected a function", err)
  end)

  it("refuses a missing 'return' when an items file is given", function()
    local script = writefile(dir .. "/forgot.lua", "local function f(s) return s end\n")
    local rc, out, err = lpar(script .. " " .. items)
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("forgot.lua returned nothing and called no lpar.parallel, imap or pool: " ..
                   "is its 'return' missing%? %(.*items was not read%)", err)
    rc, out, err = lpar(script .. " -", "a\n")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("%(%- was not read%)", err)
  end)

  it("refuses a table with an unknown key, listing the valid ones", function()
    local script = writefile(dir .. "/typo.lua",
      "return {map = function(s) return s end, int = function() end}\n")
    local rc, out, err = lpar(script .. " " .. items)
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("typo.lua: unknown key 'int' in the table it returned " ..
                   "%(valid keys: map, init, close%)", err)
  end)
end)

describe("lpar while the script loads", function()
  local dir, items
  before_each(function()
    dir = H.tmpdir()
    items = writefile(dir .. "/items", "a\nb\n")
  end)
  after_each(function() H.rmdir(dir) end)

  it("ends what the script wrote on its own line, before any result", function()
    local rc, out, err = lpar("-e " ..
      quote("io.write('loading') io.stdout:write(' model') return function(s) return 'r' .. s end") ..
      " " .. items)
    assert.equal(0, rc, err)
    assert.equal("loading model\nra\nrb\n", out)
    rc, out = lpar("-e " .. quote("print('ready') return function(s) return s end") .. " " .. items)
    assert.equal(0, rc)
    assert.equal("ready\na\nb\n", out)
  end)

  it("writes it first into the file of -o", function()
    local rc, out, err = lpar("-o " .. dir .. "/out -e " ..
      quote("io.write('header') return function(s) return s end") .. " " .. items)
    assert.equal(0, rc, err)
    assert.equal("", out)
    assert.equal("header\na\nb\n", H.readfile(dir .. "/out"))
  end)

  it("refuses a script that reads stdin where the items come from", function()
    local rc, out, err = lpar("-e " ..
      quote("local first = io.read() return function(s) return s end"), "a\nb\n")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("the script read the standard input while loading, but the items come from it", err)
    rc, out, err = lpar("-e " .. quote("for l in io.lines() do end return function(s) return s end") ..
                      " -", "a\n")
    assert.equal("", out)
    assert.equal(2, rc)
    assert.matches("read the standard input while loading", err)
  end)

  it("gives the script its stdin when the items come from a file", function()
    local rc, out, err = lpar("-e " ..
      quote("local pre = io.read() return function(s) return pre .. s end") .. " " .. items, "x-\n")
    assert.equal(0, rc, err)
    assert.equal("x-a\nx-b\n", out)
  end)
end)

describe("lpar's results", function()
  local dir, items
  before_each(function()
    dir = H.tmpdir()
    items = writefile(dir .. "/items", "a\nb\n")
  end)
  after_each(function() H.rmdir(dir) end)

  it("end with NUL bytes with --null-output, newlines kept", function()
    local rc, out, err = lpar("--null-output -e " ..
      quote("function(s) if s == 'b' then error('no b') end return s .. '\\n' .. s end") ..
      " " .. items)
    assert.equal(1, rc)
    assert.equal("a\na\0", out)
    assert.matches("no b", err)
    -- through a retry (one record per run) too
    rc, out = lpar("--null-output --retries 1 -e " ..
      quote("function(s) return s .. '\\n' end") .. " ::: x y")
    assert.equal(0, rc)
    assert.equal("x\n\0y\n\0", out)
  end)

  it("are each one line of JSON with --json", function()
    local rc, out, err = lpar("--json -e " .. quote([[function(s)
      if s == 'a' then return 'line\none "q"' end
      if s == 'b' then return s, nil, 1.5, true end
      if s == 'c' then return {k = s} end
      if s == 'd' then return nil end
      return 7
    end]]) .. " ::: a b c d e")
    assert.equal(0, rc, err)
    assert.equal('"line\\none \\"q\\""\n["b",null,1.5,true]\n{"k":"c"}\n7\n', out)
  end)

  it("fail the item, saying why, for a string that is not UTF-8 with --json", function()
    local rc, out, err = lpar("--json -e " ..
      quote("function(s) if s == 'b' then return 'x\\255' end return s end") .. " " .. items)
    assert.equal(1, rc)
    assert.equal('"a"\n', out)
    assert.matches('lpar: line 2 %("b"%): cannot print the result as JSON: it is not valid UTF%-8', err)
  end)

  it("fail the item for a table holding a string that is not UTF-8", function()
    local rc, out, err = lpar("-e " ..
      quote("function(s) return {name = s, list = {'ok', s == 'b' and '\\192' or 'fine'}} end") ..
      " " .. items)
    assert.equal(1, rc)
    assert.equal(1, #H.lines(out))
    assert.matches('"name":"a"', out)
    assert.matches('lpar: line 2 %("b"%): cannot print the result as JSON: ' ..
                   'the string at list%[2%] is not valid UTF%-8', err)
    rc, out, err = lpar("-e " .. quote("function(s) return {[s .. '\\255'] = 1} end") .. " ::: k")
    assert.equal(1, rc)
    assert.equal("", out)
    assert.matches('the string at %["k\\xff"%] %(its key%) is not valid UTF%-8', err)
  end)

  it("fail the item for a surrogate code point (U+D800), on every Lua", function()
    -- 5.3's utf8.len (and lua-compat53's, before 5.3) takes it
    local rc, out, err = lpar("--json -e " ..
      quote("function(s) if s == 'b' then return 'x\\237\\160\\128' end return s end") .. " " .. items)
    assert.equal(1, rc)
    assert.equal('"a"\n', out)
    assert.matches('lpar: line 2 %("b"%): cannot print the result as JSON: it is not valid UTF%-8', err)
    -- the last code point before the surrogates and the first after them
    rc, out, err = lpar("--json -e " ..
      quote("function(s) return s == 'a' and '\\237\\159\\191' or '\\238\\128\\128' end") .. " ::: a b")
    assert.equal(0, rc, err)
    assert.equal('"\237\159\191"\n"\238\128\128"\n', out)
  end)

  it("of several values follow one rule: tab-joined, nil empty, all nil no line", function()
    local rc, out, err = lpar("-e " .. quote([[function(s)
      if s == '1' then return 'a', nil end
      if s == '2' then return nil, nil end
      if s == '3' then return nil, 'b' end
      return s
    end]]) .. " ::: 1 2 3 4")
    assert.equal(0, rc, err)
    assert.equal("a\t\n\tb\n4\n", out)
  end)
end)

describe("lpar's failure messages", function()
  local dir, items
  before_each(function()
    dir = H.tmpdir()
    local t = {}
    for i = 1, 12 do t[i] = i .. "\n" end
    items = writefile(dir .. "/items", table.concat(t))
  end)
  after_each(function() H.rmdir(dir) end)

  local FAIL = quote("function(s) if tonumber(s) > 2 then error('bad ' .. s) end return s end")

  it("show tracebacks for the first 5 failures only, and say so", function()
    local rc, out, err = lpar("-e " .. FAIL .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n", out)
    local _, n = err:gsub("stack traceback:", "")
    assert.equal(5, n)
    assert.matches('lpar: line 7 %("7"%): %(command line%):1: bad 7\nstack traceback:', err)
    assert.matches('\nlpar: line 8 %("8"%): %(command line%):1: bad 8\nlpar: line 9 ', err)
    assert.matches("lpar: 10 of 12 items failed %(5 shown without traceback, after the first 5%)\n$", err)
  end)

  it("leave stderr to the summary with --quiet", function()
    local rc, out, err = lpar("--quiet -e " .. FAIL .. " " .. items)
    assert.equal(1, rc)
    assert.equal("1\n2\n", out)
    assert.equal("lpar: 10 of 12 items failed\n", err)
  end)

  it("include a hint when the items are read from a terminal", function()
    -- script(1) gives lpar a terminal for stdin, stdout and stderr
    local cmd = ("printf 'a\\nb\\n\\004' | timeout 30 script -qc %s /dev/null")
    local rc, out = H.run(cmd:format(quote(quote(H.cli) .. " -e 'function(s) return s:upper() end'")))
    assert.equal(0, rc, out)
    assert.matches("lpar: reading items from the terminal %(end with Ctrl%-D%)", out)
    assert.matches("A\r\nB\r\n", out)
    rc, out = H.run(cmd:format(quote(quote(H.cli) .. " --quiet -e 'function(s) return s:upper() end'")))
    assert.equal(0, rc, out)
    assert.is_nil(out:find("reading items", 1, true))
    -- not from a file
    local _, _, err = lpar("-e 'function(s) return s end' " .. items)
    assert.equal("", err)
  end)
end)

describe("lpar's joblog and --resume-failed", function()
  local dir, items, log, out, script
  before_each(function()
    dir = H.tmpdir()
    items = writefile(dir .. "/items", "1\n2\n3\n4\n5\n6\n")
    log, out = dir .. "/log", dir .. "/out"
    -- items 2 and 5 fail until their file 'fixedN' exists
    script = writefile(dir .. "/flaky.lua", ([[
      return function(s)
        if (s == "2" or s == "5") and not io.open(%q .. "/fixed" .. s) then
          error("not yet " .. s .. "\tor\rnever\nsecond line")
        end
        return "r" .. s
      end
    ]]):format(dir))
  end)
  after_each(function() H.rmdir(dir) end)

  -- the joblog's item lines, each as a list of its fields
  local function entries()
    local t = {}
    for l in H.readfile(log):gmatch("[^\n]+") do
      if l:sub(1, 1) ~= "#" then
        local f = {}
        for v in (l .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = v end
        t[#t + 1] = f
      end
    end
    return t
  end

  it("has a header naming its columns, and the start, host and first line of the error", function()
    local t0 = os.time()
    local rc, _, err = lpar(("--joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(1, rc, err)
    assert.matches("^# lpar joblog 3\n.*\n# line\tstatus\tseconds\tattempts\tstart\thost\terror\n1\t",
                   H.readfile(log))
    local e = entries()
    assert.equal(6, #e)
    for i, f in ipairs(e) do
      assert.equal(7, #f)
      assert.equal(tostring(i), f[1])
      local start = tonumber(f[5])
      assert.is_true(start >= t0 - 1 and start <= os.time() + 1, f[5])
      assert.equal(":", f[6])
    end
    assert.same({"ok", ""}, {e[1][2], e[1][7]})
    assert.equal("failed", e[2][2])
    assert.matches("flaky.lua:3: not yet 2\\tor\\rnever$", e[2][7])
  end)

  it("runs again only the items recorded as failed, and appends their outcome", function()
    local rc = lpar(("--joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(1, rc)
    assert.equal("r1\nr3\nr4\nr6\n", H.readfile(out))
    writefile(dir .. "/fixed5", "")
    local rc2, _, err = lpar(("--resume-failed --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(1, rc2)
    assert.matches('^lpar: line 2 %("2"%): [^\n]*not yet 2', err)
    assert.matches("lpar: 1 of 2 items failed\n$", err)
    assert.equal("r1\nr3\nr4\nr6\nr5\n", H.readfile(out))
    local e = entries()
    assert.same({"2", "failed"}, {e[7][1], e[7][2]})
    assert.same({"5", "ok"}, {e[8][1], e[8][2]})
    -- the next one sees the new outcomes: only 2 is left
    writefile(dir .. "/fixed2", "")
    local rc3, _, err3 = lpar(("--resume-failed --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(0, rc3, err3)
    assert.equal("r1\nr3\nr4\nr6\nr5\nr2\n", H.readfile(out))
    assert.equal(9, #entries())
    -- then nothing is left, and --resume keeps all of it
    local rc4, _, err4 = lpar(("--resume-failed --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(0, rc4)
    assert.equal(("lpar: %s records no failed item: nothing to run again\n"):format(log), err4)
    local rc5, _, err5 = lpar(("--resume --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(0, rc5, err5)
    assert.equal("r1\nr3\nr4\nr6\nr5\nr2\n", H.readfile(out))
    assert.equal(9, #entries())
  end)

  it("writes to stdout without -o, and refuses another run's joblog", function()
    assert.equal(1, (lpar(("--joblog %s %s %s"):format(log, script, items))))
    writefile(dir .. "/fixed2", "")
    writefile(dir .. "/fixed5", "")
    local other = writefile(dir .. "/other", "1\n2\n3\n4\n5\n7\n")
    local rc, o, err = lpar(("--resume-failed --joblog %s %s %s"):format(log, script, other))
    assert.equal(2, rc)
    assert.equal("", o)
    assert.matches("cannot resume from " .. log:gsub("%p", "%%%0") .. ": the items file differs", err)
    rc, o, err = lpar(("--resume-failed --joblog %s %s %s"):format(log, script, items))
    assert.equal(0, rc, err)
    assert.equal("r2\nr5\n", o)
    rc, o, err = lpar(("--resume-failed %s %s"):format(script, items))
    assert.equal("", o)
    assert.equal(2, rc)
    assert.matches("%-%-resume%-failed needs %-%-joblog FILE", err)
  end)

  it("appends to the results of an --unordered run", function()
    assert.equal(1, (lpar(("--unordered --joblog %s -o %s %s %s"):format(log, out, script, items))))
    local before = H.readfile(out)
    assert.equal(4, #H.lines(before))
    writefile(dir .. "/fixed2", "")
    local rc, _, err = lpar(("--resume-failed --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(1, rc)
    assert.matches("lpar: 1 of 2 items failed\n$", err)
    assert.equal(before .. "r2\n", H.readfile(out))
    assert.equal(8, #entries())
  end)

  it("refuses to resume a joblog of the format before, saying why", function()
    writefile(log, "# lpar joblog 1\n# script: 0 \"x\"\n# line\tstatus\tseconds\tattempts\n" ..
                   "1\tok\t0.000001\t1\n# out 3 1\n")
    writefile(out, "r1\n")
    local rc, _, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, out, script, items))
    assert.equal(2, rc)
    assert.matches("cannot resume from [^\n]*: it was written by an older lpar %(joblog format 1", err)
    assert.equal("r1\n", H.readfile(out))
  end)
end)

describe("lpar and options found wanting by an outside test", function()
  it("calls a --colsep pattern that matches only an empty string (%f) a usage error", function()
    local code, out, err = lpar("--colsep " .. quote("%f[%w]") .. " -e " ..
                                quote("function(...) return select('#', ...) end"), "a,b\n")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^lpar: bad value for '%-%-colsep': '%%f%[%%w%]' %(it can match an empty string%)", err)
  end)

  it("gives --unordered to a program's lpar.imap calls, not to lpar.parallel", function()
    local code, out, err = lpar("--unordered -e " ..
                                quote("print(table.concat(parallel(function(x) return x * 2 end, {1, 2, 3}), ','))"))
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("2,4,6\n", out)
  end)

  it("calls a --max-memory that leaves no room, or cannot be, a usage error", function()
    local code, out, err = lpar("--max-memory 1M -e " .. quote("function(s) return s end") .. " ::: a")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^lpar: %-%-max%-memory 1048576 bytes leaves less than", err)
    code, out, err = lpar("--max-memory 1000000000G -e " .. quote("function(s) return s end") .. " ::: a")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^lpar: bad value for '%-%-max%-memory': '1000000000G'", err)
  end)

  it("keeps the user's own function last in a deep traceback", function()
    if H.clilua() == "Lua 5.1" then return pending("5.1's tracebacks do not count the levels skipped") end
    local script = os.tmpname()
    writefile(script, "local function r(n) if n == 0 then error('bottom') end return 1 + r(n - 1) end\n" ..
                      "return function(s) local v = r(tonumber(s)) return v end\n")
    local code, _, err = lpar("-j1 " .. script, "30\n")
    os.remove(script)
    assert.equal(1, code)
    local short = script:match("[^/]*$"):gsub("%p", "%%%0")
    assert.matches("%.%.%.\t%(skipping 12 levels%)\n", err)
    assert.matches(short .. ":2: in function <[^\n]*" .. short .. ":2>\nlpar: 1 of 1 items failed\n$", err)
  end)

  it("cuts the joblog's error column at 200 bytes after escaping", function()
    local log = os.tmpname()
    local code = lpar(("--joblog %s -e %s"):format(log, quote("function(s) error(('\\1'):rep(150), 0) end")),
                      "a\n")
    assert.equal(1, code)
    local line = H.readfile(log):match("\n1\tfailed\t[^\n]*")
    os.remove(log)
    local field = line:match("([^\t]*)$")
    assert.is_true(#field <= 203, #field .. " bytes")
    assert.matches("^\\x01\\x01.*%.%.%.$", field)
  end)
end)
