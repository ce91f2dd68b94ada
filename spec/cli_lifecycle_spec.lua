-- The lpar command's records as the engine's items: retries that run in
-- parallel, --halt soon that starts no record once it trips, and the
-- events of each record's life (--events).
local H = require "spec.helper"

local FIX = "spec/fixtures/cli/"

local tmpname = H.tmpfiles(after_each)

describe("lpar retries", function()
  it("runs the records it tries again in parallel", function()
    -- 20 records of 0.5 s that each fail once; a second try waits (up
    -- to 10 s) for another second try to run beside it
    local dir = H.tmpdir()
    assert(os.execute("mkdir " .. dir .. "/again"))
    local log = tmpname()
    local code, out, err = H.lpar(("-j4 --retries 1 --joblog %s %stogether.lua - %s")
                                  :format(log, FIX, dir), H.numbers(20), 120)
    H.rmdir(dir)
    assert.equal(0, code, err)
    local want = {}
    for i = 1, 20 do want[i] = i .. " together" end
    assert.same(want, H.lines(out))
    local logged = H.joblog(log)
    for n, r in ipairs(logged) do
      assert.equal(n, r.line)
      assert.equal("ok", r.status)
      assert.equal(2, r.attempt)
    end
    assert.equal(20, #logged)
  end)
end)

describe("lpar --halt soon", function()
  it("starts no record once it trips: at most the running ones fail past it", function()
    -- 1 000 quick lines, every fifth failing, -j2: the halt is known at
    -- the second failure; each of the two workers may be running one
    -- more record then
    for _ = 1, 3 do
      local log = tmpname()
      local code, _, err = H.lpar(("-j2 --halt soon,fail=2 --joblog %s %severyk.lua - 5")
                                  :format(log, FIX), H.numbers(1000), 60)
      assert.equal(1, code, err)
      assert.matches("lpar: stopped at line %d+ %(%-%-halt soon,fail=2: ", err)
      local failed = 0
      for _, t in ipairs(H.logged(log)) do
        if t[2] == "failed" then failed = failed + 1 end
      end
      assert.is_true(failed >= 2 and failed <= 4, failed .. " records failed")
    end
  end)
end)

describe("lpar --halt now", function()
  it("kills the records running when it trips, and --resume runs them", function()
    -- line 1 says it started, then waits (60 s at most) for a file; line 3
    -- fails once line 1 has started: lpar does not wait for line 1
    local started, go, log, out = tmpname(), tmpname(), tmpname(), tmpname()
    os.remove(started)
    os.remove(go)
    os.remove(out)
    local code = ([[function(s)
      local function await(p)
        local t = os.time() + 60
        while os.time() < t and not io.open(p) do os.execute("sleep 0.05") end
      end
      if s == "1" then
        io.open(%q, "w"):close()
        await(%q)
        return "one"
      end
      if s == "3" then await(%q) error("three") end
      return s
    end]]):format(started, go, started)
    local input = H.writefile(tmpname(), "1\n2\n3\n4\n")
    local args = ("-j3 --chunk 1 --joblog %s -o %s -e %s %s")
                 :format(log, out, H.quote(code), input)
    local t0 = os.time()
    local rc, _, err = H.lpar("--halt now,fail=1 " .. args, nil, 120)
    local took = os.time() - t0
    assert.equal(1, rc, err)
    assert.is_true(took < 45, took .. " s")
    assert.matches('lpar: line 3 %("3"%): .*three', err)
    assert.matches("stopped at line 3 %(%-%-halt now,fail=1: 1 failed of ", err)
    assert.not_matches("one", H.readfile(out) or "")
    for _, t in ipairs(H.logged(log)) do assert.is_true(t[1] ~= 1, "line 1 in the joblog") end
    -- line 1 was left unsettled: --resume runs it (and what follows it;
    -- line 3 fails again)
    H.writefile(go, "")
    rc, _, err = H.lpar("--resume " .. args, nil, 120)
    assert.equal(1, rc, err)
    assert.matches("lpar: 1 of 4 items failed", err)
    assert.equal("one\n2\n4\n", H.readfile(out))
  end)
end)

describe("lpar --halt soon, then --resume", function()
  -- Every third line fails; the run halts at the first failures, with
  -- records handed back or never started: the joblog's marks cover none
  -- of those, so that --resume writes what a whole run writes.
  local function resumed(opts, n)
    local input = H.writefile(tmpname(), H.numbers(n))
    local log, out = tmpname(), tmpname()
    local code, _, err = H.lpar(("-j2 %s --joblog %s -o %s %severyk.lua %s 3")
                                :format(opts, log, out, FIX, input), nil, 60)
    assert.equal(1, code, err)
    assert.matches("%-%-halt soon", err)
    code, _, err = H.lpar(("-j2 --resume --joblog %s -o %s %severyk.lua %s 3")
                          :format(log, out, FIX, input), nil, 60)
    assert.equal(1, code, err)
    local want = {}
    for i = 1, n do
      if i % 3 ~= 0 then want[#want + 1] = tostring(i) end
    end
    assert.same(want, H.lines(H.readfile(out)))
  end

  it("runs again the records after the failure in a run of one-record batches", function()
    resumed("--chunk 1 --halt soon,fail=1", 10)
  end)

  it("runs again the records a batch handed back", function()
    resumed("--halt soon,fail=2", 60)
  end)

  it("with --retries, counts a record whose retry did not run as neither failed nor done", function()
    -- fail=1 counts failures after their retries: a record that failed
    -- a try with a retry pending when the halt tripped has no joblog
    -- line (--resume runs it), and its last end event is that try's
    local input = H.writefile(tmpname(), H.numbers(60))
    for _ = 1, 3 do
      local log, out, evfile = tmpname(), tmpname(), tmpname()
      local code, _, err = H.lpar(("-j2 --retries 2 --halt soon,fail=1 --joblog %s --events %s -o %s " ..
                                   "%severyk.lua %s 3"):format(log, evfile, out, FIX, input), nil, 60)
      assert.equal(1, code, err)
      local logged = {}
      for _, r in ipairs(H.joblog(log)) do
        logged[r.line] = {r.status, r.attempt}
        if r.status == "failed" then assert.equal(3, r.attempt, "line " .. r.line) end
      end
      local last = {}
      for _, ev in ipairs(H.events(evfile)) do
        if ev.event == "end" then last[ev.item] = ev end
      end
      for item, ev in pairs(last) do
        local t = logged[item]
        if t then
          assert.same(t, {ev.status, ev.attempt}, "line " .. item)
        else
          assert.equal("failed", ev.status, "line " .. item)
          assert.is_true(ev.attempt < 3, "line " .. item)
        end
      end
      for item in pairs(logged) do assert.is_table(last[item], "line " .. item) end
      code, _, err = H.lpar(("--resume --retries 2 --joblog %s -o %s %severyk.lua %s 3")
                            :format(log, out, FIX, input), nil, 60)
      assert.equal(1, code, err)
      local want = {}
      for i = 1, 60 do
        if i % 3 ~= 0 then want[#want + 1] = tostring(i) end
      end
      assert.same(want, H.lines(H.readfile(out)))
    end
  end)
end)

describe("lpar --events", function()
  it("writes each record's start and end as JSON lines, as the joblog has them", function()
    local dir = H.tmpdir()
    local log, evfile = tmpname(), tmpname()
    -- flaky lines fail once and run again; 'bad' fails every try
    local input = "a\nflaky1\nbad\nb\nflaky2\n"
    local script = H.writefile(tmpname() .. ".lua", ([[
local inner = dofile(%q)
return function(s)
  if s == "bad" then error("always bad") end
  return inner(s)
end
]]):format(FIX .. "flaky.lua"))
    local code, out, err = H.lpar(("-j2 --retries 1 --joblog %s --events %s %s - %s")
                                  :format(log, evfile, script, dir), input, 60)
    H.rmdir(dir)
    assert.equal(1, code, err)
    assert.equal("a\nflaky1\nb\nflaky2\n", out)
    local logged = H.joblog(log)
    assert.equal(5, #logged)
    -- each record: a start, then an end, per try; its last end is its
    -- joblog line
    local open, last, n = {}, {}, 0
    for _, ev in ipairs(H.events(evfile)) do
      local l = ("%s %s"):format(ev.event, ev.item)
      assert.is_number(ev.item)
      assert.is_number(ev.attempt)
      assert.is_string(ev.host)
      if ev.event == "start" then
        assert.is_nil(open[ev.item], l)
        open[ev.item] = ev.attempt
      else
        assert.equal("end", ev.event, l)
        assert.equal(open[ev.item], ev.attempt, l)
        assert.is_number(ev.seconds)
        open[ev.item] = nil
        if last[ev.item] == nil then n = n + 1 end
        last[ev.item] = ev
      end
    end
    assert.equal(5, n)
    for _, t in ipairs(logged) do
      local ev = last[t.line]
      assert.equal(t.status, ev.status)
      assert.equal(t.attempt, ev.attempt)
      assert.equal(t.host, ev.host)
      assert.equal(("%.6f"):format(t.seconds), ("%.6f"):format(ev.seconds))
    end
    assert.same({1, 2, 2, 1, 2}, {last[1].attempt, last[2].attempt, last[3].attempt,
                                  last[4].attempt, last[5].attempt})
    assert.equal("failed", last[3].status)
    assert.equal("error", last[3].kind)
    assert.equal("always bad", last[3].error:match("always bad"))
  end)

  it("says lost, and the kind, for a record whose worker died", function()
    local evfile = tmpname()
    local code, out, err = H.lpar(("-j1 --events %s %sdie.lua -"):format(evfile, FIX), "a\nexit\nb\n", 60)
    assert.equal(1, code, err)
    assert.equal("a\nb\n", out)
    local ends = {}
    for _, ev in ipairs(H.events(evfile)) do
      if ev.event == "end" then ends[ev.item] = ev end
    end
    assert.equal("ok", ends[1].status)
    assert.equal("lost", ends[2].status)
    assert.equal("exit", ends[2].kind)
    assert.matches("exited with status 3", ends[2].error)
    assert.equal("ok", ends[3].status)
  end)

  it("goes on after a torn line when a run killed with SIGKILL is resumed", function()
    local signal = require "posix.signal"
    local input = H.writefile(tmpname(), H.numbers(20000))
    local evfile, log, out = tmpname(), tmpname(), tmpname()
    os.remove(evfile)
    local args = {"-j2", "--chunk", "1", "--events", evfile, "--joblog", log, "-o", out,
                  "-e", "function(s) return s end", input}
    local p = H.spawncli(args)
    -- killed once the events file holds a few hundred lines
    local size = function()
      local f = io.open(evfile)
      if not f then return 0 end
      local n = f:seek("end")
      f:close()
      return n
    end
    local reached = H.waitfor(function() return size() >= 30000 end, 60)
    signal.kill(p.pid, signal.SIGKILL)
    H.waitexit(p.pid, 30)
    H.closeall(p)
    assert.is_true(reached, "the events file stayed at " .. size() .. " bytes")
    -- the kill tears the last line, unless it fell between two writes:
    -- then a fragment as such a write leaves it stands in
    local text = H.readfile(evfile)
    if text:sub(-1) == "\n" then
      local f = assert(io.open(evfile, "a"))
      f:write('{"item":')
      f:close()
    end
    local quoted = {"--resume"}
    for i, a in ipairs(args) do quoted[i + 1] = H.quote(a) end
    local code, _, err = H.lpar(table.concat(quoted, " "), nil, 120)
    assert.equal(0, code, err)
    assert.equal(H.readfile(input), H.readfile(out))
    -- every line JSON (else the error names it)
    local ok, evs = pcall(H.events, evfile)
    assert.is_true(ok, evs)
    for _, ev in ipairs(evs) do assert.is_number(ev.item) end
    assert.equal("\n", H.readfile(evfile):sub(-1))
    assert.is_true(#evs > 20000)
  end)

  it("gives each record its own start in ordered output, not when its result came out", function()
    -- line 1 takes 5 s on one worker; the other worker runs lines 2-10
    -- meanwhile, though their results come out after line 1's
    local log, evfile = tmpname(), tmpname()
    local input = H.writefile(tmpname(), H.numbers(10))
    local code, out, err = H.lpar(("-j2 --chunk 1 --joblog %s --events %s -e %s %s")
                                  :format(log, evfile, H.quote(
                                    'function(s) if s == "1" then os.execute("sleep 5") end return s end'),
                                    input), nil, 60)
    assert.equal(0, code, err)
    assert.equal(H.readfile(input), out)
    local start, secs = {}, {}
    for _, r in ipairs(H.joblog(log)) do
      if r.status == "ok" and r.attempt == 1 then start[r.line], secs[r.line] = r.start, r.seconds end
    end
    assert.is_true(secs[1] >= 4.5, "line 1 took " .. tostring(secs[1]))
    local ended1 = start[1] + secs[1]
    for k = 2, 10 do
      assert.is_true(start[k] < ended1 - 2, ("line %d started at %.3f, line 1 ended at %.3f")
                     :format(k, start[k], ended1))
    end
    for _, ev in ipairs(H.events(evfile)) do
      if ev.event == "start" then
        assert.equal(("%.3f"):format(start[ev.item]), ("%.3f"):format(ev.time))
      end
    end
  end)

  it("refuses a file that is also the joblog or the output", function()
    local f = tmpname()
    for _, opt in ipairs({"--joblog", "-o"}) do
      local code, _, err = H.lpar(("--events %s %s %s %supper.lua -"):format(f, opt, f, FIX), "a\n", 30)
      assert.equal(2, code)
      assert.matches("lpar: %-%-events and " .. opt:gsub("%-", "%%-") .. " name one file", err)
    end
  end)

  it("gives the seconds of records run on a host", function()
    -- a host whose agent runs on this machine ('env' as its command)
    local ev = tmpname()
    local spin = "function(s) local t = os.clock() while os.clock() - t < 0.2 do end return s end"
    local code, out, err = H.lpar(("-S 1/env --remote-lpar %s --events %s -e %s -")
                                  :format(H.quote(H.cli), ev, H.quote(spin)), "a\nb\n", 60)
    assert.equal(0, code, err)
    assert.equal("a\nb\n", out)
    local ends = 0
    for secs in H.readfile(ev):gmatch('"event":"end".-"seconds":([%d.]+)') do
      ends = ends + 1
      assert.is_true(tonumber(secs) >= 0.1, secs)
    end
    assert.equal(2, ends)
  end)

  it("fails the run, naming the file, when its events cannot be written", function()
    local code, out, err = H.lpar(("--events /dev/full %supper.lua -"):format(FIX), "a\nb\n", 30)
    assert.equal(1, code)
    assert.equal("A\nB\n", out)
    assert.matches("lpar: cannot write /dev/full: ", err, 1, true)
  end)
end)

describe("lpar started with SIGINT ignored", function()
  it("runs on through a SIGINT that comes while it waits for a record", function()
    local signal = require "posix.signal"
    local started, go = tmpname(), tmpname()
    os.remove(started)
    os.remove(go)
    local input = H.writefile(tmpname(), "1\n2\n3\n")
    -- record 2 says it started, then waits (30 s at most) to be told to go
    local code = ([[function(s)
      if s == "2" then
        io.open(%q, "w"):close()
        local t = os.time() + 30
        while not io.open(%q) and os.time() < t do os.execute("sleep 0.05") end
      end
      return s
    end]]):format(started, go)
    local out = tmpname()
    -- the shell ignores SIGINT before it runs lpar, as '&' in a script does
    local p = H.spawncli({"-j2", "-o", out, "-e", code, input}, "trap '' INT;")
    local began = H.waitfor(function() return io.open(started) ~= nil end, 60)
    -- lpar waits for record 2's result: the signal it ignores stays ignored
    signal.kill(p.pid, signal.SIGINT)
    H.writefile(go, "")
    local how, status = H.waitexit(p.pid, 60)
    H.closeall(p)
    assert.is_true(began)
    assert.equal("exited", how)
    assert.equal(0, status)
    assert.equal("1\n2\n3\n", H.readfile(out))
  end)
end)
