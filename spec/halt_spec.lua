-- job:halt("now") and job:halt() on an imap job over a table: written in
-- the Lua every version parses.
local lpar = require "lpar"
local H = require "spec.helper"

-- Wait (60 s at most) until the file 'path' exists.
local function await(path)
  local deadline = os.time() + 60
  while not io.open(path) and os.time() < deadline do os.execute("sleep 0.05") end
end

-- f: item 1 waits until the file 'go' exists, saying so in 'started'
-- first; item 3 fails once the file 'ready' exists (the caller has the
-- job then: events can come inside the imap call); the others come back
-- at once.
local function blocker(dir)
  local started, go, ready = dir .. "/started", dir .. "/go", dir .. "/ready"
  return function(x)
    if x == 1 then
      io.open(started, "w"):close()
      await(go)
    end
    if x == 3 then
      await(ready)
      error("three")
    end
    return x
  end, started, ready
end

describe("job:halt('now')", function()
  it("kills the workers running the job's items at once: they come back as not run", function()
    local dir = H.tmpdir()
    local f, started, ready = blocker(dir)
    local pool = lpar.pool({n_workers = 2})
    local job
    local ends = {}
    local items = {}
    for i = 1, 20 do items[i] = i end
    local iter, _, _, j = pool:imap(f, items, {on_error = "collect", chunksize = 1,
      on_event = function(ev)
        if ev.event ~= "end" then return end
        ends[ev.item] = ev.status
        -- item 1 runs (said in 'started'); item 3's failure halts the job
        if ev.item == 3 and H.waitfor(function() return io.open(started) ~= nil end, 60) then
          job:halt("now")
        end
      end})
    job = j
    H.writefile(ready, "")
    local got, errs = {}, {}
    local t0 = os.time()
    for i, v, e in iter, nil, nil, job do got[i], errs[i] = v, e end
    local took = os.time() - t0
    H.rmdir(dir)
    -- item 1 never said go: it was killed (well before its 60 s)
    assert.is_true(took < 50, took .. " s")
    assert.is_nil(got[1])
    assert.is_nil(errs[1])
    assert.equal("cancelled", ends[1])
    assert.equal(2, got[2])
    assert.matches("three", errs[3])
    for i = 4, 20 do -- never handed out after the halt, or not run
      if got[i] == nil then assert.is_nil(errs[i]) else assert.equal(i, got[i]) end
    end
    assert.equal("done", job:status())
    -- the pool goes on: its workers are replaced
    local r = pool:map(function(x) return x * 2 end, {1, 2, 3})
    assert.same({2, 4, 6}, r)
    pool:close()
  end)

  it("called outside the loop, kills them before the next result is taken", function()
    local dir = H.tmpdir()
    local f, started = blocker(dir)
    local pool = lpar.pool({n_workers = 2})
    local iter, _, _, job = pool:imap(f, {2, 1, 4}, {chunksize = 1})
    local i, v = iter(nil, nil) -- item 1 (2) comes back; item 2 (1) waits
    assert.equal(1, i)
    assert.equal(2, v)
    assert.is_true(H.waitfor(function() return io.open(started) ~= nil end, 60))
    assert.is_true(job:halt("now"))
    local rest = {}
    for k, x, e in iter, nil, nil, job do rest[k] = {x, e} end
    H.rmdir(dir)
    assert.same({}, rest[2] or {}) -- not run
    assert.equal("done", job:status())
    assert.has_error(function() job:halt("later") end)
    pool:close()
  end)
end)

describe("job:halt() of an imap job over a table", function()
  it("ends with the items never handed out coming back as not run", function()
    -- before: the job waited for items it would never hand out
    -- items past 2 wait (60 s at most) until the test has halted the job,
    -- so that most are still to be handed out then
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local pool = lpar.pool({n_workers = 2})
    local items = {}
    for i = 1, 200 do items[i] = i end
    local iter, _, _, job = pool:imap(function(x)
      if x > 2 then await(go) end
      return x
    end, items, {chunksize = 1})
    local n, last = 0, 0
    for i, v in iter, nil, nil, job do
      if i == 2 then
        job:halt()
        H.writefile(go, "")
      end
      if v ~= nil then n = n + 1 end
      last = i
    end
    H.rmdir(dir)
    assert.equal(200, last)
    assert.is_true(n >= 2 and n < 200, n .. " results")
    assert.equal("done", job:status())
    pool:close()
  end)
end)

describe("on_event of a job that halts", function()
  it("ends every item that started, those sent back unrun too", function()
    -- one worker takes items 1..4 as a chunk and dies on item 1 (once
    -- the imap call has returned the job: up to 60 s): items 2 to 4 go
    -- back unrun, and the job halts at item 1's end
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local pool = lpar.pool({n_workers = 1})
    local starts, ends, status = {}, {}, {}
    local job
    local iter, _, _, j = pool:imap(function(x)
      await(go)
      if x == 1 then os.exit(3) end
      return x
    end, {1, 2, 3, 4}, {chunksize = 4, on_error = "collect", on_event = function(ev)
      if ev.event == "start" then
        starts[ev.item] = (starts[ev.item] or 0) + 1
      else
        ends[ev.item] = (ends[ev.item] or 0) + 1
        status[ev.item] = ev.status
        if ev.item == 1 then job:halt() end
      end
    end})
    job = j
    H.writefile(go, "")
    local got = {}
    for i, v, e in iter, nil, nil, job do got[i] = {v, e} end
    pool:close()
    H.rmdir(dir)
    assert.equal("lost", status[1])
    assert.matches("exited with status 3", got[1][2])
    for i = 1, 4 do
      assert.equal(starts[i] or 0, ends[i] or 0, "item " .. i)
    end
    for i = 2, 4 do
      if starts[i] then assert.equal("cancelled", status[i]) end
      assert.same({}, got[i] or {}) -- not run
    end
    assert.is_truthy(starts[2], "item 2 started with item 1")
  end)
end)
