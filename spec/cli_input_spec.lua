-- The CLI's input: an endless line, a record too large for the memory,
-- the memory a long line costs, and regular files that the workers read
-- themselves (byte ranges) giving what a pipe of the same bytes gives.
local H = require "spec.helper"
local signal = require "posix.signal"

local quote = H.quote
local writefile = H.writefile
local readfile = H.readfile
local waitexit = H.waitexit
local readuntil = H.readuntil
local closeall = H.closeall

local tmpname = H.tmpfiles(after_each)

-- status(pid, field): a number of /proc/<pid>/status (VmHWM, VmRSS in
-- kB), or nil; the scripts given to lpar load it too
local HWM = "spec/fixtures/cli/hwm.lua"
local status = dofile(HWM)

-- A new file of 'size' bytes of "y" as a line between the lines "a" and
-- "b" (written a megabyte at a time); returns its path.
local function longfile(size)
  local path = tmpname()
  local f = assert(io.open(path, "wb"))
  f:write("a\n")
  local chunk = ("y"):rep(1000 * 1000)
  for _ = 1, size / #chunk do f:write(chunk) end
  f:write("\nb\n")
  f:close()
  return path
end

-- Run lpar with 'args' over the bytes of 'items', from the file itself
-- (how "file") or through cat (how "pipe"), after the shell commands
-- 'pre' ("ulimit -v N; ") in lpar's shell and cat's; returns code,
-- stdout, stderr.
local function over(how, items, args, pre)
  pre = pre or ""
  local cmd = ("%s%s %s %s"):format(pre, quote(H.cli), args, how == "file" and quote(items) or "-")
  if how == "pipe" then cmd = ("%scat %s | (%s)"):format(pre, quote(items), cmd) end
  return H.run("timeout -k 5 60 sh -c " .. quote(cmd))
end

-- Run 'args' over 'items' through cat and from the file itself, and check
-- both give the same: code, stdout and stderr.
local function both(items, args, code, out, err)
  for _, how in ipairs({"pipe", "file"}) do
    local c, o, e = over(how, items, args)
    assert.equal(code, c, how .. ": " .. e)
    assert.equal(out, o, how)
    assert.equal(err, e, how)
  end
end

describe("lpar reading an endless line", function()
  -- Signal lpar while it reads /dev/zero, once it holds 2.2 GB of it
  -- (its VmRSS; less on a machine with less than 8 GB available, where
  -- a record may not take that much): the reader looks at signals
  -- between reads of a few MiB and grows its buffer without copying it,
  -- so lpar is gone within 5 s of the signal (a reader that copied or
  -- read gigabytes at once took up to 20 s). The address space is
  -- capped (12 GB) so that a reader that ignores the signal cannot take
  -- the machine (not in a sanitizer build, which cannot run under ulimit
  -- -v).
  local function stopwhilereading(sig)
    local cap = not os.getenv("ASAN_OPTIONS") and "ulimit -v 12000000;" or nil
    local avail = tonumber((readfile("/proc/meminfo") or ""):match("MemAvailable:%s*(%d+)")) or 0
    local want = math.max(65536, math.min(2200000, math.floor(avail / 4)))
    local p = H.spawncli({"-e", "function(s) return #s end", "/dev/zero"}, cap)
    local function rss() return status(p.pid, "VmRSS") or 0 end
    local deadline = H.now() + 60
    while rss() < want and H.now() < deadline do H.sleep(0.01) end
    assert.is_true(rss() >= want, "lpar did not read " .. want .. " kB of /dev/zero")
    signal.kill(p.pid, sig)
    local how, code = waitexit(p.pid, 5) -- nil: still running (killed)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    return how, code, err
  end

  it("stops on SIGINT with status 130", function()
    local how, code, err = stopwhilereading(signal.SIGINT)
    assert.equal("exited", how)
    assert.equal(130, code)
    assert.equal("lpar: interrupted\n", err)
  end)

  it("stops on SIGTERM with status 143", function()
    local how, code, err = stopwhilereading(signal.SIGTERM)
    assert.equal("exited", how)
    assert.equal(143, code)
    assert.equal("lpar: terminated\n", err)
  end)

  it("fails, naming the line, at a quarter of the address space left", function()
    if os.getenv("ASAN_OPTIONS") then return end -- a sanitizer build cannot run under ulimit -v
    local p = H.spawncli({"-e", "function(s) return #s end", "/dev/zero"}, "ulimit -v 1000000;")
    local how, code = waitexit(p.pid, 30)
    local err = readuntil(p.stderr, function() return false end, 0.2)
    closeall(p)
    assert.equal("exited", how)
    assert.equal(1, code)
    local lim = tonumber(err:match("^lpar: line 1 is too long: %d+ bytes read and no end yet, over the (%d+) " ..
                                   "bytes one record may take %(a quarter of the address space left " ..
                                   "under ulimit %-v%)\n$"))
    assert.is_truthy(lim, err)
    -- a quarter of 1000000 kB, less what lpar takes besides the record
    assert.is_true(lim > 150 * 1000 * 1000 and lim < 256000000, err)
  end)

  -- A 200 MB line passed the old limit (half of ulimit -v, 204.8 MB)
  -- and then failed with a bare "not enough memory": a worker holds it
  -- twice besides its own code and heap, and a pipe's line is held
  -- more times still in lpar while it is sent.
  it("fails naming the line, not out of memory, when a worker could not hold it", function()
    if os.getenv("ASAN_OPTIONS") then return end -- a sanitizer build cannot run under ulimit -v
    local items = tmpname()
    local f = assert(io.open(items, "wb"))
    local chunk = ("z"):rep(1000 * 1000)
    for _ = 1, 200 do f:write(chunk) end
    f:write("\nshort\n")
    f:close()
    for _, how in ipairs({"file", "pipe"}) do
      local code, out, err = over(how, items, "-e 'function(s) return #s end'", "ulimit -v 400000; ")
      assert.equal(1, code, how .. ": " .. err)
      assert.equal("", out, how)
      assert.matches("^lpar: line 1 is too long: %d+ bytes read and no end yet, over the %d+ bytes one " ..
                     "record may take %(" .. (how == "file" and "half" or "a quarter") ..
                     " of the address space left under ulimit %-v%)\n$", err)
    end
  end)
end)

describe("lpar and a record too large for a worker's --max-memory", function()
  local big = ("x"):rep(12 * 1024 * 1024)

  -- The results of the lines before it are all written first, from a
  -- file as from a pipe (a file's run used to stop after a few of them).
  it("fails naming the line, from a file and from a pipe, after the lines before it", function()
    local items = tmpname()
    writefile(items, ("a\n"):rep(1000) .. big .. "\nc\n")
    both(items, "--max-memory 8M -e 'function(s) return s:upper() end'", 1, ("A\n"):rep(1000),
         "lpar: line 1001 is too long: 8388609 bytes read and no end yet, over the 8388608 " ..
         "bytes one record may take (--max-memory)\n")
  end)

  it("names the NUL-separated item with -0", function()
    local items = tmpname()
    writefile(items, "a\0" .. big)
    local code, _, err = H.lpar(("-0 --max-memory 8M -e 'function(s) return #s end' %s")
                                :format(quote(items)), nil)
    assert.equal(1, code)
    assert.matches("^lpar: item 2 is too long", err)
  end)
end)

describe("lpar and the memory of a long line", function()
  -- A piped line used to count twice in its worker's heap (the batch it
  -- came in and the record cut from it), a file's once: a 30 MB line
  -- failed from a pipe under --max-memory 64M.
  it("counts a piped line once in its worker's heap, as a file's", function()
    local items = tmpname()
    writefile(items, ("w"):rep(30 * 1000 * 1000) .. "\nb\n")
    both(items, "-j1 --max-memory 64M -e 'function(s) return #s end'", 0, "30000000\n1\n", "")
  end)

  it("holds a 200 MB line at most 2.5 times in each process, and a file's not in the parent", function()
    local script, size = tmpname(), 200 * 1000 * 1000
    local items = longfile(size)
    -- each record: its length, the worker's VmHWM and the parent's (kB)
    writefile(script, ([[
      local status = dofile(%q)
      return function(s)
        return ("%%d %%s %%s"):format(#s, status("self", "VmHWM"), status(status("self", "PPid"), "VmHWM"))
      end]]):format(HWM))
    -- a sanitizer build keeps freed memory in quarantine: there the bytes
    -- are checked, not the peaks
    local peaks = not os.getenv("ASAN_OPTIONS")
    local function atmost(kb, factor, what)
      if peaks then assert.is_true(tonumber(kb) * 1024 <= factor * size, what .. " VmHWM " .. kb .. " kB") end
    end
    local code, out, err = H.lpar(("-j1 %s %s"):format(script, items), nil)
    assert.equal(0, code, err)
    local n, worker, parent = out:match("^1 %d+ %d+\n(%d+) (%d+) (%d+)\n1 %d+ %d+\n$")
    assert.equal(tostring(size), n, out)
    atmost(worker, 2.5, "worker")
    -- the parent finds where records end; it never holds one
    atmost(parent, 0.5, "parent")
    -- from a pipe the parent reads the line and sends it; here it is the
    -- first line (the worker is forked while the parent holds it)
    code, out, err = H.run(("tail -c +3 %s | timeout -k 5 60 %s -j1 %s"):format(items, quote(H.cli), script))
    os.remove(items)
    assert.equal(0, code, err)
    n, worker, parent = out:match("^(%d+) (%d+) (%d+)\n1 %d+ %d+\n$")
    assert.equal(tostring(size), n, out)
    atmost(worker, 2.5, "worker (pipe)")
    atmost(parent, 2.5, "parent (pipe)")
  end)

  it("with --tag holds a 200 MB line at most 2.5 times in each process, from a file or a pipe", function()
    -- the output line holds the record: from a file the worker sends it
    -- with no concatenated copy, and the parent frees the frame it came
    -- in before writing it; from a pipe the parent, which holds the
    -- record, writes it as the tag before the result the worker sent
    local script, size = tmpname(), 200 * 1000 * 1000
    local items = longfile(size)
    -- each record: its length and the worker's VmHWM (kB); lpar's own
    -- VmHWM is read once it has ended, by a process it does not wait for
    writefile(script, ([[
      local status = dofile(%q)
      return function(s) return ("%%d %%s"):format(#s, status("self", "VmHWM")) end]]):format(HWM))
    local peaks = not os.getenv("ASAN_OPTIONS")
    local function atmost(kb, factor, what)
      if peaks then assert.is_true(tonumber(kb) * 1024 <= factor * size, what .. " VmHWM " .. kb .. " kB") end
    end
    for _, how in ipairs({"file", "pipe"}) do
      local out, hwm = tmpname(), tmpname()
      -- the shell waits for lpar and reads its VmHWM as a zombie cannot
      -- tell it: lpar's last record is read while it still runs
      local cmd = ("%s -j1 --tag %s %s > %s & p=$!; w=0; " ..
                   "while v=$(awk '/VmHWM/{print $2}' /proc/$p/status 2>/dev/null) && [ -n \"$v\" ]; " ..
                   "do w=$v; sleep 0.1; done; " ..
                   "wait $p; c=$?; echo $w > %s; exit $c")
                  :format(quote(H.cli), script, how == "file" and quote(items) or "-", quote(out), quote(hwm))
      -- (a command put in the background reads /dev/null unless told)
      if how == "pipe" then
        cmd = "tail -c +3 " .. quote(items) .. " | { exec 3<&0; " .. cmd:gsub(" %- > ", " - <&3 > ") .. "; }"
      end
      local code, _, err = H.run("timeout -k 5 120 sh -c " .. quote(cmd))
      assert.equal(0, code, how .. ": " .. err)
      local text = readfile(out)
      os.remove(out)
      local line, n = text:match("\n?(y+)\t(%d+) %d+\n")
      assert.equal(size, line and #line, how .. ": " .. #text .. " " .. text:sub(1, 40))
      assert.equal(tostring(size), n, how)
      -- the worker's peak as its next record finds it
      local worker = text:match("\nb\t1 (%d+)\n$")
      assert.is_truthy(worker, how)
      atmost(worker, 2.5, how .. ": worker")
      local parent = readfile(hwm):match("%d+")
      os.remove(hwm)
      assert.is_true(tonumber(parent) > 0, how)
      -- from a pipe the parent holds the line it sent until its result
      -- is in, and writes it as the tag itself (the worker sends the
      -- result alone): the line and its copy in the output
      atmost(parent, 2.5, how .. ": parent")
    end
    os.remove(items)
  end)

  it("holds each of several long lines in a row at most 2.5 times, in lpar and in its worker", function()
    -- two 100 MB lines, one worker, from a file and from a pipe, with
    -- --tag: the output lines hold them (before: 4 times in both). The
    -- worker says its VmHWM with each result; lpar's is read by the shell
    -- while it runs, to its end
    local script, size = tmpname(), 100 * 1000 * 1000
    local items = tmpname()
    local f = assert(io.open(items, "wb"))
    local chunk = ("y"):rep(1000 * 1000)
    for _ = 1, 2 do
      for _ = 1, size / #chunk do f:write(chunk) end
      f:write("\n")
    end
    f:write("z\n")
    f:close()
    writefile(script, ([[
      local status = dofile(%q)
      return function(s) return ("%%d %%s"):format(#s, status("self", "VmHWM")) end]]):format(HWM))
    local peaks = not os.getenv("ASAN_OPTIONS")
    for _, how in ipairs({"file", "pipe"}) do
      local out, hwm = tmpname(), tmpname()
      local run = ("%s -j1 --tag %s %s > %s & p=$!; w=0; " ..
                   "while v=$(awk '/VmHWM/{print $2}' /proc/$p/status 2>/dev/null) && [ -n \"$v\" ]; " ..
                   "do w=$v; sleep 0.05; done; wait $p; c=$?; echo $w > %s; exit $c")
                  :format(quote(H.cli), script, how == "file" and quote(items) or "- <&3", quote(out), quote(hwm))
      if how == "pipe" then run = "cat " .. quote(items) .. " | { exec 3<&0; " .. run .. "; }" end
      local code, _, err = H.run("timeout -k 5 120 sh -c " .. quote(run))
      assert.equal(0, code, how .. ": " .. err)
      local text = readfile(out)
      os.remove(out)
      local worker = text:match("\nz\t1 (%d+)\n$")
      assert.is_truthy(worker, how .. ": " .. #text)
      local n = 0
      for len in text:gmatch("\t(%d+) %d+\n") do
        if tonumber(len) == size then n = n + 1 end
      end
      assert.equal(2, n, how)
      local parent = tonumber(readfile(hwm):match("%d+"))
      os.remove(hwm)
      assert.is_true(parent > 0, how)
      if peaks then
        assert.is_true(tonumber(worker) * 1024 <= 2.5 * size, how .. ": worker VmHWM " .. worker .. " kB")
        assert.is_true(parent * 1024 <= 2.5 * size, how .. ": lpar VmHWM " .. parent .. " kB")
      end
    end
    os.remove(items)
  end)

  it("holds it at most 2.5 times in each worker with -j2 and several long lines in flight", function()
    -- a worker forked while lpar sends a long line to another does not
    -- map lpar's copy of it (each worker says its pid, the length of its
    -- record and its VmHWM in kB)
    local script = tmpname()
    local size = 200 * 1000 * 1000
    writefile(script, ([[
      local status = dofile(%q)
      local unistd = require "posix.unistd"
      local nanosleep = require("posix.time").nanosleep
      return function(s)
        if #s < 10 then nanosleep({tv_sec = 0, tv_nsec = 50000000}) end
        return ("%%d %%d %%s"):format(unistd.getpid(), #s, status("self", "VmHWM"))
      end]]):format(HWM))
    local long = ("head -c %d /dev/zero | tr '\\0' y"):format(size)
    -- a short line takes the worker 50 ms: worth a second worker, which
    -- lpar starts as soon as it has sent the first a long line
    local feed = ("{ printf 'a\\n'; %s; printf '\\nb\\nc\\n'; %s; printf '\\nd\\n'; %s; printf '\\n'; seq 5; }")
                 :format(long, long, long)
    local code, out, err = H.run(("%s | timeout -k 5 120 %s -j2 %s"):format(feed, quote(H.cli), script))
    assert.equal(0, code, err)
    -- a worker holds at most 2.5 times a line, and none before it gets one
    local peaks = not os.getenv("ASAN_OPTIONS")
    local hadlong, seen, longs, workers = {}, {}, 0, 0
    for pid, n, kb in out:gmatch("(%d+) (%d+) (%d+)\n") do
      local what = "worker " .. pid .. (hadlong[pid] and "" or " before a long line") .. ": VmHWM " .. kb .. " kB"
      if tonumber(n) == size then
        longs = longs + 1
        hadlong[pid] = true
      end
      if not seen[pid] then workers = workers + 1 end
      seen[pid] = true
      if peaks then assert.is_true(tonumber(kb) * 1024 <= (hadlong[pid] and 2.5 or 0.5) * size, what) end
    end
    assert.equal(3, longs, out)
    assert.equal(2, workers, out)
  end)
end)

describe("lpar and a long line from a pipe near --max-memory", function()
  -- The worker was forked while the parent held the line as a string in
  -- its Lua state, and counted that copy in its heap: it could not take
  -- the line under the limit and exited (status 3).
  it("runs a 40 MB line under --max-memory 64M (the parent's copy is not the worker's)", function()
    local items = tmpname()
    writefile(items, ("x"):rep(40 * 1000 * 1000) .. "\nb\n")
    both(items, "-j1 --max-memory 64M -e 'function(s) return #s end'", 0, "40000000\n1\n", "")
  end)

  -- A worker forked with a 10 MiB line in flight refused to start (the
  -- whole run stopped: "max_memory ... is below the ... the worker
  -- inherited"); now the line fails on its own and the run goes on.
  it("fails a 10 MiB line under --max-memory 10M alone, naming it and the limit", function()
    local items = tmpname()
    writefile(items, ("x"):rep(10 * 1024 * 1024) .. "\nb\n")
    both(items, "-j1 --max-memory 10M -e 'function(s) return #s end'", 1, "1\n",
         'lpar: line 1 ("' .. ("x"):rep(40) .. '"...): not enough memory (limit 10 MiB)\n' ..
         "lpar: 1 of 2 items failed\n")
  end)
end)

describe("lpar over a regular file (workers read it themselves)", function()
  local long = ("L"):rep(300 * 1024) -- longer than the parent's buffer
  local shapes = {
    {"plain", "a\nbb\nccc\n"},
    {"empty lines", "\n\na\n\n\nb\n\n"},
    {"no final newline", "a\nb\nlast"},
    {"CRLF", "a\r\nb\r\n\r\nc\r\nd"},
    {"empty", ""},
    {"one newline", "\n"},
    {"long lines", "a\n" .. long .. "\nb\n" .. long .. long .. "\n" .. long},
    {"long last line", "x\n" .. long .. long},
    {"NUL records", "a\0b\0\0c\nd\0" .. long .. "\0e"},
    {"fields", "a b c\nd  e\n\nf\n"},
  }
  local script = [['function(...) return table.concat({...}, "|") .. "<" .. select("#", ...) .. ">" end']]
  local optsets = {"", "-j1", "--chunk 1", "--number", "--colsep ' '", "--shard 2/3",
                   "--number --shard 1/2", "-0", "-0 --number", "-j3 --chunk 2"}

  it("gives what a pipe of the same bytes gives, on every shape", function()
    local items = tmpname()
    for _, shape in ipairs(shapes) do
      writefile(items, shape[2])
      for _, opts in ipairs(optsets) do
        local args = opts .. " -e " .. script
        local fc, fout, ferr = over("file", items, args)
        local pc, pout, perr = over("pipe", items, args)
        local what = shape[1] .. " with '" .. opts .. "'"
        assert.equal(pc, fc, what)
        assert.equal(pout, fout, what)
        assert.equal(perr, ferr, what)
      end
    end
  end)

  it("names the line of a failure as a pipe does, long lines and all", function()
    local items = tmpname()
    writefile(items, "a\n" .. long .. "\nboom\n" .. long .. "\nboom")
    local f = [['function(s) if s == "boom" then error("no") end return #s end']]
    local code, out, err = H.lpar(("--joblog /dev/null -e %s %s"):format(f, quote(items)), nil)
    assert.equal(1, code)
    assert.equal("1\n" .. #long .. "\n" .. #long .. "\n", out)
    assert.matches("line 3 %(\"boom\"%)", err)
    assert.matches("line 5 %(\"boom\"%)", err)
  end)

  it("resumes exactly once after kill -9, with --number", function()
    local items, log, res, mark = tmpname(), tmpname(), tmpname(), tmpname()
    os.remove(log)
    os.remove(res)
    os.remove(mark)
    local lines = {}
    for i = 1, 3000 do lines[i] = i % 7 == 0 and "" or ("r" .. i .. (i % 500 == 0 and long or "")) end
    writefile(items, table.concat(lines, "\n") .. "\n")
    -- line 1999 says it started (a file) and waits: lpar is killed there
    local stall = ("function(s) if s == 'r1999' and not os.getenv('GO') then " ..
                   "io.open(%q, 'w'):close() require('posix.time').nanosleep({tv_sec = 60, tv_nsec = 0}) " ..
                   "end return #s end"):format(mark)
    local args = {"-j2", "--number", "--joblog", log, "-o", res, "-e", stall, items}
    local p = H.spawncli(args)
    local deadline = H.now() + 30
    while not readfile(mark) and H.now() < deadline do H.sleep(0.01) end
    assert.is_not_nil(readfile(mark), "line 1999 did not start")
    signal.kill(p.pid, signal.SIGKILL)
    waitexit(p.pid, 10)
    closeall(p)
    local quoted = {}
    for i, a in ipairs(args) do quoted[i] = quote(a) end
    local code, _, err = H.run("GO=1 timeout -k 5 60 " .. quote(H.cli) .. " --resume " .. table.concat(quoted, " "))
    assert.equal(0, code, err)
    local want = {}
    for i = 1, 3000 do want[i] = i .. "\t" .. #lines[i] .. "\n" end
    assert.equal(table.concat(want), readfile(res))
  end)
end)

describe("lpar and the memory of long records left out of a fork", function()
  -- Long records from a pipe, each followed by quick lines and a line
  -- whose worker exits (so that workers are forked again and again, after
  -- the long records' memory was freed and used for other things): a
  -- worker forked later must find all of the parent's memory it uses.
  it("gives workers forked later all they need", function()
    local items, script = tmpname(), tmpname()
    local f = assert(io.open(items, "wb"))
    local long = ("x"):rep(3 * 1024 * 1024)
    for i = 1, 20 do
      f:write(long, "\n")
      for j = 1, 50 do f:write("s", i, "_", j, "\n") end
      f:write("exit\n")
    end
    f:close()
    writefile(script, [[
      local kept = {}
      return function(s)
        if s == "exit" then os.exit(3) end
        kept[#kept + 1] = s:sub(1, 64)
        if #kept > 200 then kept = {} end
        return #s
      end]])
    for _ = 1, 2 do
      local code, out, err = H.run(("cat %s | timeout -k 5 120 %s -j2 %s"):format(items, quote(H.cli),
                                                                                 script))
      assert.equal(1, code, err)
      assert.not_matches("SIGSEGV", err)
      assert.matches("lpar: 20 of 1040 items failed", err, 1, true)
      local _, n = out:gsub("\n", "")
      assert.equal(1020, n, err)
    end
  end)
end)

describe("lpar and a long line of a file run again", function()
  it("keeps it out of the parent when it is retried whole", function()
    local items, script, marker = tmpname(), tmpname(), tmpname()
    os.remove(marker)
    local size = 50 * 1000 * 1000
    writefile(items, ("y"):rep(size) .. "\nb\n")
    -- the long line fails its first try; each record reports lpar's VmHWM (kB)
    writefile(script, ([[
      local status = dofile(%q)
      return function(s)
        if #s > 1000 and not io.open(%q) then
          io.open(%q, "w"):close()
          error("first try")
        end
        return #s .. " " .. status(status("self", "PPid"), "VmHWM")
      end]]):format(HWM, marker, marker))
    local code, out, err = H.lpar(("-j1 --retries 1 %s %s"):format(script, items), nil)
    assert.equal(0, code, err)
    local n, parent = out:match("^(%d+) (%d+)\n1 %d+\n$")
    assert.equal(tostring(size), n, out)
    if not os.getenv("ASAN_OPTIONS") then -- quarantine: peaks mean nothing there
      assert.is_true(tonumber(parent) * 1024 <= 0.5 * size, "parent VmHWM " .. parent .. " kB")
    end
  end)
end)
