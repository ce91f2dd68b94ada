-- The kind of each failure as Lua sees it: the fifth and sixth values of
-- pool:imap and lpar.imap for an item's failure, lpar.errkind for what
-- lpar raises; code above the engine branches on these, never on text.
local lpar = require "lpar"
local H = require "spec.helper"

local le = H.le

-- item 2 fails as 'how' says; the others return x * 10
local failing = {
  error = function(x)
    if x == 2 then error("no two") end
    return x * 10
  end,
  timeout = function(x)
    if x == 2 then while true do end end
    return x * 10
  end,
  signal = function(x)
    if x == 2 then
      local f = assert(io.open("/proc/self/stat"))
      local pid = f:read("*n")
      f:close()
      os.execute("kill -9 " .. pid)
      while true do end
    end
    return x * 10
  end,
  exit = function(x)
    if x == 2 then require("posix.unistd")._exit(3) end
    return x * 10
  end,
  memory = function(x)
    if x == 2 then
      local t = {}
      for i = 1, 16777216 do t[i] = ("%d"):format(i) end
      return #t
    end
    return x * 10
  end,
  -- past the limit with tables (5.1 and LuaJIT collect no garbage before
  -- they refuse: reporting the failure needs what the item left freed)
  tables = function(x)
    if x == 2 then
      local t = {}
      for i = 1, 1e8 do t[i] = {} end
      return #t
    end
    return x * 10
  end,
  -- past the limit in a string buffer (on 5.3, a plain error raised by
  -- lauxlib when refused, not a memory error)
  buffer = function(x)
    if x == 2 then return #string.rep("x", 100 * 1048576) end
    return x * 10
  end,
  -- a header of no frame type on the results pipe, then a pause
  protocol = function(x)
    if x == 2 then
      local stat, unistd = require "posix.sys.stat", require "posix.unistd"
      for fd = 3, 64 do -- the results pipe is the only FIFO a worker holds
        local st = stat.fstat(fd)
        if st and stat.S_ISFIFO(st.st_mode) ~= 0 then
          unistd.write(fd, le(200, 4) .. le(1, 4) .. le(0, 8))
        end
      end
      unistd.sleep(5)
    end
    return x * 10
  end,
}

-- kind and detail of each failed item of a pool:imap (or lpar.imap) run
local function kinds(front, how, opts)
  local got, values = {}, {}
  opts = opts or {}
  local jobopts = {chunksize = 1, on_error = "collect", timeout = opts.timeout}
  local function take(i, v, e, where, kind, detail)
    assert.is_nil(where)
    if e ~= nil then got[i] = {kind, detail} else values[i] = v end
  end
  if front == "pool:imap" then
    local pool = lpar.pool{n_workers = 2, max_memory = opts.max_memory}
    local ok, err = pcall(function()
      for i, v, e, where, kind, detail in pool:imap(failing[how], H.range(4), jobopts) do
        take(i, v, e, where, kind, detail)
      end
    end)
    pool:close()
    if not ok then error(err, 0) end
  else
    jobopts.n_workers, jobopts.max_memory = 2, opts.max_memory
    for i, v, e, where, kind, detail in lpar.imap(failing[how], H.range(4), jobopts) do
      take(i, v, e, where, kind, detail)
    end
  end
  assert.same({[1] = 10, [3] = 30, [4] = 40}, values)
  return got
end

describe("the kind of an item's failure", function()
  after_each(function() assert.same({}, H.children()) end)

  for _, front in ipairs{"pool:imap", "lpar.imap"} do
    it("is 'error' for a Lua error, in " .. front, function()
      assert.same({[2] = {"error"}}, kinds(front, "error"))
    end)

    it("is 'timeout' for an item past its timeout, in " .. front, function()
      assert.same({[2] = {"timeout"}}, kinds(front, "timeout", {timeout = 0.5}))
    end)

    it("is 'signal' with the signal for a worker killed, in " .. front, function()
      assert.same({[2] = {"signal", 9}}, kinds(front, "signal"))
    end)

    it("is 'exit' with the status for a worker that exits, in " .. front, function()
      assert.same({[2] = {"exit", 3}}, kinds(front, "exit"))
    end)

    it("is 'memory' for an item past max_memory, in " .. front, function()
      assert.same({[2] = {"memory"}}, kinds(front, "memory", {max_memory = "64M"}))
    end)

    it("is 'memory' for an item past max_memory with tables, in " .. front, function()
      assert.same({[2] = {"memory"}}, kinds(front, "tables", {max_memory = "16M"}))
    end)

    it("is 'memory' for an item past max_memory in a string buffer, in " .. front, function()
      assert.same({[2] = {"memory"}}, kinds(front, "buffer", {max_memory = "64M"}))
    end)

    it("is 'protocol' for a worker that breaks the protocol, in " .. front, function()
      assert.same({[2] = {"protocol"}}, kinds(front, "protocol"))
    end)
  end

  it("is 'error' for a serial lpar.imap (n_workers = 0)", function()
    local got = {}
    for i, _, e, where, kind in lpar.imap(failing.error, H.range(3),
                                           {n_workers = 0, on_error = "collect"}) do
      assert.is_nil(where)
      if e ~= nil then got[i] = kind end
    end
    assert.same({[2] = "error"}, got)
  end)

  it("is nil for an item that succeeds", function()
    local pool = H.closing(finally, lpar.pool(1))
    for i, v, e, where, kind, detail in pool:imap(function(x) return x end, {7}) do
      assert.same({1, 7}, {i, v})
      assert.is_nil(e)
      assert.is_nil(where)
      assert.is_nil(kind)
      assert.is_nil(detail)
    end
  end)
end)

describe("lpar.errkind", function()
  after_each(function() assert.same({}, H.children()) end)

  it("names a job's failure that lpar raises: 'error', 'exit', 'timeout'", function()
    local pool = H.closing(finally, lpar.pool(2))
    for how, want in pairs{error = {"error"}, exit = {"exit", 3}, timeout = {"timeout"}} do
      local ok, e = pcall(pool.map, pool, failing[how], H.range(4), {chunksize = 1, timeout = 0.5})
      assert.is_false(ok)
      assert.same(want, {lpar.errkind(e)}, how)
    end
  end)

  it("keeps the kind of a failure of lpar's own that a caller's function raises again", function()
    -- on_event (as the CLI's, which writes the output and the joblog)
    -- raising a failure lpar gave it: the job fails of that kind
    local pool = H.closing(finally, lpar.pool(2))
    local ok, e = pcall(pool.map, pool, failing.exit, H.range(4), {chunksize = 1})
    assert.is_false(ok)
    local again
    ok, again = pcall(pool.map, pool, function(x) return x end, H.range(4), {
      on_event = function(ev) if ev.event == "end" then error(e, 0) end end})
    assert.is_false(ok)
    assert.same({"exit", 3}, {lpar.errkind(again)})
  end)

  it("names a worker init that fails 'init'", function()
    local ok, e = pcall(lpar.pool, {n_workers = 2, init = function() error("cannot init") end})
    assert.is_false(ok)
    assert.matches("^worker init failed: ", e)
    assert.equal("init", lpar.errkind(e))
  end)

  it("names max_memory below the caller's heap 'memory'", function()
    local keep = {}
    for i = 1, 524288 do keep[i] = i end -- about 8 MiB
    local ok, e = pcall(lpar.pool, {n_workers = 2, max_memory = "2M"})
    assert.is_false(ok)
    assert.matches("^max_memory 2 MiB is below ", e)
    assert.equal("memory", lpar.errkind(e))
    assert.equal(524288, #keep)
  end)

  it("names a job cancelled 'cancelled'", function()
    local pool = H.closing(finally, lpar.pool(1))
    local job = pool:submit(function() require("posix.unistd").sleep(30) end, {1})
    job:cancel()
    local ok, e = pcall(job.wait, job)
    assert.is_false(ok)
    assert.equal("cancelled", lpar.errkind(e))
  end)

  it("names a wait that SIGINT ends 'interrupted', with the signal", function()
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      local f = assert(io.open("/proc/self/stat"))
      local parent = f:read("*n")
      f:close()
      local pool = lpar.pool(1)
      local ok, e = pcall(pool.map, pool, function()
        -- once the caller waits in epoll (its handler is in place)
        local unistd, time = require "posix.unistd", require "posix.time"
        for _ = 1, 2000 do
          local w = io.open("/proc/" .. parent .. "/wchan")
          local at = w and w:read("*a") or ""
          if w then w:close() end
          if at:find("epoll") or at:find("ep_poll") then break end
          time.nanosleep({tv_sec = 0, tv_nsec = 10000000})
        end
        os.execute("kill -INT " .. parent)
        unistd.sleep(30)
      end, {1})
      io.write(tostring(ok), " ", tostring(e), " ", table.concat({lpar.errkind(e)}, " "))
      pool:close()
    ]])
    assert.equal(0, rc, err)
    assert.equal("false interrupted interrupted 2", out)
  end)

  it("gives nothing for a value lpar did not raise", function()
    local ok, e = pcall(error, "worker init failed: not from lpar")
    assert.is_false(ok)
    assert.is_nil(lpar.errkind(e))
    assert.is_nil(lpar.errkind({}))
    assert.is_nil(lpar.errkind(nil))
    assert.has_error(function() lpar.errkind() end)
  end)
end)

describe("the memory limit (max_memory) and the kinds", function()
  -- kind and message (first line) of each item of an imap under a limit,
  -- of the items made(): made once the pool's worker started (it would
  -- inherit them)
  local function run(f, made)
    local got = {}
    collectgarbage() -- what an earlier case left would count in the worker
    collectgarbage()
    local pool = lpar.pool({n_workers = 1, max_memory = "8M"})
    pool:map(function(x) return x end, {1})
    for i, v, e, _, kind in pool:imap(f, made(), {on_error = "collect", chunksize = 1}) do
      got[i] = e == nil and {v} or {kind, (tostring(e):match("^[^\n]*"))}
    end
    -- the pool goes on
    assert.same({1, 2}, pool:map(function(x) return x end, {1, 2}))
    pool:close()
    return got
  end

  it("fails a table item too big for the worker alone, as memory", function()
    -- before: the worker could not step over it, and left; the run
    -- failed and the pool was broken (workers keep dying)
    local got = run(function(x) return type(x) end,
                    function() return {"a", {("z"):rep(12 * 1048576)}, "b"} end)
    assert.same({"string"}, got[1])
    assert.same({"memory", "not enough memory (limit 8 MiB)"}, got[2])
    assert.same({"string"}, got[3])
  end)

  it("keeps its own kind and message for an error after a refusal the item caught", function()
    local got = run(function(x)
      if x == 1 then
        pcall(string.rep, "x", 2 ^ 26) -- refused, and caught
        error("database down", 0)
      end
      if x == 2 then error("not enough memory", 0) end -- said by the item
      return x
    end, function() return {1, 2, 3} end)
    assert.same({"error", "database down"}, got[1])
    assert.same({"error", "not enough memory"}, got[2])
    assert.same({3}, got[3])
  end)

  it("names the limit when init goes past it", function()
    local ok, e = pcall(lpar.parallel, function(x) return x end, {1}, {n_workers = 1, max_memory = "8M",
      init = function()
        local t = {}
        for i = 1, 1e7 do t[i] = {} end
        return #t
      end})
    assert.is_false(ok)
    assert.equal("init", lpar.errkind(e))
    assert.matches("^worker init failed: not enough memory %(limit 8 MiB%)", e)
  end)
end)
