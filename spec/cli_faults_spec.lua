-- The lpar command where things go wrong around it: workers lost with
-- items still to run, output and joblog that cannot be written, joblogs
-- that do not belong to the run, signals and closed streams.
local H = require "spec.helper"
local unistd = require "posix.unistd"
local signal = require "posix.signal"

local FIX = "spec/fixtures/cli/"

local quote = H.quote
local function lpar(args, input) return H.lpar(args, input, 30) end
local writefile = H.writefile
local readfile = H.readfile
local pidsof = H.pidsof
local spawn = H.spawncli
local readuntil = H.readuntil
local waitexit = H.waitexit
local closeall = H.closeall

local tmpname = H.tmpfiles(after_each)

describe("lpar with a worker lost in the middle of its items", function()
  -- _exit, not os.exit: in a sanitizer build, exit() in a worker forked
  -- from the threaded CLI runs the leak checker, which can wait forever
  -- on a lock that another thread held at the fork
  local crash = FIX .. "die.lua"

  it("finishes when the last item's worker dies (-j1)", function()
    for _ = 1, 5 do
      local code, out, err = lpar("-j1 " .. crash .. " -", "a\nexit\n")
      assert.equal(1, code, err)
      assert.equal("a\n", out)
      assert.matches('lpar: line 2 %("exit"%): worker %d+ exited with status 3\n', err)
      assert.matches("\nlpar: 1 of 2 items failed\n$", err)
    end
  end)

  it("fails a long line whose worker dies after it ran, before its result went", function()
    -- the record leaves garbage whose finalizer kills its worker: a long
    -- line's batch collects garbage once its record ran (it went
    -- unreported, the run ending with status 0)
    local script, items = tmpname(), tmpname()
    writefile(script, [[
      local signal, unistd = require "posix.signal", require "posix.unistd"
      local function die() signal.kill(unistd.getpid(), signal.SIGKILL) end
      return function(s)
        if s:sub(1, 1) == "b" then -- garbage with a finalizer (a userdata before 5.2)
          if newproxy then getmetatable(newproxy(true)).__gc = die
          else setmetatable({}, {__gc = die}) end
        end
        return #s
      end]])
    local input = "a\n" .. ("b"):rep(2000000) .. "\nc\n"
    writefile(items, input)
    for _, from in ipairs({items, "-"}) do
      local code, out, err = lpar("-j1 " .. script .. " " .. from, from == "-" and input or nil)
      assert.equal(1, code, err)
      assert.equal("1\n1\n", out)
      assert.matches('^lpar: line 2 %("bbbb[^\n]*%): worker %d+ killed by signal 9', err)
      assert.matches("\nlpar: 1 of 3 items failed\n$", err)
    end
  end)

  it("finishes when a worker dies on a first or middle item (-j1)", function()
    local code, out, err = lpar("-j1 " .. crash .. " -", "exit\na\nexit\nb\n")
    assert.equal(1, code, err)
    assert.equal("a\nb\n", out)
    assert.matches('lpar: line 1 %("exit"%): worker %d+ exited', err)
    assert.matches('lpar: line 3 %("exit"%): worker %d+ exited', err)
    assert.matches("2 of 4 items failed", err)
  end)

  it("finishes when an item times out (-j1 --timeout)", function()
    local code, out, err = lpar("-j1 --timeout 0.5 " .. FIX .. "spin.lua -",
                                "a\nspin\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches('lpar: line 2 %("spin"%): timed out after 0.5 s', err)
  end)

  it("finishes with --unordered", function()
    local code, out, err = lpar("-j1 --unordered " .. crash .. " -", "a\nexit\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches('lpar: line 2 %("exit"%): worker %d+ exited', err)
  end)

  it("finishes with --retries 1", function()
    local code, out, err = lpar("-j1 --retries 1 " .. crash .. " -", "a\nexit\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches('lpar: line 2 %("exit"%): worker %d+ exited', err)
  end)

  it("finishes with the default -j on 3 to 10 items, from a file or a pipe", function()
    local items = tmpname()
    for n = 3, 10 do
      for _, at in ipairs({1, n // 2, n}) do
        local t = {}
        for i = 1, n do t[i] = i == at and "exit" or tostring(i) end
        local input = table.concat(t, "\n") .. "\n"
        writefile(items, input)
        table.remove(t, at)
        local want = table.concat(t, "\n") .. "\n"
        for _, how in ipairs({{crash .. " -", input}, {crash .. " " .. items}}) do
          local code, out, err = lpar(how[1], how[2])
          assert.equal(1, code, ("%d items, exit at %d: %s"):format(n, at, err))
          assert.equal(want, out)
          assert.matches(('lpar: line %d %%("exit"%%): worker %%d+ exited'):format(at), err)
        end
      end
    end
  end)
end)

describe("lpar.imap and lpar.parallel over an iterator, a worker lost", function()
  -- in a fresh lua5.4 under a 30 s bound: a hang shows as code 124
  local function bounded(code)
    local f = H.program(code)
    local rc, out, err = H.run("timeout -k 5 30 lua5.4 " .. f)
    os.remove(f)
    return rc, out, err
  end
  local prelude = [[
    local lpar = require "lpar"
    local function iter(t)
      local i = 0
      return function() i = i + 1; return t[i] end
    end
    local unistd = require "posix.unistd"
    local function f(s)
      if s == "exit" then unistd._exit(3) end
      if s == "spin" then while true do end end
      return s
    end
  ]]

  it("imap ends after the failure of the last item, in every mode", function()
    local rc, out, err = bounded(prelude .. [[
      for _, o in ipairs({{}, {unordered = true}, {retries = 1}, {timeout = 0.5}}) do
        o.n_workers, o.on_error, o.chunksize = 1, "collect", 1
        for _, last in ipairs({"exit", "spin"}) do
          if last == "exit" or o.timeout then
            local got = {}
            for i, v, e in lpar.imap(f, iter({"a", last}), o) do
              local why = e and (e:match("^worker") or e:match("^timed out")) or ""
              got[#got + 1] = i .. ":" .. tostring(v) .. ":" .. why
            end
            print(table.concat(got, " "))
          end
        end
      end
    ]])
    assert.equal(0, rc, err)
    assert.equal(table.concat({
      "1:a: 2:nil:worker", "1:a: 2:nil:worker", "1:a: 2:nil:worker",
      "1:a: 2:nil:worker", "1:a: 2:nil:timed out", ""}, "\n"), out)
  end)

  it("parallel collects the failure of the last item and returns", function()
    local rc, out, err = bounded(prelude .. [[
      local res, n, errs = lpar.parallel(f, iter({"a", "b", "exit"}),
        {n_workers = 1, on_error = "collect", chunksize = 1})
      print(n, res[1], res[2], res[3], errs[3]:match("^worker %d+ exited"))
    ]])
    assert.equal(0, rc, err)
    assert.matches("^3\ta\tb\tnil\tworker %d+ exited\n$", out)
  end)
end)

describe("lpar and SIGHUP", function()
  it("stops as for SIGTERM: output so far, workers reaped, status 129", function()
    local log = tmpname()
    os.remove(log)
    local p = spawn({"-j2", "--chunk", "1", FIX .. "sleepy.lua", "-", log})
    unistd.write(p.stdin, "0\n1\n20000\n20000\n")
    local out, ok = readuntil(p.stdout, function(s) return s == "0\n1\n" end, 20)
    assert.is_true(ok, "got only " .. ("%q"):format(out))
    -- both workers are on their 20 s items: the pid file has both
    local deadline = H.now() + 20
    while #pidsof(log) < 2 and H.now() < deadline do H.sleep(0.01) end
    assert.equal(2, #pidsof(log))
    signal.kill(p.pid, signal.SIGHUP)
    local how, code = waitexit(p.pid, 10)
    local rest = readuntil(p.stdout, function() return false end, 0.2)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(129, code)
    assert.equal("", rest)
    assert.equal("lpar: hangup\n", err)
    for _, pid in ipairs(pidsof(log)) do assert.is_false(H.alive(pid)) end
  end)

  it("stops with status 129 while waiting for input", function()
    local p = spawn({FIX .. "upper.lua"})
    unistd.write(p.stdin, "a\n")
    local _, ok = readuntil(p.stdout, function(s) return s == "A\n" end, 20)
    assert.is_true(ok)
    signal.kill(p.pid, signal.SIGHUP)
    local how, code = waitexit(p.pid, 10)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(129, code)
    assert.equal("lpar: hangup\n", err)
  end)

  it("keeps running when SIGHUP is ignored (nohup)", function()
    local cmd = ("trap '' HUP; exec %s %s -"):format(quote(H.cli), FIX .. "hangup.lua")
    local code, out, err = H.run("timeout -k 5 30 sh -c " .. quote(cmd), "a\nb\n")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("a\nb\n", out)
  end)
end)

describe("lpar and writes that fail", function()
  local echo = FIX .. "echo.lua"

  it("fails when --help or --version cannot be written", function()
    for _, opt in ipairs({"--help", "--version"}) do
      local code, out, err = H.run(quote(H.cli) .. " " .. opt .. " >/dev/full")
      assert.equal(1, code, opt)
      assert.equal("", out)
      assert.matches("^lpar: cannot write the output: No space left on device\n$", err)
    end
  end)

  it("fails when a script that does its own work cannot print", function()
    local code, _, err = H.run(quote(H.cli) .. [[ -e 'print("hello")' >/dev/full]])
    assert.equal(1, code)
    assert.matches("^lpar: cannot write the output", err)
  end)

  it("fails naming the file when -o cannot be written", function()
    local code, out, err = lpar("-o /dev/full " .. echo .. " -", "a\nb\n")
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("^lpar: cannot write /dev/full: No space left on device\n$", err)
  end)

  it("fails naming the file when the joblog cannot be written", function()
    local res = tmpname()
    for _, args in ipairs({"", "-o " .. res .. " ", "--unordered "}) do
      for _, input in ipairs({"", "a\nb\n"}) do
        local code, _, err = lpar("--joblog /dev/full " .. args .. echo .. " -", input)
        assert.equal(1, code, args .. (" %q"):format(input))
        assert.matches("lpar: cannot write /dev/full: No space left on device\n$", err)
      end
    end
  end)
end)

describe("lpar with files that fill up (a file size limit)", function()
  -- a millisecond per item: output and joblog are written in many steps
  local echo = FIX .. "slowecho.lua"

  -- Run lpar under 'ulimit -f kb' (no limit if nil); code, out, err.
  local function limited(kb, args)
    local cmd = (kb and ("ulimit -f %d; "):format(kb) or "") ..
                ("exec %s %s"):format(quote(H.cli), args)
    return H.run("timeout -k 5 60 bash -c " .. quote(cmd))
  end

  -- What slowecho.lua gives for these items.
  local function echoed(items)
    return table.concat(items, "\n") .. "\n"
  end

  -- Each line of the items in the joblog exactly once, as ok.
  local function loggedonce(log, n)
    local count = {}
    for _, r in ipairs(H.joblog(log)) do
      if r.status == "ok" then count[r.line] = (count[r.line] or 0) + 1 end
    end
    for i = 1, n do assert.equal(1, count[i], "line " .. i) end
  end

  local function check(kb, items, failing)
    local path, log, res = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    writefile(path, table.concat(items, "\n") .. "\n")
    local files = ("--joblog %s -o %s %s %s"):format(log, res, echo, path)
    local code, out, err = limited(kb, "--resume " .. files)
    assert.equal(1, code, err)
    assert.equal("", out)
    local name = failing == "output" and res or log
    assert.equal(("lpar: cannot write %s: File too large\n"):format(name), err)
    if failing == "output" then assert.is_true(#readfile(res) < #echoed(items)) end
    code, out, err = limited(nil, "--resume " .. files)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("", out)
    assert.equal(echoed(items), readfile(res))
    loggedonce(log, #items)
  end

  it("stops when the output is full, and --resume completes it exactly", function()
    local items = {}
    for i = 1, 300 do items[i] = ("x"):rep(200) .. i end
    check(16, items, "output")
  end)

  it("stops when the joblog is full, and --resume completes it exactly", function()
    local items = {}
    for i = 1, 3000 do items[i] = tostring(i) end -- about 14 KB of output
    check(24, items, "joblog") -- the joblog takes 5 times as much
  end)
end)

describe("lpar -o and what the script writes itself", function()
  it("leaves the script's own buffered output on stdout, out of the marks", function()
    local script = writefile(tmpname(), 'io.write("from the script\\n")\n' ..
                                        "return function(s) return s end\n")
    local log, res = tmpname(), tmpname()
    local code, out, err = lpar(("--joblog %s -o %s %s -"):format(log, res, script), "a\nb\n")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("from the script\n", out)
    assert.equal("a\nb\n", readfile(res))
    assert.matches("\n# out 4 2 %x+\n$", readfile(log))
  end)
end)

describe("lpar --resume and the run a joblog belongs to", function()
  local echo = FIX .. "echo.lua"
  local items, log, res

  before_each(function()
    items, log, res = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    writefile(items, "a\nb\nc\n")
  end)

  -- A joblog and output as a run stopped after line 2 leaves them.
  local function stoppedrun(args)
    local code, _, err = lpar(("--joblog %s -o %s %s"):format(log, res, args))
    assert.equal(0, code, err)
    local text = readfile(log)
    local keep = text:match("^(.-\n2\tok\t[^\n]*\n)")
    local bytes = #("1:a\n1:b\n")
    writefile(log, keep .. H.mark("1:a\n1:b\n", 2) .. "\n")
    writefile(res, readfile(res):sub(1, bytes))
  end

  local function resume(args)
    return lpar(("--resume --joblog %s -o %s %s"):format(log, res, args))
  end

  it("records the script, the items and the options in the joblog header", function()
    stoppedrun(echo .. " " .. items .. " x y")
    local text = readfile(log)
    assert.matches("^# lpar joblog 3\n# script: %x+ \"" .. echo:gsub("%p", "%%%0") .. "\"\n", text)
    assert.matches("\n# items: file 6 6 %x+ \"[^\n]*\"\n", text)
    assert.matches("\n# split: lines\n# args: %x+ \"x\" \"y\"\n# output: plain\n# line\tstatus", text)
  end)

  it("refuses a run whose results are shaped otherwise (--json, --tag, --colsep)", function()
    stoppedrun(echo .. " " .. items)
    writefile(res, "precious\n")
    local before = readfile(log)
    local code, out, err = lpar(("--tag --resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("the results were written as plain then, as %-%-tag now", err)
    assert.equal(before, readfile(log))
    assert.equal("precious\n", readfile(res))
  end)

  it("resumes the same run, and a file that only grew", function()
    stoppedrun(echo .. " " .. items)
    local code, _, err = resume(echo .. " " .. items)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:a\n1:b\n1:c\n", readfile(res))
    -- the items file grows (a log appended to): the new lines go on
    writefile(items, "a\nb\nc\nd\n")
    writefile(log, (readfile(log):gsub("# out 12 3 %x+\n$", H.mark("1:a\n1:b\n", 2) .. "\n")))
    code, _, err = resume(echo .. " " .. items)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:a\n1:b\n1:c\n1:d\n", readfile(res))
  end)

  it("resumes with the same items under another name (a copy)", function()
    stoppedrun(echo .. " " .. items)
    local copy = writefile(tmpname(), readfile(items))
    local code, _, err = resume(echo .. " " .. copy)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:a\n1:b\n1:c\n", readfile(res))
  end)

  -- Refused with status 2 and 'why'; output and joblog untouched.
  local function refused(args, why)
    local before, out = readfile(log), readfile(res)
    local code, _, err = resume(args)
    assert.equal(2, code, err)
    assert.equal(("lpar: cannot resume from %s: %s\n"):format(log, why), err)
    assert.equal(before, readfile(log))
    assert.equal(out, readfile(res))
  end

  it("refuses other items: changed, shorter, or from a pipe", function()
    stoppedrun(echo .. " " .. items)
    local other = writefile(tmpname(), "x\ny\nz\n")
    refused(echo .. " " .. other, "the items file differs (in its first 6 bytes)")
    writefile(other, "a\nb\n")
    refused(echo .. " " .. other, "the items file is shorter (4 bytes, 6 then)")
    local code, _, err = H.run(("cat %s | %s --resume --joblog %s -o %s %s -")
                               :format(items, quote(H.cli), log, res, echo))
    assert.equal(2, code)
    assert.equal(("lpar: cannot resume from %s: the items came from a file, now from a pipe\n")
                 :format(log), err)
    -- stdin redirected from the same file: the same items
    code, _, err = lpar(("--resume --joblog %s -o %s %s - <%s"):format(log, res, echo, items))
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:a\n1:b\n1:c\n", readfile(res))
  end)

  it("refuses another script, other arguments or another -0", function()
    stoppedrun(echo .. " " .. items .. " x")
    refused(FIX .. "upper.lua " .. items .. " x", "the script differs")
    refused(echo .. " " .. items .. " y", "the script's arguments differ")
    refused(echo .. " " .. items, "the script's arguments differ")
    refused("-0 " .. echo .. " " .. items .. " x", "the items were split on newlines then, on NUL bytes (-0) now")
    refused("-e 'return function(s) return s end' " .. items .. " x",
            "the script differs")
  end)

  it("refuses a joblog that counts more items done than the input has", function()
    stoppedrun(echo .. " " .. items)
    local before, out = readfile(log), readfile(res)
    local code, _, err = H.run(("printf 'a\\n' | %s --resume --joblog %s -o %s %s -")
                               :format(quote(H.cli), log, res, echo))
    assert.equal(2, code)
    assert.matches("lpar: cannot resume from " .. log:gsub("%p", "%%%0") ..
                   ": the items came from a file, now from a pipe\n$", err)
    -- a joblog of a pipe: the input cannot be checked, but its length can
    writefile(log, before:gsub("# items: file [^\n]*", '# items: stream "-"'))
    code, _, err = H.run(("printf 'a\\n' | %s --resume --joblog %s -o %s %s -")
                         :format(quote(H.cli), log, res, echo))
    assert.equal(2, code)
    assert.equal(("lpar: cannot resume from %s: it counts 2 items done, the input has 1\n")
                 :format(log), err)
    assert.equal(out, readfile(res))
  end)

  it("refuses a joblog that does not say which run it belongs to", function()
    stoppedrun(echo .. " " .. items)
    writefile(log, readfile(log):gsub("^.-(# line\t)", "%1"))
    refused(echo .. " " .. items,
            "it does not say which run it belongs to (made by an older lpar?)")
  end)

  it("starts afresh when the joblog has no mark yet", function()
    writefile(log, "# lpar joblog 3\n# scr")
    local code, _, err = resume(FIX .. "upper.lua " .. items)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("A\nB\nC\n", readfile(res))
  end)

  it("reports a mark with a number too large, naming the joblog and line", function()
    stoppedrun(echo .. " " .. items)
    local text = readfile(log)
    local n = select(2, text:gsub("\n", ""))
    for _, mark in ipairs({"# out 99999999999999999999 2 0123456789abcdef",
                             "# out 8 99999999999999999999 0123456789abcdef"}) do
      writefile(log, text .. mark .. "\n")
      local code, out, err = resume(echo .. " " .. items)
      assert.equal(2, code)
      assert.equal("", out)
      assert.equal(("lpar: bad joblog %s, line %d: number too large in '%s'\n")
                   :format(log, n + 1, mark), err)
    end
  end)
end)

describe("lpar and files that are one", function()
  local echo = FIX .. "echo.lua"

  it("refuses -o naming the items file, by any name, before cutting it", function()
    local items = writefile(tmpname(), "a\nb\n")
    local dir, base = items:match("^(.*)/([^/]*)$")
    local link = tmpname()
    os.remove(link)
    assert(os.execute(("ln %s %s"):format(items, link)))
    for _, args in ipairs({
      {"-o " .. items .. " " .. echo .. " " .. items, items},
      {"-o " .. dir .. "/./" .. base .. " " .. echo .. " " .. items, dir .. "/./" .. base},
      {"-o " .. link .. " " .. echo .. " " .. items, link},
      {"-o " .. link .. " " .. echo .. " - <" .. items, link},
    }) do
      local code, out, err = lpar(args[1])
      assert.equal(2, code, args[1])
      assert.equal("", out)
      assert.equal(("lpar: -o names the items file (%s)\n"):format(args[2]), err)
      assert.equal("a\nb\n", readfile(items))
    end
  end)

  it("refuses a standard output that is the items file or the joblog", function()
    local items = writefile(tmpname(), "a\nb\n")
    local code, _, err = H.run(("timeout -k 5 30 %s %s %s >>%s")
                               :format(quote(H.cli), FIX .. "echo.lua", items, items))
    assert.equal(2, code)
    assert.equal("lpar: the standard output is the items file\n", err)
    assert.equal("a\nb\n", readfile(items))
    local log = tmpname()
    code, _, err = H.run(("timeout -k 5 30 %s --joblog %s %s %s >>%s")
                         :format(quote(H.cli), log, FIX .. "echo.lua", items, log))
    assert.equal(2, code)
    assert.equal("lpar: the standard output is the joblog\n", err)
  end)

  it("refuses -o or --joblog naming the script", function()
    local script = writefile(tmpname(), "return function(s) return s end\n")
    for _, opt in ipairs({"-o", "--joblog"}) do
      local code, out, err = lpar(("%s %s %s -"):format(opt, script, script), "a\n")
      assert.equal(2, code)
      assert.equal("", out)
      assert.equal(("lpar: %s names the script file (%s)\n"):format(opt, script), err)
      assert.equal("return function(s) return s end\n", readfile(script))
    end
  end)

  it("refuses --joblog naming the items file or the -o file", function()
    local items = writefile(tmpname(), "a\nb\n")
    local code, _, err = lpar("--joblog " .. items .. " " .. echo .. " " .. items)
    assert.equal(2, code)
    assert.equal(("lpar: --joblog names the items file (%s)\n"):format(items), err)
    assert.equal("a\nb\n", readfile(items))
    local res = tmpname()
    os.remove(res)
    local dir, base = res:match("^(.*)/([^/]*)$")
    code, _, err = lpar(("--joblog %s -o %s/./%s %s %s"):format(res, dir, base, echo, items))
    assert.equal(2, code)
    assert.equal(("lpar: --joblog and -o name the same file (%s/./%s)\n"):format(dir, base), err)
  end)

  it("refuses a joblog in use by another run, touching nothing", function()
    local log, res, res2 = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    writefile(res2, "keep me\n")
    local p = spawn({"-j1", "--joblog", log, "-o", res, FIX .. "sleepy.lua", "-"})
    unistd.write(p.stdin, "0\n")
    -- the first run holds the joblog once its first line is marked
    local deadline = H.now() + 20
    while not (readfile(log) or ""):find("# out") and H.now() < deadline do H.sleep(0.01) end
    assert.matches("\n# out 2 1 %x+\n$", readfile(log))
    local before = readfile(log)
    local code, out, err = lpar(("--joblog %s -o %s %s -"):format(log, res2, echo), "x\n")
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal(("lpar: %s is in use by another lpar run\n"):format(log), err)
    assert.equal("keep me\n", readfile(res2))
    assert.equal(before, readfile(log))
    unistd.write(p.stdin, "1\n")
    unistd.close(p.stdin)
    p.stdin = nil
    local how, status = waitexit(p.pid, 20)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(0, status)
    assert.equal("0\n1\n", readfile(res))
    -- and once it is done, the joblog is free again
    code, out, err = lpar(("--joblog %s -o %s %s -"):format(log, res2, echo), "x\n")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("", out)
  end)
end)

describe("lpar stopped by a signal that reached a worker first", function()
  it("records no failure for the item, exits as for the signal, and resumes it", function()
    local items = writefile(tmpname(), "a\nstop\nc\n")
    local log, res, flag = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    os.remove(flag)
    local args = ("--joblog %s -o %s %s %s %s"):format(log, res, FIX .. "stopped.lua", items, flag)
    for _, j in ipairs({"-j1", "-j2 --chunk 1", "-j1 --retries 2"}) do
      os.remove(flag)
      local code, out, err = lpar(j .. " " .. args)
      assert.equal(143, code, err)
      assert.equal("", out)
      assert.equal("lpar: terminated\n", err)
      assert.is_nil(readfile(log):find("\tfailed\t"))
      code, out, err = lpar(j .. " --resume " .. args)
      assert.equal("", err)
      assert.equal(0, code)
      assert.equal("", out)
      assert.equal("a\nstop\nc\n", readfile(res))
      assert.is_nil(readfile(log):find("\tfailed\t"))
    end
  end)
end)

describe("lpar retrying an item", function()
  it("runs it in a worker that SIGTERM and SIGINT still reach", function()
    local flag = tmpname()
    os.remove(flag)
    local code, out, err = lpar("-j1 --retries 1 -e " .. quote([[
      local flag = arg[2]
      return function(s)
        if not io.open(flag) then
          assert(io.open(flag, "w")):close()
          os.exit(3)
        end
        local f = assert(io.open("/proc/self/status"))
        local blocked = f:read("*a"):match("SigBlk:%s*(%x+)")
        f:close()
        return s .. " " .. blocked
      end]]) .. " - " .. flag, "a\n")
    assert.equal("", err)
    assert.equal(0, code)
    local mask = tonumber(out:match("^a (%x+)\n$"), 16)
    assert.is_not_nil(mask, out)
    for _, sig in ipairs({signal.SIGHUP, signal.SIGINT, signal.SIGTERM}) do
      assert.equal(0, mask >> (sig - 1) & 1, "signal " .. sig .. " blocked: " .. out)
    end
  end)
end)

describe("lpar --resume and a joblog that is not lpar's", function()
  local echo = FIX .. "echo.lua"
  local items, log, res, good

  before_each(function()
    items, log, res = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    writefile(items, "a\nb\nc\n")
    local code, _, err = lpar(("--joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal(0, code, err)
    good = readfile(log)
    assert.matches("\n# out 12 3 %x+\n$", good)
  end)

  -- Resuming from a joblog holding 'text' is refused at line 'line'.
  local function refused(text, line)
    writefile(log, text)
    writefile(res, "precious\n")
    local code, out, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal(2, code, ("%q: %s"):format(text, err))
    assert.equal("", out)
    assert.matches("^lpar: bad joblog " .. log:gsub("%p", "%%%0") .. ", line " .. line .. ": [^\n]+\n$", err)
    assert.equal(text, readfile(log))
    assert.equal("precious\n", readfile(res))
  end

  it("refuses one without lpar's first line, naming the joblog and line 1", function()
    refused("Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n" ..
            "1\t:\t1700000000.000\t0.002\t0\t2\t0\t0\techo a\n", 1)
    refused("\1\2\255 some binary\0", 1)
    refused("hello\n", 1)
    refused("# lpar joblog 4\n" .. good:gsub("^[^\n]*\n", ""), 1)
    refused("# lpar joblog\n", 1)
    refused((good:gsub("\n", "\r\n")), 1)
  end)

  it("refuses a damaged header or item line, naming it", function()
    refused(good:gsub("\n# line\tstatus\tseconds\tattempts\tstart\thost\terror\n", "\n# line status\n"), 7)
    refused(good:gsub("\n# split: lines\n", "\nsplit: lines\n"), 4)
    refused(good:gsub("\n2\tok\t", "\n2\tfine\t"), 9)
    refused(good:gsub("\n2\tok\t", "\n2 ok\t"), 9)
  end)

  it("refuses a mark that is malformed or goes back, naming its line", function()
    local n = select(2, good:gsub("\n", "")) + 1
    for _, mark in ipairs({"# out abc def", "# out -5 3", "# out 1e3 3", "# out 0x10 3",
                           "# out 4 nan", "# out 4", "# out 4 3", "# out 12 2", "#out 12 3",
                           "# out 12 3 ", "# out  12 3", "# out 4 3 0123456789abcdef",
                           "# out 12 2 0123456789abcdef", "# out 12 3 0123456789ABCDEF",
                           "# out 12 3 0123456789abcde", "# out 12 3  0123456789abcdef",
                           "# out 12 3 0123456789abcdef0"}) do
      refused(good .. mark .. "\n", n)
    end
  end)

  -- Resuming from 'text' with the results 'out' is refused: the message
  -- 'why' (a pattern) naming joblog line 'line'; both files untouched.
  local function disagrees(text, out, line, why)
    writefile(log, text)
    writefile(res, out)
    local code, stdout, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal(2, code, err)
    assert.equal("", stdout)
    assert.matches("^lpar: bad joblog " .. log:gsub("%p", "%%%0") .. ", line " .. line .. ": " ..
                   why:format(res:gsub("%p", "%%%0")) .. " %(\"# out [^\n]*\"%)\n$", err)
    assert.equal(text, readfile(log))
    assert.equal(out, readfile(res))
  end

  it("refuses a mark that does not agree with the output's bytes, naming its line", function()
    local n = select(2, good:gsub("\n", ""))
    local mark = good:match("# out 12 3 (%x+)\n$")
    local res3 = "1:a\n1:b\n1:c\n"
    local differs = "the mark does not agree with the bytes of %s"
    -- the line count lowered, the bytes kept: the last line would be written twice
    disagrees(good:gsub("# out 12 3 ", "# out 12 2 "), res3, n, differs)
    -- no bytes for all three lines: their results would be lost
    disagrees(good:gsub("# out 12 3 ", "# out 0 3 "), res3, n, differs)
    -- the output edited, or cut short
    disagrees(good, "1:a\n1:X\n1:c\n", n, differs)
    disagrees(good, "1:a\n", n, "%s holds fewer bytes than the mark counts")
    -- an earlier mark is checked too
    local two = H.mark("1:a\n1:b\n", 2)
    disagrees(good:gsub("\n3\tok\t", "\n" .. two:gsub("2 (%x+)$", "1 %1") .. "\n3\tok\t"), res3, n - 1, differs)
    -- one that agrees is taken
    writefile(log, (good:gsub("\n3\tok\t[^\n]*\n# out 12 3 " .. mark .. "\n$", "\n" .. two .. "\n")))
    writefile(res, "1:a\n1:b\nlost\n")
    local code, _, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal(res3, readfile(res))
    assert.matches("\n# out 12 3 " .. mark .. "\n$", readfile(log))
  end)

  it("refuses a joblog of format 2, whose marks carry no hash", function()
    local old = good:gsub("^# lpar joblog 3\n", "# lpar joblog 2\n"):gsub("(# out %d+ %d+) %x+\n", "%1\n")
    writefile(log, old)
    writefile(res, "1:a\n1:b\n1:c\n")
    local code, out, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal(("lpar: cannot resume from %s: it was written by an older lpar (joblog format 2, " ..
                  "whose marks carry no hash of the output): run afresh without --resume\n"):format(log), err)
    assert.equal(old, readfile(log))
  end)

  it("starts afresh from an empty joblog or a first line cut short", function()
    for _, text in ipairs({"", "# lpar jo"}) do
      writefile(log, text)
      writefile(res, "old\n")
      local code, _, err = lpar(("--resume --joblog %s -o %s %s %s"):format(log, res, echo, items))
      assert.equal("", err)
      assert.equal(0, code)
      assert.equal("1:a\n1:b\n1:c\n", readfile(res))
    end
  end)
end)

describe("lpar --resume and an items file that grew from within its last line", function()
  local log, res, items
  before_each(function()
    log, res, items = tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
  end)

  local function run(opts)
    return lpar(("%s --joblog %s -o %s %s %s"):format(opts, log, res, FIX .. "echo.lua", items))
  end

  it("refuses it when that line ran, with newlines, -0 and a CR", function()
    for _, case in ipairs({{"", "1\n2\n3", "33\n4\n"}, {"-0", "1\0002\0003", "33\0004\0"},
                           {"", "1\n2\n3\r", "\n4\n"}}) do
      os.remove(log)
      writefile(items, case[2])
      local code, _, err = run(case[1])
      assert.equal(0, code, err)
      local before, out = readfile(log), readfile(res)
      writefile(items, case[2] .. case[3])
      code, _, err = run("--resume " .. case[1])
      assert.equal(2, code, err)
      assert.equal(("lpar: cannot resume from %s: the items file grew from within line 3, " ..
                    "which ran as it was then\n"):format(log), err)
      assert.equal(before, readfile(log))
      assert.equal(out, readfile(res))
    end
  end)

  it("resumes it when that line had not run yet", function()
    writefile(items, "1\n2\n3")
    local code, _, err = run("")
    assert.equal(0, code, err)
    -- as if stopped after line 2
    writefile(log, (readfile(log):gsub("3\tok\t[^\n]*\n# out %d+ 3 %x+\n$", H.mark("1:1\n1:2\n", 2) .. "\n")))
    writefile(res, "1:1\n1:2\n")
    assert.matches("# out 8 2 %x+\n$", readfile(log))
    writefile(items, "1\n2\n33\n4\n")
    code, _, err = run("--resume")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:1\n1:2\n2:33\n1:4\n", readfile(res))
  end)
end)

describe("lpar started with stdin, stdout or stderr closed", function()
  local items

  before_each(function()
    items = writefile(tmpname(), "a\nb\nc\n")
  end)

  local function sh(args, redir)
    return H.run(("timeout -k 5 30 %s %s %s"):format(quote(H.cli), args, redir))
  end

  it("keeps what workers print out of the -o file (stderr closed)", function()
    local res = tmpname()
    local code = sh("-o " .. res .. " -e " ..
                    quote('function(s) print("chatter") io.stderr:write("noise\\n") return s end') ..
                    " - <" .. items, "2>&-")
    assert.equal(0, code)
    assert.equal("a\nb\nc\n", readfile(res))
  end)

  it("keeps failures out of the joblog (stderr closed)", function()
    local log = tmpname()
    os.remove(log)
    local code = sh("--joblog " .. log .. " -e " .. quote('function(s) error("bad " .. s) end') ..
                    " - <" .. items, "2>&-")
    assert.equal(1, code)
    local text = readfile(log)
    assert.is_nil(text:find("lpar: line", 1, true), text)
    assert.is_nil(text:find("traceback", 1, true), text)
    -- (the error column holds each error's first line)
    assert.equal(3, select(2, text:gsub("\t:\t%(command line%):1: bad %a\n", "")))
    assert.equal(3, select(2, text:gsub("\n%d\tfailed\t", "")))
  end)

  it("writes -o with stdout closed, and fails loudly on a closed stdin or stdout", function()
    local res = writefile(tmpname(), "precious\n")
    local code, _, err = sh("-o " .. res .. " " .. FIX .. "echo.lua " .. items, ">&-")
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("1:a\n1:b\n1:c\n", readfile(res))
    code, _, err = sh(FIX .. "echo.lua " .. items, ">&-")
    assert.equal(1, code)
    assert.equal("lpar: cannot write the output: Bad file descriptor\n", err)
    code, _, err = sh(FIX .. "echo.lua", "<&-")
    assert.equal(1, code)
    assert.equal("lpar: cannot read the items: Bad file descriptor\n", err)
  end)
end)

describe("lpar writing to a pipe that nobody reads", function()
  for _, s in ipairs({{"SIGTERM", 143, "terminated"}, {"SIGINT", 130, "interrupted"},
                      {"SIGHUP", 129, "hangup"}}) do
    it("stops on " .. s[1] .. " with its workers", function()
      local pids = tmpname()
      os.remove(pids)
      -- results of 100 KB: more than the pipe holds
      local p = spawn({"-j2", "--chunk", "1", "-e", [[
        local log = arg[2]
        return {
          init = function()
            local f = assert(io.open(log, "a"))
            f:write(require("posix.unistd").getpid(), "\n")
            f:close()
          end,
          map = function(s) return ("z"):rep(100000) .. s end,
        }]], "-", pids})
      local items = {}
      for i = 1, 1000 do items[i] = i end
      unistd.write(p.stdin, table.concat(items, "\n") .. "\n")
      unistd.close(p.stdin)
      p.stdin = nil
      -- it writes: read 150 KB of it, then read no more
      local got, ok = readuntil(p.stdout, function(t) return #t >= 150000 end, 30)
      assert.is_true(ok, #got .. " bytes")
      H.sleep(1) -- time to fill the pipe (the stop must not depend on it)
      signal.kill(p.pid, signal[s[1]])
      local how, code = waitexit(p.pid, 20)
      local err = readuntil(p.stderr, function() return false end, 0.2)
      closeall(p)
      assert.equal("exited", how, "still blocked 20 s after " .. s[1])
      assert.equal(s[2], code)
      assert.equal("lpar: " .. s[3] .. "\n", err)
      for _, pid in ipairs(pidsof(pids)) do assert.is_false(H.alive(pid), "worker " .. pid) end
    end)
  end
end)

describe("lpar --resume and a joblog that is not a regular file", function()
  it("refuses it at once, naming it and what it is", function()
    local dir = H.tmpdir()
    local fifo = dir .. "/fifo"
    assert(os.execute("mkfifo " .. quote(fifo)))
    local res = writefile(dir .. "/res", "precious\n")
    for _, j in ipairs({{"/dev/zero", "character device"}, {"/dev/urandom", "character device"},
                        {fifo, "fifo"}, {dir, "directory"}}) do
      local code, out, err = lpar(("--resume --joblog %s -o %s %s -"):format(j[1], res, FIX .. "echo.lua"),
                                  "a\n")
      assert.equal(2, code, j[1] .. ": " .. err)
      assert.equal("", out)
      assert.equal(("lpar: cannot resume from %s: it is a %s, not a regular file\n"):format(j[1], j[2]), err)
      assert.equal("precious\n", readfile(res))
    end
    H.rmdir(dir)
  end)
end)

describe("lpar and the files of another run", function()
  it("refuses -o or --joblog naming a file another run writes, touching nothing", function()
    local log, res = tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    local p = spawn({"-j1", "--joblog", log, "-o", res, FIX .. "sleepy.lua", "-"})
    unistd.write(p.stdin, "0\n")
    local deadline = H.now() + 20
    while not (readfile(log) or ""):find("# out") and H.now() < deadline do H.sleep(0.01) end
    assert.matches("\n# out 2 1 %x+\n$", readfile(log))
    local before, out = readfile(log), readfile(res)
    local items = writefile(tmpname(), "x\n")
    for _, args in ipairs({{"-o " .. log, log}, {"--joblog " .. res, res},
                           {"--joblog " .. tmpname() .. " -o " .. res, res},
                           {"--resume --joblog " .. tmpname() .. " -o " .. res, res}}) do
      local code, o, err = lpar(("%s %s %s"):format(args[1], FIX .. "echo.lua", items))
      assert.equal(2, code, args[1])
      assert.equal("", o)
      assert.equal(("lpar: %s is in use by another lpar run\n"):format(args[2]), err)
      assert.equal(before, readfile(log))
      assert.equal(out, readfile(res))
    end
    unistd.write(p.stdin, "1\n")
    unistd.close(p.stdin)
    p.stdin = nil
    local how, status = waitexit(p.pid, 20)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(0, status)
    assert.equal("0\n1\n", readfile(res))
    -- free again once it is done
    local code, _, err = lpar(("-o %s %s %s"):format(log, FIX .. "echo.lua", items))
    assert.equal("", err)
    assert.equal(0, code)
  end)
end)

describe("lpar -o naming a file that cannot be cut", function()
  it("says why, not that it is shorter than a joblog says", function()
    local code, out, err = lpar("-o /proc/version " .. FIX .. "echo.lua -", "a\n")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^lpar: cannot write /proc/version: [^\n]+\n$", err)
    assert.is_nil(err:find("joblog", 1, true), err)
  end)
end)

describe("lpar and files that are one, pipes and the script included", function()
  it("refuses the script as its own items file, by any name", function()
    local script = writefile(tmpname(), "return function(s) return s end\n")
    local link = tmpname()
    os.remove(link)
    assert(os.execute(("ln -s %s %s"):format(script, link)))
    for _, args in ipairs({script .. " " .. script, script .. " " .. link,
                           script .. " - <" .. script, "-a " .. link .. " " .. script}) do
      local code, out, err = lpar(args)
      assert.equal(2, code, args)
      assert.equal("", out)
      assert.equal(("lpar: the script is also the items file (%s)\n"):format(script), err)
    end
  end)

  it("refuses a joblog that is the pipe the results go to", function()
    local items = writefile(tmpname(), "a\nb\n")
    local code, out, err = H.run(("timeout -k 5 30 %s --joblog /dev/stdout %s %s | cat")
                                 :format(quote(H.cli), FIX .. "echo.lua", items))
    assert.equal(0, code) -- cat's
    assert.equal("", out)
    assert.equal("lpar: the standard output is the joblog\n", err)
    -- the joblog on a pipe of its own is fine
    code, out, err = H.run(("timeout -k 5 30 %s --joblog /dev/stderr %s %s 2>&1 >/dev/null | cat")
                           :format(quote(H.cli), FIX .. "echo.lua", items))
    assert.equal(0, code)
    assert.matches("^# lpar joblog 3\n", out)
    assert.equal("", err)
  end)
end)

describe("lpar's messages for a worker that exits in init and an endless item", function()
  it("calls a worker leaving in init a failed init, exit 2", function()
    local code, out, err = lpar("-e " .. quote("return {init = function() os.exit(5) end, " ..
                                               "map = function(s) return s end}") .. " -", "a\nb\n")
    assert.equal(2, code, err)
    assert.equal("", out)
    assert.matches("^lpar: worker init failed: worker %d+ exited with status 5\n$", err)
    local rc, pout, perr = H.lua([[
      local lpar = require "lpar"
      print(pcall(lpar.parallel, function(s) return s end, {1, 2, 3},
                  {n_workers = 2, init = function() os.exit(5) end}))
      print(pcall(lpar.pool, {n_workers = 2, init = function() os.exit(5) end}))
    ]])
    assert.equal(0, rc, perr)
    assert.matches("^false\tworker init failed: worker %d+ exited with status 5\n" ..
                   "false\tworker init failed: worker %d+ exited with status 5\n$", pout)
  end)

  it("reports an item too long for memory without lpar's own source lines", function()
    if os.getenv("ASAN_OPTIONS") then return end -- a sanitizer build cannot run under ulimit -v
    local code, out, err = H.run(("ulimit -v 400000; timeout -k 5 30 %s %s /dev/zero")
                                 :format(quote(H.cli), FIX .. "echo.lua"))
    assert.equal(1, code, err)
    assert.equal("", out)
    assert.matches("^lpar: line 1 is too long: %d+ bytes read and no end yet, over the %d+ bytes " ..
                   "one record may take %(a quarter of the address space left under ulimit %-v%)\n$", err)
  end)
end)

describe("lpar and hooks that hang or die", function()
  it("ends an init that never returns, with --timeout", function()
    local code, out, err = lpar("--timeout 0.5 -e " .. quote(
      "return {init = function() while true do end end, map = function(s) return s end}") .. " -",
      "a\nb\n")
    assert.equal(2, code, err)
    assert.equal("", out)
    assert.matches("lpar: worker init timed out after 0.5 s\n$", err)
  end)

  it("reports a close that leaves with os.exit(7), after all the results", function()
    local code, out, err = lpar("-j2 -e " .. quote(
      "return {close = function() os.exit(7) end, map = function(s) return s end}") .. " -",
      "a\nb\nc\n")
    assert.equal(0, code, err)
    assert.equal("a\nb\nc\n", out)
    assert.matches("^lpar: worker %d+: close failed: exited with status 7\n", err)
    assert.is_nil(err:gsub("lpar: worker %d+: close failed: exited with status 7\n", ""):find("%S"))
  end)

  it("reports the same in parallel and in a pool", function()
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      local _, n = lpar.parallel(function(s) return s end, {1, 2, 3},
                                 {n_workers = 1, close = function() os.exit(7) end})
      local p = lpar.pool({n_workers = 1, close = function() os.exit(7) end})
      local _, m = p:map(function(s) return s end, {1, 2})
      p:close()
      print(n, m)
    ]])
    assert.equal(0, rc, err)
    assert.equal("3\t2\n", out)
    assert.matches("^lpar: worker %d+: close failed: exited with status 7\n" ..
                   "lpar: pool worker %d+: close failed: exited with status 7\n$", err)
  end)
end)

describe("the message of a record's failure", function()
  local quoted = FIX .. "quoted.lua"

  -- lpar's message for the one failing record among "a", 'rec', "c"
  local function said(args, rec)
    local code, out, err = lpar(args .. " " .. quoted .. " -", "a\n" .. rec .. "\nc\n")
    assert.equal(1, code, err)
    assert.equal("a\nc\n", out)
    return (err:match("^([^\n]*)\nlpar: 1 of 3 items failed\n$"))
  end

  it("quotes the record of a worker killed by a signal", function()
    assert.matches('^lpar: line 2 %("kill me"%): worker %d+ killed by signal 9',
                   said("-j2", "kill me"))
  end)

  it("quotes the record of a worker that exits", function()
    assert.matches('^lpar: line 2 %("exit 3"%): worker %d+ exited with status 3$',
                   said("-j2", "exit 3"))
  end)

  it("quotes the record of a timeout", function()
    assert.equal('lpar: line 2 ("spin \\t"): timed out after 0.5 s',
                 said("-j2 --timeout 0.5", "spin \t"))
  end)

  it("quotes the record that ran past --max-memory", function()
    assert.matches('^lpar: line 2 %("hog"%): not enough memory %(limit 32M%)',
                   said("-j2 --max-memory 32M", "hog"))
  end)

  it("quotes a long record shortened, as for a Lua error", function()
    local rec = "spin " .. ("x"):rep(100)
    assert.equal(('lpar: line 2 ("%s"...): timed out after 0.5 s'):format(rec:sub(1, 40)),
                 said("-j2 --timeout 0.5", rec))
  end)
end)

describe("a host whose agent announces too many workers", function()
  -- an agent (run by -S as its command) whose HELLO announces arg[1]
  -- workers, on the Lua arg[2] names as lpar does (504, 9501 for LuaJIT),
  -- then waits for its end of file
  local AGENT = [[
local name = "lpar 0.1.0" .. ("\0"):rep(22)
local hello = "LPAR" .. string.pack("<I4I4I4I4", 1, tonumber(arg[2]), 8, 8) .. name
io.stdout:write(string.pack("<I4I4I8", 8, tonumber(arg[1]), #hello), hello, "\n")
io.stdout:flush()
io.stdin:read("a")
]]

  for _, n in ipairs({"1000000", "4294967295"}) do
    it("is refused naming the count and the limit (" .. n .. ")", function()
      local agent = writefile(tmpname(), AGENT)
      -- the Lua of the lpar under test
      local major, minor = H.clilua():match("^Lua (%d)%.(%d)$")
      local luanum = major and major * 100 + minor or 9501
      local code, out, err = lpar("-S " .. quote(("lua5.4 %s %s %d"):format(agent, n, luanum)) ..
                                  " -e " .. quote("function(s) return s end") .. " ::: a")
      assert.equal(1, code, err)
      assert.equal("", out)
      assert.matches("its agent announces " .. n .. " workers, more than 1024", err, 1, true)
    end)
  end
end)
