-- Runs every command and output example of README.md and docs/*.md against
-- the built lpar and lpar.so, and fails when one drifts (docs/examples.md).
local H = require "spec.helper"

local root = io.popen("pwd"):read("l")
local build = H.build:match("^/") and H.build or root .. "/" .. H.build:gsub("^%./", "")

-- a file's bytes (it must be there), and a file written whole
local function readfile(path) return (assert(H.readfile(path), "cannot read " .. path)) end
local writefile = H.writefile

local function shquote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- The pages: README.md and every docs/*.md.
local function pages()
  local list = {"README.md"}
  local p = io.popen("ls docs/*.md 2>/dev/null")
  for name in p:lines() do list[#list + 1] = name end
  p:close()
  return list
end

-- Splits a page into its fenced blocks: {page, line, info, marker, body},
-- where marker is the <!-- ... --> comment on the line just before the
-- fence, if any. Raises on a fence left open.
local function blocks(page, text)
  local out, marker, cur = {}, nil, nil
  local n = 0
  for line in (text .. "\n"):gmatch("(.-)\n") do
    n = n + 1
    if cur then
      if line:match("^```%s*$") then
        out[#out + 1] = cur
        cur = nil
      else
        cur.lines[#cur.lines + 1] = line
      end
    elseif line:match("^```") then
      cur = {page = page, line = n, info = line:match("^```(%S*)"), marker = marker, lines = {}}
      marker = nil
    else
      marker = line:match("^<!%-%-%s*(.-)%s*%-%->%s*$")
    end
  end
  assert(not cur, page .. ":" .. (cur and cur.line or 0) .. ": a fenced block is not closed")
  return out
end

-- What a block is: "file", "listing", "notrun", "session" or "lua"; nil
-- and a message for a block that is none of them.
local function kind(b)
  local m = b.marker or ""
  if m:match("^file: %S+$") then return "file" end
  if m == "listing" then return "listing" end
  if m:match("^not run: %S") then return "notrun" end
  local first = b.lines[1] or ""
  if b.info == "sh" and first:match("^%$ ") then return "session" end
  if b.info == "lua" then
    for _, l in ipairs(b.lines) do
      if l:match("%-%-[>!] ") or l:match("^%-%-[>!]$") then return "lua" end
    end
  end
  return nil, string.format("%s:%d: a ```%s block that is not run: show its output "
    .. "(docs/examples.md) or mark it <!-- listing --> or <!-- not run: why -->", b.page, b.line, b.info)
end

local function norm(s) return (s:gsub("[ \t]+", " "):gsub(" $", ""):gsub("^ ", "")) end

-- Whether one output line matches one expected line ("[...]" is any text).
local function linematch(want, got)
  want, got = norm(want), norm(got)
  if not want:find("[...]", 1, true) then return want == got end
  local pat = {}
  for piece in (want .. "[...]"):gmatch("(.-)%[%.%.%.%]") do
    pat[#pat + 1] = piece:gsub("%p", "%%%0")
  end
  return got:match("^" .. table.concat(pat, ".-") .. "$") ~= nil
end

-- Whether output lines match expected lines; a line "[...]" alone stands
-- for any number of lines.
local function linesmatch(want, wi, got, gi)
  if wi > #want then return gi > #got end
  if norm(want[wi]) == "[...]" then
    for k = gi, #got + 1 do
      if linesmatch(want, wi + 1, got, k) then return true end
    end
    return false
  end
  return gi <= #got and linematch(want[wi], got[gi]) and linesmatch(want, wi + 1, got, gi + 1)
end

local function splitlines(s)
  local t = {}
  if s == "" then return t end
  if s:sub(-1) ~= "\n" then s = s .. "\n" end
  for l in s:gmatch("(.-)\n") do t[#t + 1] = l end
  return t
end

-- The environment examples run in: the built lpar first on PATH, lpar.so
-- on LUA_CPATH.
local function envprefix()
  return string.format("PATH=%s:\"$PATH\" LUA_CPATH=%s", shquote(build), shquote(build .. "/?.so;;"))
end

-- Runs a shell command in dir with stdout and stderr in one stream; returns
-- the exit status and the output.
local function sh(dir, cmd)
  local script = dir .. "/.cmd"
  writefile(script, cmd .. "\n")
  local status, out = H.run(string.format("cd %s && %s timeout 120 bash .cmd 2>&1", shquote(dir), envprefix()))
  return status, out
end

-- The commands of a session, each {cmd, want (lines), line}.
local function commands(b)
  local cmds, cur = {}, nil
  for i, l in ipairs(b.lines) do
    if l:match("^%$ ") then
      cur = {cmd = l:sub(3), want = {}, line = b.line + i}
      cmds[#cmds + 1] = cur
    elseif cur and #cur.want == 0 and cur.cmd:match("\\$") then
      cur.cmd = cur.cmd .. "\n" .. l
    else
      cur.want[#cur.want + 1] = l
    end
  end
  return cmds
end

local function diff(want, got)
  return "expected:\n" .. table.concat(want, "\n") .. "\ngot:\n" .. table.concat(got, "\n")
end

-- Runs one example in dir; returns true, or false and what differs.
local function check(b, dir)
  local k = kind(b)
  if k == "session" then
    for _, c in ipairs(commands(b)) do
      local status, out = sh(dir, c.cmd)
      local got = splitlines(out)
      if status ~= 0 then
        return false, string.format("%s:%d: `%s` exited with status %d (show a failure with "
          .. "`; echo \"exit $?\"`)\n%s", b.page, c.line, c.cmd, status, out)
      end
      if not linesmatch(c.want, 1, got, 1) then
        return false, string.format("%s:%d: `%s` printed something else\n%s", b.page, c.line, c.cmd,
          diff(c.want, got))
      end
    end
    return true
  elseif k == "lua" then
    local want, errs = {}, {}
    for _, l in ipairs(b.lines) do
      local o = l:match("%-%-> (.*)$") or (l:match("%-%->$") and "")
      local e = l:match("%-%-! (.*)$")
      if o then want[#want + 1] = o end
      if e then errs[#errs + 1] = e end
    end
    local file = string.format("%s/example_%d.lua", dir, b.line)
    writefile(file, table.concat(b.lines, "\n") .. "\n")
    local status, out, err = H.run(string.format("cd %s && %s timeout 120 lua5.4 %s", shquote(dir),
      envprefix(), shquote(file)))
    local where = string.format("%s:%d", b.page, b.line)
    if #errs == 0 and (status ~= 0 or err ~= "") then
      return false, where .. ": the example failed (status " .. status .. ")\n" .. err
    end
    if #errs > 0 then
      if status == 0 then return false, where .. ": the example was to fail and did not\n" .. out end
      for _, e in ipairs(errs) do
        if not norm(err):find(norm(e), 1, true) then
          return false, where .. ": the error is not what the example says\nexpected to contain: " .. e
            .. "\ngot:\n" .. err
        end
      end
    end
    local got = splitlines(out)
    if not linesmatch(want, 1, got, 1) then
      return false, where .. ": the example printed something else\n" .. diff(want, got)
    end
    return true
  end
  return true
end

-- A fresh work dir for a page, with its file blocks written and the
-- checkout's build and examples reachable as ./build and ./examples.
local function workdir(list)
  local dir = io.popen("mktemp -d /tmp/lpar-docs-XXXXXX"):read("l")
  H.run(string.format("ln -s %s %s/build && ln -s %s %s/examples", shquote(build), shquote(dir),
    shquote(root .. "/examples"), shquote(dir)))
  for _, b in ipairs(list) do
    if kind(b) == "file" then
      writefile(dir .. "/" .. b.marker:match("^file: (%S+)$"), table.concat(b.lines, "\n") .. "\n")
    end
  end
  return dir
end

local all = {}
for _, page in ipairs(pages()) do
  all[#all + 1] = {page = page, blocks = blocks(page, readfile(page))}
end

describe("the docs", function()
  it("mark every fenced block as run, a file, a listing or not run (and why)", function()
    local bad, counts, why = {}, {}, {}
    for _, p in ipairs(all) do
      for _, b in ipairs(p.blocks) do
        local k, msg = kind(b)
        if k then
          counts[k] = (counts[k] or 0) + 1
          if k == "notrun" then why[#why + 1] = b.page .. ":" .. b.line .. ": " .. b.marker end
        else
          bad[#bad + 1] = msg
        end
      end
    end
    assert(#bad == 0, table.concat(bad, "\n"))
    io.stderr:write(string.format("docs: %d sessions and %d Lua examples run, %d files, %d listings, "
      .. "%d examples not run:\n  %s\n", counts.session or 0, counts.lua or 0, counts.file or 0,
      counts.listing or 0, counts.notrun or 0, table.concat(why, "\n  ")))
    assert.is_true((counts.session or 0) > 0 and (counts.lua or 0) > 0)
  end)

  it("fails an example that drifted", function()
    local dir = workdir({})
    finally(function() H.run("rm -rf " .. shquote(dir)) end)
    local function one(md)
      local b = blocks("drift.md", md)[1]
      return check(b, dir)
    end
    assert.is_true((one("```sh\n$ lpar -e 'function(s) return s:upper() end' ::: ab\nAB\n```\n")))
    local ok, msg = one("```sh\n$ lpar -e 'function(s) return s:upper() end' ::: ab\nab\n```\n")
    assert.is_false(ok)
    assert.matches("printed something else", msg)
    assert.is_true((one("```lua\nprint(require('lpar').encode(1):byte(1, -1))  --> 3 2\n```\n")))
    ok, msg = one("```lua\nprint(require('lpar').encode(1):byte(1, -1))  --> 3 4\n```\n")
    assert.is_false(ok)
    assert.matches("printed something else", msg)
    ok, msg = one("```lua\nerror('a')  --! bad argument\n```\n")
    assert.is_false(ok)
    assert.matches("is not what the example says", msg)
    ok, msg = one("```sh\n$ lpar -e 'function(s) error(s) end' ::: x\n[...]\n```\n")
    assert.is_false(ok)
    assert.matches("exited with status 1", msg)
  end)

  it("show the benchmark figures of bench/results.json, in the table and the chart", function()
    local status, out = H.run("lua5.4 scripts/bench-report.lua bench/results.json --doc docs/benchmarks.md --check")
    assert(status == 0, out)
    local run = require("cjson").decode(readfile("bench/results.json"))
    assert.is_nil(run.tiny)
    local svg = readfile("docs/bench.svg")
    assert.truthy(svg:find(run.date, 1, true), "docs/bench.svg is not drawn from bench/results.json")
    assert.truthy(readfile("README.md"):find("](docs/bench.svg)", 1, true))
  end)

  it("has a table that fails the check once a figure is edited by hand", function()
    local dir = workdir({})
    finally(function() H.run("rm -rf " .. shquote(dir)) end)
    local doc = readfile("docs/benchmarks.md")
    local edited = doc:gsub("(%d+%.%d+) ms", "9%1 ms", 1)
    assert.are_not.equal(doc, edited)
    writefile(dir .. "/benchmarks.md", edited)
    local status, _, err = H.run("lua5.4 scripts/bench-report.lua bench/results.json --doc " .. shquote(dir)
      .. "/benchmarks.md --check")
    assert.equal(1, status)
    assert.matches("is not what bench/results.json gives", err)
  end)

  it("are drawn by scripts/bench --plot (a tiny run, on Lua 5.4 and LuaJIT)", function()
    local dir = workdir({})
    finally(function() H.run("rm -rf " .. shquote(dir)) end)
    local status, out, err = H.run(string.format(
      "LPAR_BUILD=%s timeout 600 scripts/bench --tiny --plot --lua 5.4,luajit --out %s/b", shquote(build),
      shquote(dir)))
    assert(status == 0, out .. err)
    local run = require("cjson").decode(readfile(dir .. "/b/results.json"))
    assert.is_true(run.tiny)
    local ids = {}
    for _, c in ipairs(run.cases) do
      ids[#ids + 1] = c.id
      assert.is_true(c.serial > 0 and c.floor > 0 and c.tools.lpar.best > 0, c.id)
    end
    assert.same({"A", "B", "C", "D", "pool8", "poolB", "cli10k", "cli1m", "clicpu"}, ids)
    -- every case on LuaJIT too, against LuaJIT's own serial loop
    assert.equal("Lua 5.4", run.lua)
    assert.equal(1, #run.others)
    local jit = run.others[1]
    assert.equal("LuaJIT 2.1", jit.lua)
    local jids = {}
    for _, c in ipairs(jit.cases) do
      jids[#jids + 1] = c.id
      assert.is_true(c.serial > 0 and c.floor > 0 and c.tools.lpar.best > 0, c.id)
    end
    assert.same(ids, jids)
    assert.matches("one luajit loop over the file", jit.cases[7].serial_is, 1, true)
    local svg = readfile(dir .. "/b/bench.svg")
    assert.matches("^%s*<%?xml", svg)
    assert.matches("</svg>%s*$", svg)
    for _, label in ipairs({"lpar", "xargs -P", "floor", "CLI 1M", run.date}) do
      assert.truthy(svg:find(label, 1, true), label)
    end
    if os.execute("command -v xmllint >/dev/null") then
      local xs, xout, xerr = H.run("xmllint --noout " .. shquote(dir .. "/b/bench.svg"))
      assert(xs == 0, xout .. xerr)
    end
    local doc = readfile(dir .. "/b/benchmarks.md")
    assert.matches("| CLI: 200 trivial lines", doc, 1, true)
    assert.matches("| case | Lua 5.4: serial | Lua 5.4: floor | Lua 5.4: lpar | LuaJIT 2.1: serial", doc, 1, true)
    assert.is_nil(out:find("warning", 1, true), out)
  end)

  for _, p in ipairs(all) do
    describe(p.page, function()
      local dir
      lazy_setup(function() dir = workdir(p.blocks) end)
      lazy_teardown(function() if dir then H.run("rm -rf " .. shquote(dir)) end end)
      for _, b in ipairs(p.blocks) do
        local k = kind(b)
        if k == "session" or k == "lua" then
          it(string.format("line %d (%s) runs as written", b.line, k == "lua" and "Lua" or "shell"), function()
            local ok, msg = check(b, dir)
            assert(ok, msg)
          end)
        end
      end
    end)
  end
end)
