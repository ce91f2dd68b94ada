-- The lpar command where things go wrong around it: workers lost with
-- items still to run, output and joblog that cannot be written, joblogs
-- that do not belong to the run, signals and closed streams.
local H = require "spec.helper"
local unistd = require "posix.unistd"
local poll = require "posix.poll"
local wait = require "posix.sys.wait"
local signal = require "posix.signal"

local FIX = "spec/fixtures/cli/"

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Run lpar with a shell-quoted argument string, stopped if it runs past
-- 30 s (then the code is 124); returns code, out, err.
local function lpar(args, input)
  return H.run("timeout -k 5 30 " .. quote(H.cli) .. " " .. args, input)
end

local function writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local tmp = {}
local function tmpname()
  local p = os.tmpname()
  tmp[#tmp + 1] = p
  return p
end

after_each(function()
  for _, p in ipairs(tmp) do os.remove(p) end
  tmp = {}
end)

describe("lpar with a worker lost in the middle of its items", function()
  local crash = FIX .. "crash.lua"

  it("finishes when the last item's worker dies (-j1)", function()
    for _ = 1, 5 do
      local code, out, err = lpar("-j1 " .. crash .. " -", "a\nexit\n")
      assert.equal(1, code, err)
      assert.equal("a\n", out)
      assert.matches("^lpar: line 2: worker %d+ exited with status 3\n", err)
      assert.matches("\nlpar: 1 of 2 items failed\n$", err)
    end
  end)

  it("finishes when a worker dies on a first or middle item (-j1)", function()
    local code, out, err = lpar("-j1 " .. crash .. " -", "exit\na\nexit\nb\n")
    assert.equal(1, code, err)
    assert.equal("a\nb\n", out)
    assert.matches("lpar: line 1: worker %d+ exited", err)
    assert.matches("lpar: line 3: worker %d+ exited", err)
    assert.matches("2 of 4 items failed", err)
  end)

  it("finishes when an item times out (-j1 --timeout)", function()
    local code, out, err = lpar("-j1 --timeout 0.5 " .. FIX .. "spin.lua -",
                                "a\nspin\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches("lpar: line 2: timed out after 0.5 s", err)
  end)

  it("finishes with --unordered", function()
    local code, out, err = lpar("-j1 --unordered " .. crash .. " -", "a\nexit\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches("lpar: line 2: worker %d+ exited", err)
  end)

  it("finishes with --retries 1", function()
    local code, out, err = lpar("-j1 --retries 1 " .. crash .. " -", "a\nexit\n")
    assert.equal(1, code, err)
    assert.equal("a\n", out)
    assert.matches("lpar: line 2: worker %d+ exited", err)
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
          assert.matches(("lpar: line %d: worker %%d+ exited"):format(at), err)
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
    local function f(s)
      if s == "exit" then os.exit(3) end
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
              got[#got + 1] = i .. ":" .. tostring(v) .. ":" .. (e and (e:match("^worker") or e:match("^timed out")) or "")
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
