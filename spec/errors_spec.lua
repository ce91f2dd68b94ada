-- What a failure says, in every front end (lpar.parallel, lpar.imap,
-- pool:map and the lpar command): odd error values, errors that kill
-- their worker while it reports them, deep stacks, memory limits below
-- the caller's heap, and workers that send frames the caller cannot take.
local lpar = require "lpar"
local H = require "spec.helper"

local cli = H.cli
local JIT = rawget(_G, "jit") ~= nil

-- What error(42) raises, as a pattern: 5.3 and 5.4 keep the number as it
-- is; 5.1, 5.2 and LuaJIT add the place, as they do to a string (their
-- 'error' takes a number for a string).
local NUM42 = _VERSION >= "Lua 5.3" and "42" or "[^\n]*:%d+: 42"
local fixture = "spec/fixtures/cli/"

local function sorted_keys(t)
  local k = {}
  for i in pairs(t) do k[#k + 1] = i end
  table.sort(k)
  return k
end

-- Each front end runs f over items with opts (n_workers, chunksize,
-- on_error, init) and returns what lpar.parallel would.
local fronts = {
  {"lpar.parallel", function(f, items, opts)
    return lpar.parallel(f, items, opts)
  end},
  {"lpar.imap", function(f, items, opts)
    local r, errs, n = {}, {}, 0
    for i, v, e in lpar.imap(f, items, opts) do
      n = math.max(n, i)
      r[i], errs[i] = v, e
    end
    if opts.on_error == "collect" then return r, n, errs end
    return r, n
  end},
  {"pool:map", function(f, items, opts)
    return H.using(lpar.pool{n_workers = opts.n_workers, init = opts.init}, function(pool)
      return pool:map(f, items, {chunksize = opts.chunksize, on_error = opts.on_error,
                                 timeout = opts.timeout})
    end)
  end},
}

-- A child's code that defines closed(pool, ok, ...): closes the pool,
-- then raises the error of a failed pcall or returns its values (a pool
-- closed on the way out of the call, raising or not, as <close> does).
local CLOSED = [[
    local function closed(pool, ok, ...)
      pool:close()
      if not ok then error((...), 0) end
      return ...
    end]]

-- The same front ends as code for a child Lua (for what might not end):
-- the code defines run(f, items, opts) like the functions above.
local childfronts = {
  {"lpar.parallel", "local function run(f, items, opts) return lpar.parallel(f, items, opts) end"},
  {"lpar.imap", [[
    local function run(f, items, opts)
      for _ in lpar.imap(f, items, opts) do end
    end]]},
  {"pool:map", CLOSED .. [[
    local function run(f, items, opts)
      local pool = lpar.pool(opts.n_workers)
      return closed(pool, pcall(pool.map, pool, f, items, {chunksize = opts.chunksize}))
    end]]},
}

-- Run 'body' (after 'lpar' and a front end's run are defined) in a child
-- Lua (the one running the specs) bounded by 'secs'; exit code and output.
local function child(front, body, secs, env)
  local prog = H.program('local lpar = require "lpar"\n' .. front .. "\n" .. body)
  local rc, out, err = H.run(("%stimeout %d %s %s"):format(env or "", secs, H.interp, prog))
  os.remove(prog)
  return rc, out, err
end

-- Error values and what each becomes: in the message lpar raises
-- (after "item 3: "), and in errors[3] with on_error = "collect".
local kinds = {
  {"error(nil)", function(x)
    if x == 3 then error(nil) end
    return x * 10
  end, "%(error object is a nil value%)"},
  {"error(42)", function(x)
    if x == 3 then error(42) end
    return x * 10
  end, NUM42},
  {"error(false)", function(x)
    if x == 3 then error(false) end
    return x * 10
  end, "%(error object is a boolean value%)"},
  {"an error value whose __tostring raises", function(x)
    if x == 3 then
      error(setmetatable({print}, {__tostring = function() error("cannot say") end}))
    end
    return x * 10
  end, "%(error object is a table value%)"},
  {"an error value whose __tostring exits the worker", function(x)
    if x == 3 then error(setmetatable({print}, {__tostring = function() os.exit(7) end})) end
    return x * 10
  end, "worker %d+ exited with status 7", true},
}

describe("error values", function()
  for _, front in ipairs(fronts) do
    local name, run = front[1], front[2]
    for _, kind in ipairs(kinds) do
      local what, f, says, died = kind[1], kind[2], kind[3], kind[4]
      -- a traceback follows an error raised by f, not a worker's death
      local tail = died and "$" or "\nstack traceback:\n"

      it(name .. " names the item that raised " .. what, function()
        local ok, err = pcall(run, f, H.range(6), {n_workers = 2, chunksize = 1})
        assert.is_false(ok)
        assert.equal("string", type(err))
        assert.matches("^item 3: " .. says .. tail, err)
      end)

      it(name .. " collects " .. what .. " and keeps the other results", function()
        local r, n, errs = run(f, H.range(6), {n_workers = 2, chunksize = 3, on_error = "collect"})
        assert.equal(6, n)
        assert.same({3}, sorted_keys(errs))
        assert.matches("^" .. says .. tail, errs[3])
        for i = 1, 6 do
          if i ~= 3 then assert.equal(i * 10, r[i]) end
        end
      end)
    end

    it(name .. " times out an item whose error value's __tostring never returns", function()
      local r, n, errs = run(function(x)
        if x == 3 then error(setmetatable({print}, {__tostring = function() while true do end end})) end
        return x * 10
      end, H.range(6), {n_workers = 2, chunksize = 3, on_error = "collect", timeout = 0.5})
      assert.equal(6, n)
      assert.same({3}, sorted_keys(errs))
      assert.equal("timed out after 0.5 s", errs[3])
      for i = 1, 6 do
        if i ~= 3 then assert.equal(i * 10, r[i]) end
      end
    end)

    it(name .. " raises a table error value as a table that names its item", function()
      local ok, err = pcall(run, function(x)
        if x == 3 then error({code = 7}) end
        return x
      end, H.range(6), {n_workers = 2, chunksize = 1})
      assert.is_false(ok)
      assert.equal("table", type(err))
      assert.equal(7, err.code)
      assert.matches("^item 3: %(error object is a table value%)\nstack traceback:\n", tostring(err))
    end)

    it(name .. " collects a table error value as it is", function()
      local _, _, errs = run(function(x)
        if x == 3 then error({code = 7}) end
        return x
      end, H.range(6), {n_workers = 2, on_error = "collect"})
      assert.same({[3] = {code = 7}}, errs)
    end)

    for _, init in ipairs{
      {"nil", function() error(nil) end, "%(error object is a nil value%)"},
      {"a number", function() error(42) end, NUM42},
    } do
      it(name .. " says that init failed when it raises " .. init[1], function()
        local ok, err = pcall(run, function(x) return x end, H.range(4),
                              {n_workers = 2, init = init[2]})
        assert.is_false(ok)
        assert.matches("^worker init failed: " .. init[3] .. "\nstack traceback:\n", err)
      end)
    end

    it(name .. " says that init failed when it raises a table", function()
      local ok, err = pcall(run, function(x) return x end, H.range(4),
                            {n_workers = 2, init = function() error({code = 7}) end})
      assert.is_false(ok)
      assert.equal("table", type(err))
      assert.equal(7, err.code)
      assert.matches("^worker init failed: %(error object is a table value%)", tostring(err))
    end)
  end

  it("a serial run names the item of a non-string error value", function()
    local ok, err = pcall(lpar.parallel, function(x)
      if x == 2 then error(42) end
      return x
    end, H.range(3), 0)
    assert.is_false(ok)
    assert.matches("^item 2: " .. NUM42 .. "\nstack traceback:\n", err)
    local _, _, errs = lpar.parallel(function(x)
      if x == 2 then error(nil) end
      return x
    end, H.range(3), {n_workers = 0, on_error = "collect"})
    assert.matches("^%(error object is a nil value%)\nstack traceback:\n", errs[2])
  end)
end)

describe("deep stacks and long messages", function()
  for _, front in ipairs(childfronts) do
    it(front[1] .. " reports a stack overflow at once, its traceback cut", function()
      local rc, out = child(front[2], [[
        local ok, err = pcall(run, function()
          local function r() return 1 + r() end
          return r()
        end, {1}, {n_workers = 1})
        io.write(tostring(ok), "\n", err)
      ]], 60)
      assert.equal(0, rc) -- it ended, well before the timeout
      assert.matches("^false\nitem 1: [^\n]*stack overflow\nstack traceback:\n", out)
      assert.matches("\n\t%.%.%.\t%(skipping %d+ levels%)\n", out)
      -- the first 10 and the last 11 levels of the user's code
      local _, levels = out:gsub("\n\t[^\n]*: in ", "")
      assert.is_true(levels <= 21, "levels: " .. levels)
    end)

    it(front[1] .. " reports a 16 MiB error message whole, in linear time", function()
      local rc, out = child(front[2], [[
        local ok, err = pcall(run, function() error(("x"):rep(16777216), 0) end,
                              {1}, {n_workers = 1})
        local x = err:match("^item 1: (x*)\nstack traceback:\n")
        io.write(tostring(ok), " ", x and #x or err:sub(1, 200))
      ]], 60)
      assert.equal(0, rc)
      assert.equal("false 16777216", out)
    end)
  end

  it("keeps a traceback of a few levels whole", function()
    local ok, err = pcall(lpar.parallel, function()
      local function r(n) if n == 0 then error("at the bottom") end return 1 + r(n - 1) end
      return r(5)
    end, {1}, 1)
    assert.is_false(ok)
    assert.not_matches("skipping", err)
    local _, levels = err:gsub("in upvalue 'r'", "")
    assert.equal(5, levels)
  end)

  it("the CLI reports a stack overflow at once, its traceback cut", function()
    local rc, _, err = H.run("timeout 60 " .. cli .. " " .. fixture .. "deep.lua -", "a\n")
    assert.equal(1, rc)
    if JIT then
      -- LuaJIT leaves the command's message handler (Lua code) too little
      -- stack at an overflow: the message alone, no place nor traceback
      assert.equal('lpar: line 1 ("a"): stack overflow\nlpar: 1 of 1 items failed\n', err)
      return
    end
    assert.matches("^lpar: line 1 %(\"a\"%): [^\n]*stack overflow\nstack traceback:\n", err)
    assert.matches("\n\t%.%.%.\t%(skipping %d+ levels%)\n", err)
    -- the first 10 and the last 11 levels of the user's code
    local _, levels = err:gsub("\n\t[^\n]*: in ", "")
    assert.is_true(levels <= 21, "levels: " .. levels)
  end)
end)

describe("max_memory below the caller's heap", function()
  local keep
  before_each(function()
    keep = {}
    for i = 1, 524288 do keep[i] = i end -- about 8 MiB
  end)
  after_each(function()
    keep = nil
    assert.same({}, H.children())
  end)

  for _, front in ipairs{fronts[1], fronts[2]} do
    it(front[1] .. " says the limit is below what the worker inherits", function()
      local ok, err = pcall(front[2], function(x) return x + #keep end, H.range(4),
                            {n_workers = 2, max_memory = "2M"})
      assert.is_false(ok)
      local mib = err:match("^max_memory 2 MiB is below the ([%d.]+) MiB the worker inherited from the caller$")
      assert.is_truthy(mib, err)
      -- LuaJIT's array slots take 8 bytes, the others' 16
      assert.is_true(tonumber(mib) >= (JIT and 4 or 8), err)
    end)
  end

  it("still runs when the caller's heap is below the limit", function()
    local r = lpar.parallel(function(x) return x + #keep end, H.range(4),
                            {n_workers = 2, max_memory = "64M"})
    assert.same({1 + #keep, 2 + #keep, 3 + #keep, 4 + #keep}, r)
  end)

  it("the CLI says --max-memory is below what the worker inherits", function()
    local rc, out, err = H.run(cli .. " --max-memory 2M " .. fixture .. "heap.lua -", "a\nb\n")
    assert.equal(2, rc)
    assert.equal("", out)
    assert.matches("^lpar: %-%-max%-memory 2 MiB is below the [%d.]+ MiB the worker inherited from the caller\n$", err)
  end)
end)

-- Code for a child Lua: f(x), once, at item AT, writes the frame BYTES
-- makes (for item FOR, of the same chunk) on its worker's results pipe,
-- then waits to be stopped.
local injector = [[
  local pack = string.pack or require("compat53.string").pack -- before 5.3
  local flag = os.tmpname()
  os.remove(flag)
  local function f(x)
    if x == AT and not io.open(flag) then
      io.open(flag, "w"):close()
      local stat, unistd = require "posix.sys.stat", require "posix.unistd"
      local bytes = BYTES
      for fd = 3, 64 do -- the results pipe is the only FIFO a worker holds
        local st = stat.fstat(fd)
        if st and stat.S_ISFIFO(st.st_mode) ~= 0 then unistd.write(fd, bytes) end
      end
      unistd.sleep(5)
    end
    return x * 10
  end
  local r, n, errs = run(f, {1, 2, 3, 4, 5, 6, 7, 8}, {n_workers = 2, chunksize = 2, on_error = "collect"})
  os.remove(flag)
  local keys = {}
  for i in pairs(errs) do keys[#keys + 1] = i end
  io.write(n, " ", table.concat(keys, ","), " ", table.concat(r, ",", 1, 4), ",",
           table.concat(r, ",", 6, 8), "\n", errs[5] or "")
]]

local frames = {
  -- at item 6, a RESULT for item 5 (not yet sent) holding a table nested
  -- 300 deep: item 5 fails, not 6, which the worker is on
  {"a too deep value in a result", 6, [[(function()
    local v = ("\6\1"):rep(300) .. "\0" .. ("\8"):rep(300)
    return pack("<I4I4I8I8I8", 3, 1, 16 + #v, 5, 0) .. v
  end)()]], "nested too deeply"},
  -- the same in an ERROR frame for item 5
  {"a too deep error value", 6, [[(function()
    local v = ("\6\1"):rep(300) .. "\0" .. ("\8"):rep(300)
    return pack("<I4I4I8I8", 4, 1, 8 + #v + 1, 5) .. v .. "\0"
  end)()]], "nested too deeply"},
  -- a RESULT header announcing 512 GiB: the item the worker is on fails
  {"a frame too long to take", 5, [[pack("<I4I4I8", 3, 1, 549755813888)]], "too long"},
}

-- a failed allocation is an answer the caller handles, not a sanitizer's
-- report
local function asanenv()
  local asan = os.getenv("ASAN_OPTIONS")
  return asan and ("ASAN_OPTIONS=%s:allocator_may_return_null=1 "):format(asan) or ""
end

describe("frames a worker sends that the caller cannot take", function()
  for _, front in ipairs(childfronts) do
    for _, frame in ipairs(frames) do
      it(front[1] .. " fails the item of " .. frame[1] .. " as a protocol error", function()
        -- collecting: the run needs a run() that returns what parallel does
        local runner = front[1] == "lpar.imap" and [[
          local function run(f, items, opts)
            local r, errs, n = {}, {}, 0
            for i, v, e in lpar.imap(f, items, opts) do n = i; r[i], errs[i] = v, e end
            return r, n, errs
          end]] or front[1] == "pool:map" and CLOSED .. [[
          local function run(f, items, opts)
            local pool = lpar.pool(opts.n_workers)
            return closed(pool, pcall(pool.map, pool, f, items,
                                      {chunksize = opts.chunksize, on_error = opts.on_error}))
          end]] or front[2]
        local code = injector:gsub("AT", frame[2]):gsub("BYTES", frame[3])
        local rc, out, err = child(runner, code, 60, asanenv())
        assert.equal(0, rc, err)
        assert.matches("^8 5 10,20,30,40,60,70,80\nworker %d+ broke the protocol %([^\n]*" ..
                       frame[4] .. "[^\n]*%)$", out)
      end)
    end
  end

  for _, frame in ipairs{{"deep", "nested too deeply"}, {"long", "too long"}} do
    it("the CLI fails the line of a worker that sends a " .. frame[1] .. " frame", function()
      local rc, out, err = H.run(asanenv() .. "timeout 60 " .. cli .. " -j2 --chunk 1 " ..
                                 fixture .. "badframe.lua -", "a\n" .. frame[1] .. " 2\nc\nd\n")
      assert.equal(1, rc)
      assert.equal("a\nc\nd\n", out)
      err = err:gsub("==%d+==WARNING: AddressSanitizer failed to allocate[^\n]*\n", "")
      assert.matches("^lpar: line 2 %(\"" .. frame[1] .. " 2\"%): worker %d+ broke the protocol %([^\n]*" ..
                     frame[2] .. "[^\n]*%)\nlpar: 1 of 4 items failed\n$", err)
    end)
  end
end)

describe("the CLI", function()
  it("names the line of every kind of error value", function()
    -- one item per batch: a worker's death is not what this is about
    local rc, out, err = H.run("timeout 60 " .. cli .. " -j2 --chunk 1 " .. fixture .. "errkinds.lua -",
      "a\nnil\nnumber\ntable\nfalse\ntostring raises\ntostring exits\nb\n")
    assert.equal(1, rc)
    assert.equal("a\nb\n", out)
    for _, want in ipairs{
      'line 2 %("nil"%): %(error object is a nil value%)\nstack traceback:\n',
      'line 3 %("number"%): ' .. NUM42 .. '\nstack traceback:\n',
      'line 4 %("table"%): %(error object is a table value%)\nstack traceback:\n',
      'line 5 %("false"%): %(error object is a boolean value%)\nstack traceback:\n',
      'line 6 %("tostring raises"%): %(error object is a table value%)\nstack traceback:\n',
      'line 7[^\n]*: worker %d+ exited with status 7\n',
    } do
      assert.matches("lpar: " .. want, err)
    end
    assert.matches("lpar: 6 of 8 items failed\n$", err)
  end)

  for _, kind in ipairs{
    {"nil", "%(error object is a nil value%)"},
    {"number", NUM42},
    {"table", "%(error object is a table value%)"},
  } do
    it("says that init failed when it raises " .. kind[1], function()
      local rc, out, err = H.run("LPAR_INITERR=" .. kind[1] .. " timeout 60 " .. cli .. " " ..
                                 fixture .. "initkinds.lua -", "a\nb\n")
      assert.equal(2, rc)
      assert.equal("", out)
      assert.matches("^lpar: worker init failed: " .. kind[2] .. "\n", err)
    end)
  end
end)

describe("outside testing found", function()
  for _, front in ipairs(fronts) do
    local name, run = front[1], front[2]

    it("keeps the bytes of a message after a NUL, with " .. name, function()
      local ok, err = pcall(run, function() error("a\0b", 0) end, {1}, {n_workers = 1})
      assert.is_false(ok)
      assert.matches("^item 1: a%zb\n", err)
    end)

    it("leaves the error that 'load' returns a string, with " .. name, function()
      -- nesting too deep for the parser raises through the message
      -- handler (5.4's C stack overflow), which must hand the error back
      -- to 'load' as it is; the other Luas stop at a limit of their own
      local r = run(function()
        local _, e = (rawget(_G, "loadstring") or load)("return " .. ("("):rep(300) .. "1" .. (")"):rep(300))
        return type(e) .. ":" .. tostring(e)
      end, {1}, {n_workers = 1})
      assert.matches(({
        ["Lua 5.4"] = "^string:.-overflow",
        ["Lua 5.3"] = "^string:.-too many C levels %(limit is 200%)",
        ["Lua 5.2"] = "^string:.-too many C levels %(limit is 200%)",
        ["Lua 5.1"] = "^string:.-chunk has too many syntax levels$",
      })[_VERSION], r[1])
    end)

    if name ~= "lpar.imap" then
      it("says that init failed when it exits, with " .. name, function()
        local ok, err = pcall(run, function(x) return x end, {1, 2, 3},
          {n_workers = 2, init = function() os.exit(3) end})
        assert.is_false(ok)
        assert.matches("^worker init failed: worker %d+ exited with status 3$", err)
      end)
    end
  end

  it("says that init failed when it exits, with the CLI", function()
    local rc, _, err = H.run(cli .. " -e 'return {init = function() os.exit(5) end, " ..
      "map = function(s) return s end}' -", "a\nb\n")
    assert.equal(2, rc)
    assert.matches("lpar: worker init failed: worker %d+ exited with status 5\n", err)
  end)
end)

describe("max_memory close to the caller's heap", function()
  it("is refused when it leaves a worker too little room to run", function()
    local rc, out, err = H.lua([[
      local lpar = require "lpar"
      BIG = {}
      for i = 1, 3e5 do BIG[i] = "s" .. i end
      collectgarbage()
      collectgarbage()
      local heap = collectgarbage("count") * 1024
      for _, extra in ipairs{50000, 500000} do
        local ok, e = pcall(lpar.parallel, function(x) return x * 2 end, {1, 2, 3},
          {n_workers = 2, max_memory = math.floor(heap + extra)})
        print(ok, e)
        local pool_ok, pe = pcall(lpar.pool, {n_workers = 1, max_memory = math.floor(heap + extra)})
        print(pool_ok, pool_ok and "" or pe)
      end
    ]])
    assert.equal(0, rc, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal(4, #lines, out)
    for _, l in ipairs(lines) do
      assert.matches("^false\tmax_memory %d+ bytes leaves less than 1024 KiB to run in " ..
        "above the %d+ bytes the worker inherited from the caller$", l)
    end
  end)

  -- 5.1 and LuaJIT collect no garbage when an allocation fails: a worker
  -- near max_memory fails items whose live data fit (not yet fixed)
  local it_ = _VERSION == "Lua 5.1" and pending or it
  it_("lets a replacement worker drop the results the caller holds", function()
    -- one worker, results of 100 kB: by item 50 the caller's heap is past
    -- the limit, which the worker replacing the one item 50 killed must
    -- not count
    local r, n, errs = lpar.parallel(function(x)
      if x == 50 then os.exit(1) end
      return string.rep(string.char(65 + x % 26), 100000)
    end, H.range(60), {n_workers = 1, max_memory = "3M", on_error = "collect", chunksize = 1})
    assert.equal(60, n)
    assert.same({50}, sorted_keys(errs))
    assert.matches("^worker %d+ exited with status 1", errs[50])
    for i = 1, 60 do
      if i ~= 50 then assert.equal(100000, #r[i]) end
    end
  end)
end)

describe("an items table whose __index raises", function()
  local function items()
    return setmetatable({n = 5}, {__index = function(_, i)
      if i == 3 then error("idx3", 0) end
      return i * 10
    end})
  end

  -- the workers of these read the items table they inherited (a pool's
  -- items are read by the caller, whose __index raises there)
  for _, front in ipairs({fronts[1], fronts[2]}) do
    it("fails that item with its message, with " .. front[1], function()
      local r, n, errs = front[2](function(x) return x + 1 end, items(),
                                  {n_workers = 2, chunksize = 2, on_error = "collect"})
      assert.equal(5, n)
      assert.same({11, 21, nil, 41, 51}, {r[1], r[2], r[3], r[4], r[5]})
      assert.same({3}, sorted_keys(errs))
      assert.matches("^idx3", errs[3])
      local ok, err = pcall(front[2], function(x) return x end, items(), {n_workers = 2})
      assert.is_false(ok)
      assert.matches("^item 3: idx3", err)
    end)
  end
end)
