-- lpar.cli: the lpar command: options, the script, the loop over the
-- items, how results are printed and how failures are reported.
-- main.c runs M.main(argv, c) with c, the C parts of the hot path.

local M = {}

-- Lua 5.1, 5.2 and LuaJIT lack some of the library this file uses
-- (math.type, string.pack, utf8...): this file gets them in locals that
-- shadow the libraries here only, not in the user's globals.
local math, table, string, utf8, load, xpcall =
  math, table, string, utf8, load, xpcall
-- what debug.getinfo tells of a frame for a traceback ('t', tail calls,
-- is 5.2's)
local FRAMEINFO = _VERSION == "Lua 5.1" and "Slnf" or "Slnft"

-- A generic for's iterator and its closing value (Lua 5.4), as a call's
-- results: before 5.4 the closing value is dropped.
local function closing(iter, value) return iter, nil, nil, value end
if not math.type then
  local floor, G, unpack = math.floor, _G, table.unpack or _G.unpack
  local function isint(x)
    return type(x) == "number" and x == floor(x) and x >= -2^63 and x < 2^63
  end
  math = setmetatable({
    type = function(x)
      if type(x) == "number" then return isint(x) and "integer" or "float" end
    end,
    tointeger = function(x) if isint(x) then return x end end,
  }, {__index = G.math})
  -- what 5.3's string (pack, unpack), table and utf8 libraries add:
  -- lua-compat53's, linked into lpar (see main.c)
  string = setmetatable(require "lpar.compat53.string", {__index = G.string})
  table = setmetatable(require "lpar.compat53.table", {__index = G.table})
  utf8 = utf8 or require "lpar.compat53.utf8"
  if not pcall(load, "return") then -- 5.1: load of strings, with a mode
    local loadstring = G.loadstring
    load = function(src, name, mode)
      if mode == "t" and src:byte(1) == 27 then
        return nil, "attempt to load a binary chunk (mode is 't')"
      end
      return loadstring(src, name)
    end
  end
  if select("#", xpcall(function(...) return ... end, print, 1)) == 1 then
    local pxpcall = xpcall -- 5.1: xpcall passes no arguments
    xpcall = function(f, h, ...)
      local args = table.pack(...)
      return pxpcall(function() return f(unpack(args, 1, args.n)) end, h)
    end
  end
end

-- How this file names itself in tracebacks: frames from here are cut.
local SELF = debug.getinfo(1, "S").short_src

M.usage = "usage: lpar [options] script.lua [items.txt | -] [args...]\n" ..
  "       lpar [options] -e CODE [items.txt | -] [args...]\n" ..
  "       lpar [options] -a items.txt [-a more.txt...] script.lua [args...]\n" ..
  "       lpar [options] script.lua [args...] ::: item1 item2..."

M.help = M.usage .. [[


Runs the function that the script returns on each line of items.txt (or
of stdin) in worker processes, and prints one line per result, in input
order, as soon as every earlier item is done.

options:
  -j, --jobs N        run at most N workers (default 8); N% of the CPUs,
                      +N / -N: the CPUs plus or minus N
      --chunk N       hand out N items at a time (default: adaptive)
      --unordered     print results as they finish, not in input order
      --timeout SECS  stop an item that runs longer than SECS seconds
      --halt          stop at the first failed item
      --halt WHEN,WHAT=N  stop when N (or N%) items failed (fail=),
                      succeeded (success=) or settled (done=): now kills
                      the running items, soon lets them finish; never
      --retries N     try a failed item up to N more times on fresh workers
      --max-memory SIZE  limit each worker's Lua memory (like 512M); an
                      item that needs more fails
  -o, --output FILE   write the results to FILE instead of stdout
      --joblog FILE   record each item: line, status, seconds, attempts,
                      start, host, the error's first line
      --events FILE   write each item's start and end as JSON lines
                      (item, event, status, attempt, host, seconds)
      --resume        go on from where a run with the same --joblog and
                      -o stopped (even killed): nothing lost or repeated;
                      refused if the script, items or arguments differ
      --resume-failed run again only the items the joblog records as
                      failed, appending their outcome to it
  -0, --null          items end with NUL bytes, not newlines
      --null-output   results end with NUL bytes, not newlines
      --json          print every result as one line of JSON
      --quiet         no message per failed item: only the summary
  -a, --arg-file FILE the items are FILE's lines (repeat: files in turn);
                      then all that follows the script is its arguments
  ::: ITEM...         after the script and its arguments: these are the items
      --colsep SEP    split each line where the Lua pattern SEP matches
                      (\t is a tab); f gets the fields as arguments
      --tag           start each result line with its item and a tab
      --number        start each result line with its input line number
                      and a tab (shards merge back: sort -m -n)
      --shard K/N     take input lines K, K+N, K+2N... only: N runs (a
                      job array) split one input, each with its own -o;
                      the joblog and --number keep the input's numbers
  -S, --host [N/]CMD  run workers on another machine: CMD (ssh node1,
                      srun -N1 -n1 -w node2, ...) followed by
                      'lpar --worker -j N' starts an agent there; ':' is
                      this machine; repeat, or separate with commas
      --hosts FILE    the hosts are FILE's lines (# starts a comment)
      --remote-lpar CMD  the agent's command on the hosts (default lpar)
  -e CODE             the script is CODE, not a file: a chunk, or a
                      function expression; several run in order, the
                      last one gives f
      --progress      show done/total, rate and ETA on stderr
      --version       print the version
  -h, --help          print this help

Options come before the script (short ones run together: -0j2); what
follows it is the script's (in 'arg'). The script returns f(item), or
{map = f, init = fn, close = fn} where init and close run once in each
worker. A script that returns nothing is just run, with the 'parallel'
function and require "lpar": -j, --timeout, --retries, --max-memory,
--chunk and --unordered are the defaults of its calls, -o FILE its stdout.

Results: a string as is; numbers and booleans as tostring gives them;
several values joined by tabs; a table as one line of JSON; nil: no line.

exit status: 0 all items succeeded, 1 one or more failed, 2 usage or
script error, 128+N on signal N (130 Ctrl-C, 141 output closed).

examples:
  lpar -e 'function(s) return s:upper() end' words.txt
  lpar -j4 --progress fetch.lua urls.txt > pages.jsonl
  find . -name '*.log' -print0 | lpar -0 count.lua
  tail -f access.log | lpar parse.lua
]]

-- ---- options ----

local function posint(name, v)
  local n = math.tointeger(tonumber(v))
  if not n or n < 1 then
    return nil, ("bad value for '%s': '%s' (expected a positive integer)")
      :format(name, v)
  end
  return n
end

local function count(name, v)
  local n = math.tointeger(tonumber(v))
  if not n or n < 0 then
    return nil, ("bad value for '%s': '%s' (expected a whole number)")
      :format(name, v)
  end
  return n
end

-- --max-memory SIZE: checked by the parser of the module's max_memory
-- (size, a C helper), kept as written (the module reads it again, and
-- messages name the limit as the user gave it)
local function memsize(name, v, _, size)
  local bytes, why = size(v)
  if not bytes then
    return nil, ("bad value for '%s': '%s' %s"):format(name, v, why)
  end
  return v
end

-- most times a failed item is run again (LPAR_MAXRETRIES)
local MAXRETRIES = 1000000

-- --retries N: a whole number up to MAXRETRIES
local function retrycount(name, v)
  local n, err = count(name, v)
  if n and n > MAXRETRIES then
    return nil, ("bad value for '%s': '%s' (at most %d)"):format(name, v, MAXRETRIES)
  end
  return n, err
end

local function seconds(name, v)
  local n = tonumber(v)
  if not n or n ~= n or n <= 0 then
    return nil, ("bad value for '%s': '%s' (expected a number of seconds)")
      :format(name, v)
  elseif n > 1e9 then
    return nil, ("bad value for '%s': '%s' (at most 1e9 seconds)"):format(name, v)
  end
  return n
end

local function shard(name, v)
  local k, n = v:match("^(%d+)/(%d+)$")
  k, n = math.tointeger(tonumber(k)), math.tointeger(tonumber(n))
  if not k or not n or k < 1 or k > n then
    return nil, ("bad value for '%s': '%s' (expected K/N, 1 <= K <= N, like 2/3)")
      :format(name, v)
  end
  return {k, n}
end

-- -j: N, N% of the CPUs, or +N / -N: the CPUs plus or minus N (at least 1)
local function jobs(name, v, cpus)
  local n = math.tointeger(tonumber(v:match("^%d+$") or v:match("^(%d+)%%$")
                                      or v:match("^[+-]%d+$")))
  if not n or (v:match("^%d") and n < 1) then
    return nil, ("bad value for '%s': '%s' (expected N, N%% of the CPUs, " ..
                 "+N or -N: the CPUs plus or minus N)"):format(name, v)
  end
  if v:sub(-1) == "%" then return math.max(1, math.floor(cpus * n / 100)) end
  if v:match("^[+-]") then return math.max(1, cpus + n) end
  return n
end

-- --halt WHEN,WHAT=N[%]: false for never, else {when, what, n | pct, text}
local function haltvalue(name, v)
  if v == "never" then return false end
  local when, what, n, pct = v:match("^(%a+),(%a+)=([%d.]+)(%%?)$")
  local h = {when = when, what = what, text = v}
  if pct == "%" then
    h.pct = tonumber(n)
    if h.pct and not (h.pct > 0 and h.pct <= 100) then h.pct = nil end
  else
    h.n = math.tointeger(tonumber(n))
    if h.n and h.n < 1 then h.n = nil end
  end
  if not (when == "now" or when == "soon") or not (what == "fail" or what == "success" or
      what == "done") or not (h.n or h.pct) then
    return nil, ("bad value for '%s': '%s' (expected never, or now or soon, then " ..
                 "fail, success or done =N or =N%%, like now,fail=1)"):format(name, v)
  end
  return h
end

-- Where the set that starts at 'i' of pattern 'p' ("[...]") ends: the
-- index after its ']', or nil and a message.
local function setend(p, i)
  i = i + 1
  if p:sub(i, i) == "^" then i = i + 1 end
  repeat -- the first byte is in the set even when it is ']'
    if i > #p then return nil, "malformed pattern (missing ']')" end
    local c = p:sub(i, i)
    i = i + (c == "%" and 2 or 1)
  until p:sub(i, i) == "]"
  return i + 1
end

-- Whether the Lua pattern 'p' can match an empty string somewhere, in
-- some subject: true when every item of it can be empty (a class with
-- *, - or ?, %f[set], (), the anchors, a back-reference to a capture
-- that can be empty); or nil and a message when p is malformed. Lua
-- patterns have no alternation, so a single item that takes at least
-- one byte (a class, alone or with +, or %bxy) means it never can.
function M.nullable(p)
  local i, empty = 1, true
  -- captures, numbered as they open: whether each closed one can be
  -- empty; the open ones: {number, whether all before it could be}
  local caps, ncaps, open = {}, 0, {}
  if p:sub(1, 1) == "^" then i = 2 end
  while i <= #p do
    local c, item = p:sub(i, i), nil
    local j
    if c == "(" then
      ncaps = ncaps + 1
      if p:sub(i + 1, i + 1) == ")" then -- a position capture
        caps[ncaps], item, j = true, true, i + 2
      else
        open[#open + 1], j = {ncaps, empty}, i + 1
        empty = true
      end
    elseif c == ")" then
      if #open == 0 then return nil, "invalid pattern capture" end
      local cap = table.remove(open)
      caps[cap[1]] = empty
      empty = cap[2] and empty
      j = i + 1
    elseif c == "$" and i == #p then
      item, j = true, i + 1
    elseif c == "%" and p:sub(i + 1, i + 1) == "b" then
      if #p < i + 3 then return nil, "malformed pattern (missing arguments to '%b')" end
      item, j = false, i + 4
    elseif c == "%" and p:sub(i + 1, i + 1) == "f" then
      if p:sub(i + 2, i + 2) ~= "[" then return nil, "missing '[' after '%f' in pattern" end
      local e, err = setend(p, i + 2)
      if not e then return nil, err end
      item, j = true, e
    elseif c == "%" and p:find("^%d", i + 1) then
      local k = tonumber(p:sub(i + 1, i + 1))
      if caps[k] == nil then return nil, "invalid capture index %" .. k end
      item, j = caps[k], i + 2
    else -- one byte of a class, then maybe *, +, - or ?
      if c == "%" then
        if i == #p then return nil, "malformed pattern (ends with '%')" end
        j = i + 2
      elseif c == "[" then
        local e, err = setend(p, i)
        if not e then return nil, err end
        j = e
      else
        j = i + 1
      end
      local q = p:sub(j, j)
      item = q == "*" or q == "-" or q == "?"
      if item or q == "+" then j = j + 1 end
    end
    if item ~= nil then empty = empty and item end
    i = j
  end
  if #open > 0 then return nil, "unfinished capture" end
  return empty
end

-- --colsep SEP: a Lua pattern, in which \t stands for a tab; not one
-- that can match an empty string anywhere (a split there makes no
-- sense: %f[%w], (), x*, ^, $)
local function colsep(name, v)
  local sep = v:gsub("\\t", "\t")
  local empty, err = M.nullable(sep)
  local ok, at = pcall(string.find, "", sep)
  if not ok or empty == nil then
    return nil, ("bad value for '%s': '%s' (not a Lua pattern: %s)"):format(name, v, err or at)
  end
  if empty or at then
    return nil, ("bad value for '%s': '%s' (it can match an empty string)"):format(name, v)
  end
  return sep
end

-- option -> field, and the check of its value (true: any string)
local valued = {
  ["-j"] = "jobs", ["--jobs"] = "jobs", ["--chunk"] = "chunk",
  ["--timeout"] = "timeout", ["-e"] = "code", ["--retries"] = "retries",
  ["-o"] = "output", ["--output"] = "output", ["--joblog"] = "joblog",
  ["--events"] = "events",
  ["--max-memory"] = "maxmem", ["--shard"] = "shard", ["-a"] = "files",
  ["--arg-file"] = "files", ["--colsep"] = "colsep", ["--halt"] = "halt",
  ["-S"] = "hosts", ["--host"] = "hosts", ["--hosts"] = "hostsfile",
  ["--remote-lpar"] = "remotelpar",
}
local checks = {jobs = jobs, chunk = posint, timeout = seconds,
                retries = retrycount, maxmem = memsize, shard = shard, halt = haltvalue,
                colsep = colsep}
-- options that may be given several times: a list of their values
local lists = {files = true, code = true, hosts = true}
local flags = {
  ["--unordered"] = "unordered", ["-0"] = "nul",
  ["--null"] = "nul", ["--progress"] = "progress", ["--version"] = "version",
  ["-h"] = "help", ["--help"] = "help", ["--resume"] = "resume", ["--tag"] = "tag",
  ["--number"] = "number",
  ["--resume-failed"] = "resumefailed", ["--null-output"] = "nulout", ["--json"] = "json", ["--quiet"] = "quiet",
}

-- Whether an argument after a plain --halt is its value (else the
-- script): never, or WORD,WORD=...
local function halting(v)
  return v == "never" or (v and v:match("^%a+,%a+=")) ~= nil
end

-- Parse argv (argv[1..n], as main gets it) into options, or nil and a
-- message; 'cpus' is for -j N%, 'size' reads --max-memory (c.size).
-- o.script is the script's path (nil with -e); o.at is where the script
-- stands in argv: arg[k] of the script is argv[o.at + k], for k up to
-- o.last - o.at. o.items: the items given after ':::'; o.files: those
-- of -a.
function M.parse(argv, cpus, size)
  local o = {}
  local i = 1
  cpus = cpus or 1
  -- option 'name' with 'value' (nil: take the next argument if it needs
  -- one); nil and a message if it is not right
  local function option(name, value)
    if name == "--halt" and value == nil and not halting(argv[i + 1]) then
      o.halt = {when = "now", what = "fail", n = 1} -- at the first failure
      return true
    end
    if flags[name] then
      if value then return nil, ("option '%s' takes no value"):format(name) end
      o[flags[name]] = true
      return true
    end
    local key = valued[name]
    if not key then return nil end
    if not value then
      i = i + 1
      value = argv[i]
      if value == nil then
        return nil, ("option '%s' needs a value"):format(name)
      end
    end
    if checks[key] then
      local v, err = checks[key](name, value, cpus, size)
      if v == nil then return nil, err end
      value = v
    end
    if lists[key] then
      o[key] = o[key] or {}
      table.insert(o[key], value)
    else
      o[key] = value
    end
    return true
  end
  while argv[i] ~= nil do
    local a = argv[i]
    if a == "--" then
      i = i + 1
      break
    end
    if a == "-" or a:sub(1, 1) ~= "-" then break end
    local name, value = a:match("^(%-%-[^=]+)=(.*)$")
    local ok, err
    if name then
      ok, err = option(name, value)
    elseif a:sub(2, 2) ~= "-" and #a > 2 and not flags[a] and not valued[a] then
      -- short options run together: -0j2, -j4, -ecode
      for k = 2, #a do
        local short = "-" .. a:sub(k, k)
        if valued[short] then
          local rest = a:sub(k + 1)
          ok, err = option(short, rest ~= "" and rest or nil)
          break
        end
        if not flags[short] then
          ok, err = nil, ("unknown option '%s' (in '%s')"):format(short, a)
          break
        end
        ok, err = option(short)
      end
    else
      ok, err = option(a)
    end
    if not ok then return nil, err or ("unknown option '%s'"):format(a) end
    i = i + 1
  end
  o.jobsgiven, o.jobs = o.jobs ~= nil, o.jobs or 8
  if o.help or o.version then return o end
  if o.json and o.tag then
    return nil, "--json and --tag: a tagged line is not JSON (use one)"
  end
  if o.resume and not (o.joblog and o.output) then
    return nil, "--resume needs --joblog FILE and -o FILE"
  end
  if o.events and (o.events == o.joblog or o.events == o.output) then
    return nil, ("--events and %s name one file (%s)")
                :format(o.events == o.joblog and "--joblog" or "-o", o.events)
  end
  if o.resumefailed and not o.joblog then
    return nil, "--resume-failed needs --joblog FILE"
  end
  if o.resumefailed and o.resume then
    return nil, "--resume and --resume-failed: use one"
  end
  if o.resume and o.unordered then
    return nil, "--resume needs ordered output (no --unordered)"
  end
  if o.code then
    o.at = i - 1
  else
    o.script = argv[i]
    if o.script == nil then return nil, "no script given" end
    if o.script == ":::" then return nil, "no script given before ':::'" end
    o.at = i
  end
  -- records are timed for the joblog and --events (here and on hosts)
  o.timed = o.joblog ~= nil or o.events ~= nil
  o.last = #argv
  for k = o.at + 1, #argv do
    if argv[k] == ":::" then
      o.items = table.move(argv, k + 1, #argv, 1, {})
      o.last = k - 1
      break
    end
  end
  if o.items and o.files then
    return nil, "both -a and ':::' give items: use one"
  end
  if o.items then
    for _, v in ipairs(o.items) do
      if v == ":::" then return nil, "only one ':::' list of items may be given" end
    end
  end
  return o
end

-- ---- results ----

local function jsonencoder()
  local ok, cjson = pcall(require, "cjson")
  if not ok then
    error("cannot print a table: lua-cjson is not installed", 0)
  end
  local j = cjson.new()
  j.encode_sparse_array(true) -- a sparse array becomes an object
  return j.encode, cjson.null
end

-- Whether string s is valid UTF-8: 5.4's utf8.len refuses surrogates
-- (U+D800..U+DFFF, bytes ED A0..BF), 5.3's and lua-compat53's take them.
local function isutf8(s)
  return utf8.len(s) ~= nil and not s:find("\237[\160-\191]")
end

-- Where in v the first string (value or key) that is not valid UTF-8
-- lies, as "[2].name" ("" for v itself), or nil if there is none: JSON
-- holds UTF-8 only. 'seen' stops at shared tables and cycles.
local function badutf8(v, path, seen)
  if type(v) == "string" then
    if isutf8(v) then return nil end
    return path
  end
  if type(v) ~= "table" or seen[v] then return nil end
  seen[v] = true
  for k, x in next, v do
    local step
    if type(k) == "string" and k:match("^[%a_][%w_]*$") then
      step = (path == "" and "" or ".") .. k
    else
      step = "[" .. (type(k) == "string" and M.shorten(k, 20) or tostring(k)) .. "]"
    end
    if type(k) == "string" and not isutf8(k) then
      return path .. step .. " (its key)"
    end
    local at = badutf8(x, path .. step, seen)
    if at then return at end
  end
  return nil
end

-- f's result v (a table, or with --json any value) as one line of JSON,
-- or an error that fails the item.
local function tojson(encode, v)
  local at = badutf8(v, "", {})
  if at then
    error(at == "" and "cannot print the result as JSON: it is not valid UTF-8" or
          ("cannot print the result as JSON: the string at %s is not valid UTF-8"):format(at), 0)
  end
  local ok, s = pcall(encode, v)
  if not ok then error("cannot print the result as JSON: " .. tostring(s), 0) end
  return s
end

-- A function that turns f's return values into one output line, or nil
-- for none. 'encode' (a table -> JSON function) is optional. With 'json'
-- every result is one line of JSON: several values make an array.
function M.formatter(encode, json)
  local null
  local function field(v)
    local t = type(v)
    if t == "string" then return v end
    if t == "number" or t == "boolean" then return tostring(v) end
    if t == "nil" then return "" end
    if t == "table" then
      if not encode then encode, null = jsonencoder() end
      return tojson(encode, v)
    end
    local mt = getmetatable(v)
    if type(mt) == "table" and mt.__tostring then return tostring(v) end
    error(("cannot print a %s result"):format(t), 0)
  end
  -- a value JSON cannot hold as it is: __tostring's string, or the error
  local function plain(v)
    local t = type(v)
    if t == "function" or t == "thread" or (t == "userdata" and v ~= null) then
      return field(v)
    end
    return v
  end
  if json then
    return function(...)
      local n, v = select("#", ...), ...
      if n == 1 then
        if v == nil then return nil end
        if not encode then encode, null = jsonencoder() end
        return tojson(encode, plain(v))
      end
      if n == 0 then return nil end
      if not encode then encode, null = jsonencoder() end
      local t, any = {...}, false
      for k = 1, n do
        if t[k] == nil then
          t[k] = null
        else
          any = true
          t[k] = plain(t[k])
        end
      end
      if not any then return nil end
      return tojson(encode, t)
    end
  end
  return function(...)
    local n, v = select("#", ...), ...
    if n == 1 then
      if type(v) == "string" then return v end
      if v == nil then return nil end
      return field(v)
    end
    if n == 0 then return nil end
    local t, any = {...}, false
    for k = 1, n do
      if t[k] ~= nil then any = true end
      t[k] = field(t[k])
    end
    if not any then return nil end
    return table.concat(t, "\t", 1, n)
  end
end

-- f called with the fields of each record, split where 'sep' (a Lua
-- pattern) matches: --colsep.
function M.fields(map, sep)
  local find, sub, unpack = string.find, string.sub, table.unpack
  return function(rec)
    local t, n, pos = {}, 0, 1
    while true do
      local a, b = find(rec, sep, pos)
      if not a then break end
      if b < a then -- an empty match (%f...): it would split forever
        error(("--colsep %s matched an empty string at byte %d"):format(sep, a), 0)
      end
      n = n + 1
      t[n] = sub(rec, pos, a - 1)
      pos = b + 1
    end
    n = n + 1
    t[n] = sub(rec, pos)
    return map(unpack(t, 1, n))
  end
end

-- f whose output line (made by fmt) starts with the record and a tab:
-- --tag. The line goes on through fmt, which passes a string as is.
function M.tagged(map, fmt)
  return function(rec)
    local line = fmt(map(rec))
    if line ~= nil then return rec .. "\t" .. line end
    return nil
  end
end

-- ---- failures ----

local escapes = {["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
                 ['"'] = '\\"', ["\\"] = "\\\\"}

-- An item as it is shown in a message: quoted, control bytes escaped (and
-- every byte >= 128 unless the text is valid UTF-8), cut after 'max' bytes.
function M.shorten(s, max)
  max = max or 40
  s = tostring(s)
  local cut = #s > max
  if cut then
    local k = max -- do not split a UTF-8 sequence
    while k > 0 and (s:byte(k + 1) or 0) >= 0x80 and s:byte(k + 1) < 0xC0 do
      k = k - 1
    end
    s = s:sub(1, k)
  end
  local class = utf8.len(s) and '[%c"\\]' or '[%c"\\\128-\255]'
  s = s:gsub(class, function(ch)
    return escapes[ch] or ("\\x%02x"):format(ch:byte())
  end)
  return '"' .. s .. '"' .. (cut and "..." or "")
end

-- Text (a message, a traceback) without the frames of this file and what
-- lies below them, nor the C functions just above them (xpcall, or error
-- when lpar itself raised): a traceback left with no frame goes too.
function M.clean(text)
  local lines, cut = {}, false
  for line in (text .. "\n"):gmatch("(.-)\n") do
    if line:sub(1, #SELF + 2) == "\t" .. SELF .. ":" then
      cut = true
      break
    end
    lines[#lines + 1] = line
  end
  while cut and lines[#lines] and lines[#lines]:match("^\t%[C%]: in ") do
    lines[#lines] = nil
  end
  while lines[#lines] == "stack traceback:" or lines[#lines] == "" do
    lines[#lines] = nil
  end
  return table.concat(lines, "\n")
end

-- The name of function 'f' as a loaded module holds it ("error",
-- "string.rep"), as Lua's tracebacks name C functions; nil if none does.
local function modname(f)
  for mod, t in pairs(package.loaded) do
    if type(t) == "table" then
      for k, v in pairs(t) do
        if v == f and type(k) == "string" then
          return mod == "_G" and k or mod .. "." .. k
        end
      end
    end
  end
end

-- One line of a traceback for the frame 'info' (getinfo FRAMEINFO), as
-- luaL_traceback writes it.
local function frameline(info)
  local where = info.what == "C" and "[C]" or ("%s:%d"):format(info.short_src, info.currentline)
  local name = info.what == "C" and modname(info.func)
  if name then
    name = ("function '%s'"):format(name)
  elseif info.namewhat ~= "" then
    name = ("%s '%s'"):format(info.namewhat, info.name)
  elseif info.what == "main" then
    name = "main chunk"
  elseif info.what ~= "C" then
    name = ("function <%s:%d>"):format(info.short_src, info.linedefined)
  else
    name = "?"
  end
  return "\n\t" .. where .. ": in " .. name .. (info.istailcall and "\n\t(...tail calls...)" or "")
end

-- 'msg' and a traceback from 'level' (of the caller) down to the user's
-- function that lpar called, which is named as written (function
-- <file:line>), not by lpar's variable; lpar's own frames are not shown.
-- Long ones keep the first 10 and the last 11 levels, as Lua's do.
function M.trace(msg, level)
  level = level + 1
  -- the deepest level, found by doubling and halving: each getinfo walks
  -- from the top, and a stack may be deep (a stack overflow)
  local lo, hi = level, level * 2
  while debug.getinfo(hi, "S") do lo, hi = hi, hi * 2 end
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if debug.getinfo(mid, "S") then lo = mid else hi = mid end
  end
  -- from there up, past lpar's frames (this file's and C functions), to
  -- the first frame of the user's, called by this file: 'top'. (5.1 shows
  -- a tail call as a level of its own, what = "tail": one made by this
  -- file counts as its own.)
  local top, l = nil, lo
  while l > level do
    local info, below = debug.getinfo(l - 1, "S"), debug.getinfo(l, "S")
    l = l - 1
    if info.short_src ~= SELF and info.what ~= "C" and info.what ~= "tail" then
      if below.short_src ~= SELF and below.what ~= "tail" then break end
      top = l
      break
    end
  end
  if not top then return M.clean(debug.traceback(msg, level)) end
  local out, n = {msg, "\nstack traceback:"}, top - level + 1
  local function add(lv)
    local info = debug.getinfo(lv + 1, FRAMEINFO) -- (this function is a level)
    if lv == top and info.what ~= "C" then -- the user's function, as written
      info.namewhat, info.name = "", nil
    end
    out[#out + 1] = frameline(info)
  end
  if n <= 21 then
    for lv = level, top do add(lv) end
  else
    for lv = level, level + 9 do add(lv) end
    out[#out + 1] = ("\n\t...\t(skipping %d levels)"):format(n - 21)
    for lv = top - 10, top do add(lv) end
  end
  return M.clean(table.concat(out))
end

-- A failed item travels from the worker as one string: a tag, then the
-- shortened item, the message, the traceback and the kind of the failure
-- ("error" or "memory", as lpar.errkind names them), each as
-- <length>:<bytes> (no NUL byte: the engine handles the message as a C
-- string).
local TAG = "\1lpar-failure\1"

local function packfailure(...)
  local t = {TAG}
  for k = 1, select("#", ...) do
    local s = select(k, ...)
    t[#t + 1] = #s .. ":" .. s
  end
  return table.concat(t)
end

function M.unpackfailure(e)
  if type(e) ~= "string" or e:sub(1, #TAG) ~= TAG then return nil end
  local pos, parts = #TAG + 1, {}
  for k = 1, 4 do
    local n, at = e:match("^(%d+):()", pos)
    if not n then return nil end
    parts[k] = e:sub(at, at + n - 1)
    pos = at + n
  end
  return parts[1], parts[2], parts[3], parts[4]
end

-- An error value as text, as the workers of the module describe it: a
-- string or number as it is, else what its __tostring gives (if that
-- works and gives a string), else its type.
local function errortext(e)
  if type(e) == "string" or math.type(e) then return tostring(e) end
  local mt = getmetatable(e)
  if type(mt) == "table" and mt.__tostring then
    local ok, s = pcall(tostring, e)
    if ok and type(s) == "string" then return s end
  end
  return ("(error object is a %s value)"):format(type(e))
end

-- A batch of this many bytes or more is let go (and the garbage
-- collected) as soon as it is done, so that a long line costs each
-- process at most twice its size: its bytes and its records are not
-- still held when the next batch comes.
local BIGBATCH = 1048576 -- 2^20, written so that every Lua parses it

-- Whether batch 'block' (its bytes, or the range {offset, length} of
-- them in the input file) is that long.
local function isbig(block)
  return (type(block) == "string" and #block or type(block) == "table" and block[2] or 0)
         >= BIGBATCH
end

-- The function the workers run on a batch (a block of records, see
-- main.c; the engine's policy sizes it): a block is the records' bytes
-- (a pipe, several files, --shard, hosts) or, for one regular file, the
-- byte range {offset, length} of them in it, which c.split reads from
-- the file's fd that the worker inherited. Returns the output (lines, each
-- ended by a newline) or a table of parts: output text, or {k, failure}
-- for the batch's k-th record; its field 'rest', if set, is the first
-- record it did not run (lpar asked the batch to end early: it ran far
-- past its time, see lpar_policy_overdue). With 'halt' it stops at the
-- first failure. With 'timed' it always returns the table, its field
-- 'times' the seconds each record took (string.pack'ed doubles). With
-- 'label' (--number) a batch comes as {first, block} (first: its first
-- record's number in the reader) and each output line starts with
-- label(number of its record). With 'plain' (--tag: map is M.tagged of
-- plain) a long batch of bytes that holds one record is run by plain,
-- and its output line goes back untagged, in the field 'bare', with the
-- record's length in 'reclen': lpar holds the batch and writes the
-- record before it (one copy of a long line fewer on both sides).
function M.batcher(map, fmt, nul, halt, timed, c, maxmem, label, plain)
  local concat, shorten, clean = table.concat, M.shorten, M.clean
  local split, now, overdue = c.split, c.now, c.overdue
  local eol = c.eol or "\n" -- "\0" with --null-output
  local out, times, recs = {}, {}, {}
  local nrec, k, n, t1, over, first, call
  -- the records from k + 1 on, until one fails (one xpcall for all) or
  -- lpar asks for the rest back
  local function loop()
    while k < nrec do
      k = k + 1
      local r = fmt(call(recs[k]))
      if r ~= nil then
        n = n + 1
        out[n] = label and label(first + k - 1) .. r or r
      end
      if overdue(k) and k < nrec then
        over = true
        return
      end
    end
  end
  local function timedloop()
    while k < nrec do
      k = k + 1
      t1 = now()
      local r = fmt(call(recs[k]))
      times[k] = now() - t1
      if r ~= nil then
        n = n + 1
        out[n] = label and label(first + k - 1) .. r or r
      end
      if overdue(k) and k < nrec then
        over = true
        return
      end
    end
  end
  local function handler(e)
    return {errortext(e), M.trace("", 2):sub(2)}
  end
  return function(block)
    local parts
    if label then first, block = block[1], block[2] end
    local big = isbig(block)
    -- the result of the last long batch, sent, is garbage: before another
    -- long batch is read, let it go
    if big then collectgarbage() end
    recs, nrec = split(block, nul, recs)
    local bare = plain and big and nrec == 1 and type(block) == "string" and not label
    local reclen = bare and #recs[1]
    call = bare and plain or map
    -- a batch queued behind an overdue one goes back whole (one record
    -- runs here: it would only be sent again)
    over = nrec > 1 and overdue(0)
    k, n = 0, 0
    while k < nrec and not over do
      local ok, r = xpcall(timed and timedloop or loop, handler)
      if not ok then
        if type(r) ~= "table" then -- a memory error skips the handler
          r = {maxmem and ("not enough memory (limit %s)"):format(maxmem) or tostring(r), "",
               kind = "memory"}
        end
        if timed then times[k] = now() - t1 end
        parts = parts or {}
        if n > 0 then
          out[n + 1] = ""
          parts[#parts + 1] = concat(out, eol, 1, n + 1)
          n = 0
        end
        parts[#parts + 1] = {k, packfailure(shorten(recs[k]),
                                            (r[1]:gsub("%z", "\\0")), clean(r[2]),
                                            r.kind or "error")}
        -- with --halt ...,fail=1 the rest goes back: lpar stops
        if (halt or overdue(k)) and k < nrec then over = true end
        if halt then break end
      end
    end
    local text, alone = "", nil
    if n == 1 and big then
      -- one output line of a long batch goes as it is and its end of
      -- line apart: a concatenation would be one more copy of it
      alone, out[1] = out[1], nil
    elseif n > 0 then
      out[n + 1] = ""
      text = concat(out, eol, 1, n + 1)
    end
    if big then -- let a long batch go now, not when the next one is in
      block = nil -- luacheck: ignore 311 (the reference goes)
      for i = 1, nrec do recs[i] = nil end
      for i = 1, n + 1 do out[i] = nil end
      collectgarbage()
    end
    io.stdout:flush() -- what f printed (a worker leaves with _exit)
    if timed or over or alone then
      parts = parts or {}
      if timed then parts.times = string.pack(("d"):rep(k), table.unpack(times, 1, k)) end
      if over then parts.rest = k + 1 end
    elseif not parts then
      return text
    end
    if alone and bare then
      parts.bare, parts.reclen = alone, reclen
    elseif alone then
      parts[#parts + 1] = alone
      parts[#parts + 1] = eol
    end
    if text ~= "" then parts[#parts + 1] = text end
    return parts
  end
end

-- What cuts a batch (see M.batcher) for the engine, which runs parts of
-- it again (see "records" in job.c): slice(batch, from, to) -> the
-- batch of its records from..to. With 'numbered' (--number) a batch is
-- {first, block}.
function M.slicer(c, nul, numbered)
  local split, concat = c.split, table.concat
  local sep = nul and "\0" or "\n"
  local last, recs -- the batch cut last time (parts of one come together)
  return function(batch, from, to)
    local block = numbered and batch[2] or batch
    if block ~= last then last, recs = block, split(block, nul) end
    block = concat(recs, sep, from, to) .. sep
    if numbered then return {batch[1] + from - 1, block} end
    return block
  end
end

-- A string as JSON.
local function jsonstring(v)
  return '"' .. v:gsub('[%c"\\]', function(ch)
    return ch == '"' and '\\"' or ch == "\\" and "\\\\" or ("\\u%04x"):format(ch:byte())
  end) .. '"'
end

-- One --events line: record 'item' (its input line number) started or
-- ended ('event') at 'time' (seconds since the epoch); an end has its
-- status, seconds, error and the error's kind (lpar.errkind's names).
-- 'host' is given as JSON (M.jsonhost).
function M.eventline(item, event, status, attempt, host, time, secs, err, kind)
  if not status then
    return ('{"item":%d,"event":"%s","attempt":%d,"host":%s,"time":%.3f}\n')
           :format(item, event, attempt, host, time)
  end
  return ('{"item":%d,"event":"%s","status":"%s","attempt":%d,"host":%s,"time":%.3f,"seconds":%.6f%s%s}\n')
         :format(item, event, status, attempt, host, time, secs or 0,
                 err and ',"error":' .. jsonstring(err) or "",
                 kind and (',"kind":"%s"'):format(kind) or "")
end

-- A host as --events writes it (a JSON string), made once per host.
M.jsonhost = setmetatable({}, {__mode = "k", __index = function(t, h)
  local v = jsonstring(h)
  t[h] = v
  return v
end})

-- The first line of failure e's message, for the joblog: tabs and
-- control bytes escaped, at most 200 bytes.
function M.firstline(e)
  local _, msg = M.unpackfailure(e)
  msg = (msg or M.clean(errortext(e))):match("^[^\n]*")
  -- escaped, and cut at 200 bytes between escapes
  local out, n = {}, 0
  for ch in msg:gmatch(".") do
    local piece = ch:find("[%c\\]") and (escapes[ch] or ("\\x%02x"):format(ch:byte())) or ch
    if n + #piece > 200 then
      out[#out + 1] = "..."
      break
    end
    out[#out + 1] = piece
    n = n + #piece
  end
  msg = table.concat(out)
  return msg
end

-- failures reported with their traceback; the others without
M.shown = 5

-- What the failure summary adds when 'n' failures were shown without
-- their traceback.
function M.more(n, o)
  if n == 0 or o.quiet then return "" end
  return (" (%d shown without traceback, after the first %d)"):format(n, M.shown)
end

-- The message for item n that failed with e; with 'brief', without its
-- traceback, and then whether one was left out.
function M.describe(n, e, nul, brief, rec)
  local what = (nul and "item " or "line ") .. n
  local item, msg, tb = M.unpackfailure(e)
  if item then
    return ("lpar: %s (%s): %s%s"):format(what, item, msg,
                                          tb ~= "" and not brief and "\n" .. tb or ""),
           brief and tb ~= ""
  end
  if rec ~= nil then what = ("%s (%s)"):format(what, M.shorten(rec)) end
  return ("lpar: %s: %s"):format(what, M.clean(errortext(e)))
end

-- ---- progress ----

local function clock(s)
  s = math.floor(s + 0.5)
  if s >= 3600 then
    return ("%d:%02d:%02d"):format(math.floor(s / 3600), math.floor(s % 3600 / 60), s % 60)
  end
  return ("%d:%02d"):format(math.floor(s / 60), s % 60)
end

-- The progress line for 'done' of 'total' (nil if unknown) items after
-- 'elapsed' seconds.
function M.progressline(done, total, failed, elapsed)
  local rate = elapsed > 0 and done / elapsed or 0
  local s
  if total and total > 0 then
    local frac = math.min(done / total, 1)
    local width = 20
    local full = math.floor(frac * width)
    s = ("[%s%s] %d/%d %d%%"):format(("#"):rep(full), ("."):rep(width - full),
                                     done, total, math.floor(frac * 100))
  else
    s = ("%d done"):format(done)
  end
  s = s .. (" %.0f/s"):format(rate)
  if total and rate > 0 and done < total then
    s = s .. " ETA " .. clock((total - done) / rate)
  end
  if failed > 0 then s = s .. (" %d failed"):format(failed) end
  return s
end

-- On a terminal the line is handed over on every step: main.c draws it
-- after the output it counts, at most once per flush of the output.
local function progress(c, total)
  local start = c.now()
  local tty = c.isatty(2)
  local every = tty and 0 or 1
  local last, done, failed = -1, 0, 0
  local p = {}
  local function draw()
    local line = M.progressline(done, total, failed, c.now() - start)
    c.bar(tty and line or "lpar: " .. line)
  end
  function p.step(n, nfailed)
    done = done + n
    failed = nfailed
    local t = c.now()
    if t - last >= every then
      last = t
      draw()
    end
  end
  function p.finish()
    draw()
    c.bar()
  end
  if tty then draw() end
  return p
end

-- ---- the run ----

local function say(c, msg)
  if c.report then
    c.report(msg)
  else
    io.stderr:write(msg, "\n")
  end
end

local function readall(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function fail(code, msg)
  io.stderr:write("lpar: ", msg, "\n")
  return code
end

-- what lpar says when a signal stops a run, by exit status
local signame = {[130] = "interrupted", [143] = "terminated", [129] = "hangup"}

-- A run stopped by signal 'sig' (see stopping in M.run): raised as this
-- value, so that nothing else is taken for it.
local Stop = {}

-- The failure 'e' just caught, with its kind and detail (lpar.errkind,
-- asked before lpar gives another failure): {e, kind, detail}.
local function caught(e)
  return {e, require("lpar").errkind(e)}
end

-- Exit status and message for an error that ended a run (as 'caught'
-- gives it), by its kind.
local function stopped(f)
  local e, kind, detail = f[1], f[2], f[3]
  if getmetatable(e) == Stop then return 128 + e.signal, "lpar: " .. signame[128 + e.signal] end
  if kind == "interrupted" then return 128 + detail, "lpar: " .. e end
  if kind == "output" then return 141, nil end
  local text = M.clean(errortext(e))
  if kind == "init" then return 2, "lpar: " .. text end
  if kind == "memory" then -- max_memory below what the workers inherit
    return 2, "lpar: --max-memory" .. text:sub(#"max_memory" + 1)
  end
  return 1, "lpar: " .. text
end

M.logheader = "# line\tstatus\tseconds\tattempts\tstart\thost\terror\n"
M.logfirst = "# lpar joblog 3\n"
-- the first line of joblogs of format 2 (marks without a hash of the
-- output), which --resume refuses with a clear message
M.v2first = "# lpar joblog 2\n"
-- the first lines of joblogs of format 1 (lpar before the start, host
-- and error columns), which --resume refuses with a clear message
M.oldheader = "# line\tstatus\tseconds\tattempts\n"
M.oldfirst = "# lpar joblog 1\n"

-- Where to resume from a joblog's text: output bytes to keep, joblog
-- bytes to keep, records done (all 0 to start afresh), and its marks
-- ({bytes, line, hash, n = joblog line, text}, for M.checkmarks); or nil
-- and a message naming the joblog ('path') and its first bad line. The
-- text must be what lpar writes: the header, then item lines and marks
-- ("# out <bytes> <line> <hash>", neither number going back). Only a last
-- line without its newline may be cut short (a write that failed):
-- nothing of it is kept. An empty joblog, or its first line cut short,
-- starts afresh.
function M.resumepoint(text, path)
  local bytes, keep, done, marks = 0, 0, 0, {}
  text = text or ""
  local first = M.logfirst
  if #text < #first and first:sub(1, #text) == text then return 0, 0, 0, marks end
  local function bad(n, why, line)
    return nil, ("bad joblog %s, line %d: %s (%s)"):format(path, n, why, M.shorten(line, 60))
  end
  local pos, n, body = 1, 0, false
  while pos <= #text do
    local nl = text:find("\n", pos, true)
    local line = text:sub(pos, (nl or 0) - 1)
    n = n + 1
    if not nl and n > 1 then break end -- cut short: dropped with what follows the last mark
    if line:sub(-1) == "\r" then
      return bad(n, "a line ends with CR (converted to CRLF?)", line)
    elseif n == 1 then
      if line .. "\n" == M.oldfirst then
        return nil, ("cannot resume from %s: it was written by an older lpar (joblog format 1, " ..
                     "without the start, host and error columns): run afresh without --resume")
          :format(path)
      elseif line .. "\n" == M.v2first then
        return nil, ("cannot resume from %s: it was written by an older lpar (joblog format 2, " ..
                     "whose marks carry no hash of the output): run afresh without --resume")
          :format(path)
      elseif line .. "\n" == M.oldheader or line .. "\n" == M.logheader then -- no fingerprint
        return nil, ("cannot resume from %s: it does not say which run it belongs to " ..
                     "(made by an older lpar?)"):format(path)
      elseif line .. "\n" ~= first then
        if line:match("^# lpar joblog ") then
          return bad(n, "made by another version of lpar", line)
        end
        return bad(n, "not an lpar joblog", line)
      end
    elseif not body then
      if line .. "\n" == M.logheader then
        body = true
      elseif not line:match("^# %a+: ") then
        return bad(n, "not a header line", line)
      end
    elseif line:byte(1) == 35 then -- '#'
      local b, l, h = line:match("^# out (%d+) (%d+) (" .. ("[0-9a-f]"):rep(16) .. ")$")
      if not b then return bad(n, "not a mark", line) end
      b, l = math.tointeger(tonumber(b)), math.tointeger(tonumber(l))
      if not b or not l then
        return nil, ("bad joblog %s, line %d: number too large in '%s'"):format(path, n, line)
      end
      if b < bytes or l < done then
        return bad(n, ("the mark goes back (from %d bytes, line %d)"):format(bytes, done), line)
      end
      bytes, done, keep = b, l, nl
      marks[#marks + 1] = {b, l, h, n = n, text = line}
    elseif not line:match("^%d+\t%a+\t%d+%.%d+\t%d+\t%d+%.%d+\t[^\t]*\t[^\t]*$") or
        not (line:match("^%d+\tok\t") or line:match("^%d+\tfailed\t")) then
      return bad(n, "not an item line", line)
    end
    pos = nl + 1
  end
  return bytes, keep, done, marks
end

-- Whether the output file 'output' agrees with the marks of the joblog
-- 'path' (from M.resumepoint): nil, or the message naming the joblog line
-- of the first that does not (edited by hand, or another file's).
function M.checkmarks(c, marks, path, output)
  local k, why = c.checkmarks(output, marks)
  if not k then return nil end
  if k == 0 then return ("cannot resume from %s: %s"):format(path, why) end
  local m = marks[k]
  if why == "short" then
    return ("bad joblog %s, line %d: %s holds fewer bytes than the mark counts (%s)")
      :format(path, m.n, output, M.shorten(m.text, 60))
  end
  return ("bad joblog %s, line %d: the mark does not agree with the bytes of %s (%s)")
    :format(path, m.n, output, M.shorten(m.text, 60))
end

-- bytes at the start of the items that identify them in a joblog
M.prefix = 1024 * 1024

-- The joblog's first lines: what the run is (see "Joblog and resume" in
-- README.md), so that --resume can refuse another run's joblog.
-- What shapes the results a run writes (so that a resumed run writes
-- them alike): "plain", or the options, as "--json --tag --colsep ,".
function M.outputform(o)
  local t = {}
  if o.json then t[#t + 1] = "--json" end
  if o.nulout then t[#t + 1] = "--null-output" end
  if o.number then t[#t + 1] = "--number" end
  if o.tag then t[#t + 1] = "--tag" end
  if o.colsep then t[#t + 1] = "--colsep " .. M.shorten(o.colsep, 40) end
  return #t > 0 and table.concat(t, " ") or "plain"
end

function M.fingerprint(o, c, reader)
  local t = {M.logfirst}
  t[2] = ("# script: %s %s\n"):format(c.hash(o.source), o.script and M.shorten(o.script, 200) or "-e")
  local name = o.files and o.files[1] or o.args[1] or "-"
  local size = reader:identity(0)
  if o.items then
    local parts = {}
    for k, v in ipairs(o.items) do parts[k] = #v .. ":" .. v end
    t[3] = ("# items: args %s %d\n"):format(c.hash(table.concat(parts)), #o.items)
  elseif o.files and #o.files > 1 then
    -- several files: each one's size and first bytes, in one hash
    local parts, shown = {}, {}
    for k, path in ipairs(o.files) do
      local r = path ~= "-" and c.open(path, o.nul)
      local n = r and r:identity(0)
      if n then
        n = math.min(n, M.prefix)
        parts[k] = ("%d:%s:%d:%s"):format(r:identity(0), select(2, r:identity(n)), #path, path)
      else
        parts[k] = "stream:" .. #path .. ":" .. path
      end
      if r then r:close() end
      shown[k] = M.shorten(path, 200)
    end
    t[3] = ("# items: files %s %s\n"):format(c.hash(table.concat(parts)), table.concat(shown, " "))
  elseif size then
    local n = math.min(size, M.prefix)
    t[3] = ("# items: file %d %d %s %s\n"):format(size, n, select(2, reader:identity(n)),
                                                  M.shorten(name, 200))
  else
    t[3] = ("# items: stream %s\n"):format(M.shorten(name, 200))
  end
  t[4] = ("# split: %s\n"):format(o.nul and "nul" or "lines")
  local args, shown = {}, {}
  for k = (o.items or o.files) and 1 or 2, #o.args do
    args[#args + 1] = #o.args[k] .. ":" .. o.args[k]
    shown[#shown + 1] = M.shorten(o.args[k], 40)
  end
  t[5] = ("# args: %s%s\n"):format(c.hash(table.concat(args)),
                                   #shown > 0 and " " .. table.concat(shown, " ") or "")
  if o.shard then t[6] = ("# shard: %d/%d\n"):format(o.shard[1], o.shard[2]) end
  t[#t + 1] = ("# output: %s\n"):format(M.outputform(o))
  return table.concat(t)
end

-- How the run that made a joblog ('text') differs from this one
-- ('fp', its fingerprint): a message, or nil if it does not.
function M.differs(text, fp, reader, done)
  local function fields(s)
    local f = {}
    for line in s:gmatch("[^\n]*") do
      if line:sub(1, 7) == "# line\t" then break end
      local k, v = line:match("^# (%a+): (.*)$")
      if k then f[k] = v end
    end
    return f
  end
  local was, now = fields(text), fields(fp)
  if not (was.script and was.items and was.split and was.args) then
    return "it does not say which run it belongs to (made by an older lpar?)"
  end
  local d = {}
  if was.script:match("^%S+") ~= now.script:match("^%S+") then
    d[#d + 1] = "the script differs"
  end
  if was.args:match("^%S+") ~= now.args:match("^%S+") then
    d[#d + 1] = "the script's arguments differ"
  end
  if (was.output or "plain") ~= now.output then
    d[#d + 1] = ("the results were written as %s then, as %s now")
      :format(was.output or "plain", now.output)
  end
  if (was.shard or "1/1") ~= (now.shard or "1/1") then
    d[#d + 1] = ("it is the joblog of shard %s, this run is shard %s")
      :format(was.shard or "1/1", now.shard or "1/1")
  end
  if was.split ~= now.split then
    d[#d + 1] = was.split == "nul" and "the items were split on NUL bytes (-0) then, on newlines now"
                or "the items were split on newlines then, on NUL bytes (-0) now"
  end
  local kind, size, n, hash = was.items:match("^(%a+) ?(%d*) ?(%d*) ?(%x*)")
  local nowkind = now.items:match("^%a+")
  local from = {file = "a file", stream = "a pipe", files = "several files (-a)",
                args = "the command line (:::)"}
  if kind ~= nowkind then
    d[#d + 1] = ("the items came from %s, now from %s")
      :format(from[kind] or "a pipe", from[nowkind])
  elseif (kind == "files" or kind == "args") and was.items:match("^%a+ %x+") ~=
      now.items:match("^%a+ %x+") then
    d[#d + 1] = kind == "files" and "the items files differ" or "the items (after ':::') differ"
  elseif kind == "file" then
    size, n = math.tointeger(tonumber(size)), math.tointeger(tonumber(n))
    local nowsize, nowhash = reader:identity(n or 0)
    if not size or not n then
      d[#d + 1] = "its 'items' line is damaged"
    elseif nowsize < size then
      d[#d + 1] = ("the items file is shorter (%d bytes, %d then)"):format(nowsize, size)
    elseif nowhash ~= hash then
      d[#d + 1] = ("the items file differs (in its first %d bytes)"):format(n)
    elseif nowsize > size then
      -- it grew: its last line then, if it had no separator, is longer now
      local before = reader:partial(size)
      if before and done > before then
        d[#d + 1] = ("the items file grew from within line %d, which ran as it was then")
          :format(before + 1)
      end
    end
  end
  if #d > 0 then return table.concat(d, "; ") end
  return nil
end

-- --resume-failed: what the joblog (o.joblog) records, checked against
-- this run as --resume checks it: {lines = the lines whose last outcome is
-- failed, in order; keepout, keeplog = bytes of the output and the joblog
-- to keep (up to the last mark, as --resume; all of the joblog without
-- -o); done = the line of that mark}; or nil and a message.
function M.failedlines(o, c, reader)
  local path = o.joblog
  local kind = c.filetype(path)
  if kind ~= "file" then
    return nil, ("cannot resume failed items from %s: %s"):format(path,
      kind and ("it is a %s, not a regular file"):format(kind) or "no such file")
  end
  local clash = M.clash(o, c, reader)
  if clash then return nil, clash end
  local text = readall(path) or ""
  local keepout, keeplog, done, marks = M.resumepoint(text, path)
  if not keepout then return nil, keeplog end
  -- without marks (no -o, or --unordered), all of the joblog counts and
  -- the results are appended to what -o holds
  local marked = done > 0 or keepout > 0
  if not o.output or not marked then
    keeplog = #(text:match("^.*\n") or "")
    local f = o.output and io.open(o.output, "rb")
    keepout = f and f:seek("end") or 0
    if f then f:close() end
  end
  local last, maxline, lines = {}, 0, {}
  for l, st in text:sub(1, keeplog):gmatch("\n(%d+)\t(%a+)\t") do
    l = math.tointeger(tonumber(l))
    last[l] = st
    maxline = math.max(maxline, l)
  end
  for l, st in pairs(last) do
    if st == "failed" then lines[#lines + 1] = l end
  end
  table.sort(lines)
  if #lines > 0 then
    local diff = M.differs(text, M.fingerprint(o, c, reader), reader, maxline)
    if diff then return nil, ("cannot resume from %s: %s"):format(path, diff) end
  end
  local wrong = o.output and marked and M.checkmarks(c, marks, path, o.output)
  if wrong then return nil, wrong end
  return {lines = lines, keepout = keepout, keeplog = keeplog, done = done, marked = marked}
end

-- The input records whose numbers are in 'lines' (sorted), read whole
-- from the items (o.items, o.files or 'paths'), each with the separator
-- after it, in one string; or nil and a message.
function M.pick(o, paths, lines)
  local sep = o.nul and "\0" or "\n"
  local want, got, n = {}, {}, 0
  for _, l in ipairs(lines) do want[l] = true end
  local function add(rec)
    n = n + 1
    if want[n] then got[#got + 1] = rec .. sep end
  end
  if o.items then
    for _, v in ipairs(o.items) do add(v) end
  else
    for _, path in ipairs(paths) do
      local data = path == "-" and io.stdin:read("*a") or readall(path)
      if not data then return nil, ("cannot read %s"):format(path) end
      local pos = 1
      while pos <= #data do
        local at = data:find(sep, pos, true)
        local rec = data:sub(pos, (at or #data + 1) - 1)
        if at and not o.nul then rec = rec:gsub("\r$", "") end
        add(rec)
        pos = (at or #data) + 1
      end
    end
  end
  if #got < #lines then
    return nil, ("cannot resume failed items: the input has %d %s, the joblog names %s %d")
      :format(n, o.nul and "items" or "lines", o.nul and "item" or "line", lines[#lines])
  end
  return table.concat(got)
end

-- The message if two of the joblog, the output (-o or stdout), the items
-- and the script are one file (compared as device and inode), or nil.
function M.clash(o, c, reader)
  local files = {{"items", reader:fileid()}}
  for k, path in ipairs(o.files and #o.files > 1 and o.files or {}) do
    files[k] = {"items", c.fileid(path)}
  end
  local script = o.script and c.fileid(o.script)
  for _, f in ipairs(files) do
    if f[2] and f[2] == script then
      return ("the script is also the items file (%s)"):format(o.script)
    end
  end
  files[#files + 1] = {"script", script}
  local log = o.joblog and c.fileid(o.joblog)
  local out = c.fileid(o.output or "/dev/stdout")
  if log and log == out then
    if not o.output then return "the standard output is the joblog" end
    return ("--joblog and -o name the same file (%s)"):format(o.output)
  end
  for _, f in ipairs(files) do
    if f[2] and out == f[2] then
      if not o.output then return ("the standard output is the %s file"):format(f[1]) end
      return ("-o names the %s file (%s)"):format(f[1], o.output)
    end
    if f[2] and log == f[2] then
      return ("--joblog names the %s file (%s)"):format(f[1], o.joblog)
    end
  end
  return nil
end

-- Map f over the records of 'reader', writing results; returns the exit
-- status.
-- What the workers hold, here or on a host's agent: the init and close
-- hooks and the two functions the engine names, the batch function and
-- the one-record function, made from the script's map, init and close
-- and the options that shape results.
function M.workerfns(o, c, map, init, close)
  local fmt = M.formatter(nil, o.json)
  local halt = o.halt
  if o.colsep then map = M.fields(map, o.colsep) end
  local plain = o.tag and map
  if o.tag then map = M.tagged(map, fmt) end
  local isolate = c.isolate
  -- with --halt ...,fail=: a batch ends at its first failure (the rest
  -- goes back), so that lpar sees each failure as it comes
  local batch = M.batcher(map, fmt, o.nul, (halt and halt.what == "fail") == true,
                          o.timed, c, o.maxmem, M.labeller(o), plain)
  local flush = io.stdout.flush
  -- what f prints (to stderr) is flushed after each batch (M.batcher): a
  -- worker leaves with _exit; a script without close has none (a worker
  -- with no close hook gets at least a second to leave, whatever
  -- --timeout)
  return function()
    isolate()
    if init then init() end
  end, close and function()
    close()
    flush(io.stdout)
  end, batch
end

-- With --number: what starts the output line of the reader's record i
-- (its input line number and a tab), else nil.
function M.labeller(o)
  if not o.number then return nil end
  local real = M.inputline(o)
  return function(i) return real(i) .. "\t" end
end

-- The input line number of the reader's record i: with --shard K/N the
-- reader gives this shard's records only, and with --resume-failed the
-- lines it runs again.
function M.inputline(o)
  local K, N = 1, 1
  if o.shard then K, N = o.shard[1], o.shard[2] end
  local lines = o.lines
  if lines then return function(i) return lines[i] end end
  return function(i) return (i - 1) * N + K end
end

-- The options a host's agent needs to make the same worker functions.
local agentkeys = {"json", "colsep", "tag", "nul", "halt", "timed", "maxmem", "nulout",
                   "number", "shard", "lines"}

-- The setup a host's agent gets (see M.agent): the script, its
-- arguments and the options of M.workerfns.
function M.agentsetup(o)
  local t = {name = o.script, code = o.code, args = o.args, o = {}}
  if not o.code then t.source = o.source end
  for _, k in ipairs(agentkeys) do t.o[k] = o[k] end
  return t
end

-- In a host's agent (lpar --worker): run the script the CLI sent, as the
-- CLI ran it, and make the workers' init, close and functions from it.
function M.agent(t)
  local c = M.helpers
  local chunk, msg
  if t.code then
    chunk, msg = M.commandline(t.code)
  else
    chunk, msg = load(t.source, "@" .. t.name, "t")
  end
  if not chunk then error(msg, 0) end
  _G.arg = t.args
  local n = 0
  for k in pairs(t.args) do
    if math.type(k) == "integer" and k > n then n = k end
  end
  local res = table.pack(xpcall(chunk, M.traceback, table.unpack(t.args, 1, n)))
  if not res[1] then error(tostring(res[2]), 0) end
  local r = res[2]
  local map, init, close = r, nil, nil
  if type(r) == "table" then map, init, close = r.map, r.init, r.close end
  if type(map) ~= "function" then
    error(("%s does not return a map function on this host"):format(t.name or "the script"), 0)
  end
  if t.o.nulout then c.eol = "\0" end
  local i, cl, batchf = M.workerfns(t.o, c, map, init, close)
  return i, cl, {batchf}
end

-- The message handler a script's main chunk runs under.
function M.traceback(e)
  if require("lpar").errkind(e) == "interrupted" then return e end
  local text = M.trace(errortext(e), 2) -- not a tail call: levels count
  return text
end
local traceback = M.traceback

-- The host specs of -S and --hosts, with -j as the count of those that
-- give none; nil and a message if --hosts cannot be read.
function M.hostlist(o)
  local list = {}
  local function add(spec)
    spec = spec:match("^%s*(.-)%s*$")
    if spec == "" then return end
    if o.jobsgiven and not spec:match("^%d+/") then spec = o.jobs .. "/" .. spec end
    list[#list + 1] = spec
  end
  -- -S: hosts separated by commas outside quotes
  for _, v in ipairs(o.hosts or {}) do
    local from, quote = 1, nil
    for k = 1, #v do
      local ch = v:sub(k, k)
      if quote then
        if ch == quote then quote = nil end
      elseif ch == "'" or ch == '"' then
        quote = ch
      elseif ch == "," then
        add(v:sub(from, k - 1))
        from = k + 1
      end
    end
    add(v:sub(from))
  end
  if o.hostsfile then
    local f, err = io.open(o.hostsfile)
    if not f then return nil, ("cannot read the hosts: %s"):format(err) end
    for line in f:lines() do add(line:gsub("#.*", "")) end
    f:close()
  end
  if #list == 0 then
    return nil, ("no host given%s"):format(o.hostsfile and (" (%s lists none)"):format(o.hostsfile) or "")
  end
  return list
end

function M.run(o, c, reader, counter, map, init, close)
  local lpar = require "lpar"
  local nul, halt, retries = o.nul, o.halt, o.retries or 0
  local logging = o.timed
  local events -- the --events file
  local winit, wclose, batchf = M.workerfns(o, c, map, init, close)
  -- One pool of workers for the whole input, started as work comes: one
  -- job streams batches of records (see main.c), and the engine runs
  -- again the records that failed (--retries), that a batch handed back
  -- or lost with its worker, as parts of their batch (see "records" in
  -- job.c). The function is inherited at fork, so any closure works.
  local opts = {
    n_workers = o.jobs or lpar.default_workers, on_demand = true,
    timeout = o.timeout, max_memory = o.maxmem, init = winit, close = wclose,
  }
  if o.hosts or o.hostsfile then
    local list, err = M.hostlist(o)
    if not list then return fail(2, err) end
    -- a bad spec is a usage error: found before anything starts
    local ok, probe = pcall(lpar.pool, {hosts = list, remote_lpar = o.remotelpar, on_demand = true})
    if not ok then return fail(2, probe) end
    probe:close()
    opts.hosts, opts.remote_lpar = list, o.remotelpar
    opts.agent_setup = M.agentsetup(o)
  end
  -- The job's items are batches of records: the engine's policy says how
  -- many records each holds (from the time per record the workers
  -- report), the reader cuts them. --chunk N fixes it at N records.
  -- Reading a regular file never waits: the engine asks for the next
  -- batch without putting the results ready first, and a busy worker
  -- gets its next batch ahead (not with --halt: the records a batch
  -- hands back at its first failure run before the next batch).
  local jobopts = {on_error = "collect", unordered = o.unordered or nil,
                   timeout = o.timeout, chunksize = o.chunk, batched = true,
                   retries = retries, slice = M.slicer(c, nul, o.number),
                   nonblocking = (reader:regular() and not halt) or nil}
  -- --halt ...,success=, done= or a share (N%): each record's outcome is
  -- seen on its own (a count of failures alone is seen batch by batch)
  if halt and (halt.what ~= "fail" or halt.pct) then jobopts.chunksize = 1 end

  -- where results and the joblog go; what a resumed run skips
  local skipped = 0
  -- the reader's record i is input line real(i): the joblog and messages
  -- show those
  local real = M.inputline(o)
  local K, N = 1, 1
  if o.shard then K, N = o.shard[1], o.shard[2] end
  local function mine(line) return line >= K and math.floor((line - K) / N) + 1 or 0 end
  -- --number: what starts the output line of record i (workers inherit it)
  local label = M.labeller(o)
  local clash = M.clash(o, c, reader)
  if clash then return fail(2, clash) end
  if o.output or o.joblog then
    local keepout, keeplog, done = 0, 0
    if o.again then -- --resume-failed: where to append, found by M.failedlines
      keepout, keeplog = o.again.keepout, o.again.keeplog
    end
    local ok, err = true, nil
    -- a joblog to resume from is read whole: a regular file only
    local kind = o.resume and c.filetype(o.joblog)
    if kind and kind ~= "file" then
      return fail(2, ("cannot resume from %s: it is a %s, not a regular file"):format(o.joblog, kind))
    end
    -- the joblog is locked first, and nothing is cut before every check
    if o.joblog then
      ok, err = c.openjoblog(o.joblog)
      if not ok then return fail(2, err) end
      err = M.clash(o, c, reader) -- now that the joblog exists
      if err then return fail(2, err) end
    end
    local fp = o.joblog and M.fingerprint(o, c, reader)
    if o.resume then
      local text = readall(o.joblog)
      local marks
      keepout, keeplog, done, marks = M.resumepoint(text, o.joblog)
      if not keepout then return fail(2, keeplog) end
      local diff = keeplog > 0 and M.differs(text, fp, reader, done)
      if diff then
        return fail(2, ("cannot resume from %s: %s"):format(o.joblog, diff))
      end
      diff = M.checkmarks(c, marks, o.joblog, o.output)
      if diff then return fail(2, diff) end
      done = mine(done)
      skipped = done > 0 and reader:skip(done) or 0
      if skipped < done then
        return fail(2, ("cannot resume from %s: it counts %d items done, the input has %d")
                    :format(o.joblog, done, skipped))
      end
    end
    if o.output and not o.redirected then
      ok, err = c.redirect(o.output, keepout, o.joblog ~= nil) -- hashed for the marks
    end
    if ok and o.joblog then
      -- output positions are marks to resume from: with ordered output only
      -- (--resume-failed writes one mark, at the end)
      ok, err = c.joblog(keeplog, o.output ~= nil and not o.unordered and not o.again)
    end
    if not ok then return fail(2, err) end
    if o.joblog and keeplog == 0 then c.log(fp .. M.logheader) end
  end

  if o.events then
    local err, unsafe
    -- a run that goes on (--resume, --resume-failed) adds to them, on a
    -- line of its own: a torn last line (a run killed midway) is cut
    events, err, unsafe = c.openwriter(o.events, o.resume or o.again)
    if not events then return fail(2, unsafe and err or "cannot write --events: " .. err) end
  end
  opts.sigterm = c.signals()
  c.startoutput()
  local total = o.progress and counter and counter()
  if total then total = mine(total) end
  local prog = o.progress and progress(c, total and total - skipped)
  local write, writeln, report, mark = c.write, c.writeln, c.report, c.mark
  -- the batch at hand when it is one record of bytes (see M.batcher's
  -- 'bare')
  local whole
  local failed, succeeded = 0, 0
  -- --halt: 'tripped' when its condition is met (at line 'tripline', with
  -- 'tripn' records counted); 'halted' when the walk in input order
  -- passes it with --halt now, at 'haltline', the last line whose result
  -- counts
  local tripped, tripline, tripn, halted, haltline = false, nil, 0, false, nil
  -- the last line of the records --halt has counted (in any order): the
  -- walk in input order goes that far with --halt now
  local haltat = 0
  local items = reader:items(lpar.pending)
  if label then -- each batch goes with the number of its first record
    local nextbatch, taken = items, reader.count
    items = function(want)
      local first = taken(reader) + 1
      local b, n = nextbatch(want) -- n: its records, or the fd to wait on
      if b ~= nil and b ~= lpar.pending then return {first, b}, n end
      return b, n
    end
  end
  -- With the joblog or --events, when each batch and part started (the
  -- engine's start events, as they are handed out): starts[line] is
  -- the clock for the part whose first record is 'line' ("line:attempt"
  -- as key; firstof[batch] is its first record), so that
  -- a record's start is its own, not when its result came out in order.
  local firstof, starts, nbatches = {}, nil, 0
  if logging or halt then
    starts = logging and {} or nil
    local nextbatch, taken = items, reader.count
    items = function(want)
      local first = taken(reader) + 1
      local b, n = nextbatch(want)
      if b ~= nil and b ~= lpar.pending then
        nbatches = nbatches + 1
        firstof[nbatches] = first
      end
      return b, n
    end
  end
  opts.functions = {batchf}
  local pool
  local lines = {}
  -- the host that ran the results at hand: its spec (-S), ':' for this
  -- machine
  local host = ":"
  local function ranon(where)
    host = where and where:gsub("[%c]", " ") or ":"
  end

  -- Record 'line' ended: the joblog and --events say so (an event when
  -- it started, one when it ended; for a failure, its status there
  -- ('how': timeout, lost; nil: failed) and its kind).
  -- tstart: when the next record of the part at hand started (nil: not
  -- known, then its end less its seconds)
  local tstart
  local function began(secs)
    local t = c.clock()
    local s = tstart or t - (secs or 0)
    if tstart then tstart = tstart + (secs or 0) end
    return s, t
  end

  -- The start and end of one try of record 'line' in --events ('first':
  -- the first line of its failure, if it failed).
  local function evpair(line, attempt, st, secs, status, first, kind)
    local h = M.jsonhost[host]
    local done, werr = events:write(M.eventline(real(line), "start", nil, attempt, h, st),
      M.eventline(real(line), "end", status, attempt, h, st + (secs or 0), secs or 0, first,
                  first and (kind or "error")))
    if not done then error(("cannot write %s: %s"):format(o.events, werr), 0) end
  end

  local function logline(line, status, secs, attempt, e, how, kind)
    if not logging then return end
    local st, first = began(secs), e and M.firstline(e)
    if o.joblog then
      lines[#lines + 1] = ("%d\t%s\t%.6f\t%d\t%.3f\t%s\t%s\n"):format(real(line), status, secs or 0,
        attempt, st, host, first or "")
    end
    if events then evpair(line, attempt, st, secs, how or status, first, kind) end
  end

  -- A try of record 'line' that failed and ran again: only --events
  -- tells of it (the joblog has a line per record).
  local function tried(line, secs, attempt, e, status, kind)
    evpair(line, attempt, began(secs), secs, status or "failed", M.firstline(e), kind)
  end

  -- Whether --halt's condition holds with 'nfailed' and 'nok' records.
  local function trips(nfailed, nok)
    local n = halt.what == "fail" and nfailed or halt.what == "success" and nok
              or nfailed + nok
    local done = nfailed + nok
    return halt.pct and done >= 3 and n * 100 >= halt.pct * done or (halt.n and n >= halt.n)
  end

  -- The engine's events, as parts of batches start and end (in any
  -- order, before their results come out in input order): the start
  -- clocks of the joblog and --events; the counts of --halt (the
  -- progress bar counts results as they are written). When --halt
  -- trips, the job halts: soon, no record starts (the workers stop
  -- between records) and the run ends once the records running are in;
  -- now, the workers running records are killed and those records are
  -- left unsettled (--resume runs them).
  local job
  local nfailed, nok = 0, 0
  local function onend(ev)
    if not ev.ok then return end -- a batch's end counts its records
    nfailed, nok = nfailed + ev.failed, nok + ev.ok
    if not halt or tripped then return end
    -- the last record this part ran: with --halt ...,fail= a batch ends
    -- at its first failure; with success= and done= it holds one record
    local line = firstof[ev.item] + (ev.at or 1) + ev.ok + ev.failed - 2
    local counted = halt.what == "fail" and ev.failed or halt.what == "success" and ev.ok
                    or ev.ok + ev.failed
    if counted > 0 and line > haltat then haltat = line end
    if trips(nfailed, nok) then
      tripped, tripline = true, line
      tripn = halt.what == "fail" and nfailed or halt.what == "success" and nok or nfailed + nok
      job:halt(halt.when)
    end
  end
  if starts or halt then
    jobopts.on_event = function(ev)
      if ev.event == "end" then return onend(ev) end
      local first = starts and firstof[ev.item]
      if first then starts[(first + (ev.at or 1) - 1) .. ":" .. ev.attempt] = c.clock() end
    end
  end

  -- With --halt now, the walk in input order stops once the records
  -- --halt counted are written (line 'line' has settled); the others
  -- are left for --resume.
  local function check(line)
    if tripped and halt.when == "now" and line >= haltat then halted, haltline = true, line end
  end

  local function success(line)
    succeeded = succeeded + 1
    check(line)
  end

  -- An item that failed because the run is being stopped is not a
  -- failure: lpar caught SIGINT, SIGTERM or SIGHUP, or its worker was
  -- killed by one (sent to every process at once: a process group, a
  -- service being stopped) before lpar saw its own. Then the run stops as
  -- for that signal, the item unrecorded, so that --resume runs it again.
  local function stopping(kind, detail)
    local sig = c.caught()
    if sig == 0 and kind == "signal" then sig = detail end
    if signame[128 + sig] then error(setmetatable({signal = sig}, Stop), 0) end
  end

  -- Report a failed item (its record 'rec', if at hand): the first few
  -- in full, the others without their traceback (counted in 'unshown'),
  -- none with --quiet.
  local shown, unshown = 0, 0
  local function tell(line, e, rec)
    if o.quiet then return end
    shown = shown + 1
    local msg, cut = M.describe(line, e, nul, shown > M.shown, rec)
    if cut then unshown = unshown + 1 end
    report(msg)
  end

  -- An end's status in --events for a failure of kind 'kind'.
  local function evstatus(kind)
    if kind == "timeout" then return "timeout" end
    if kind == "signal" or kind == "exit" or kind == "lost" or kind == "protocol" then
      return "lost"
    end
    return nil -- failed
  end

  -- Record 'rec' (line 'line') failed for good with e, of kind 'kind'
  -- (lpar.errkind's names) and its detail.
  local function failure(line, e, secs, attempt, rec, kind, detail)
    stopping(kind, detail)
    failed = failed + 1
    tell(real(line), e, rec)
    logline(line, "failed", secs, attempt, e, evstatus(kind), kind)
    check(line)
  end

  local function logok(first, from, to, times, attempt)
    if logging then
      for k = from, to do
        logline(first + k - 1, "ok", times and string.unpack("d", times, 8 * k - 7), attempt)
      end
    end
    if to >= from then
      succeeded = succeeded + (to - from)
      success(first + to - 1)
    end
  end

  -- The outcome of records first .. first+n-1 run for the 'attempt'th
  -- time: a batch's result r (or r == nil and its error e, of kind 'kind'
  -- and its detail), and the parts the engine ran again ('parts', see
  -- "records" in job.c): a record that failed with retries left, the
  -- records a batch handed back, those of a batch lost with its worker.
  -- recof(line) is the record of a line of the batch.
  -- The marks of the joblog (ordered output) say up to which record all
  -- are settled (ran ok, or failed for good). A record that a halt left
  -- unsettled (handed back, never started) ends them: the last mark is
  -- put just before it, and none after, so that --resume runs it again.
  local marking = true
  local function unsettled(line)
    if not marking then return end
    marking = false
    if o.joblog then
      c.log(table.concat(lines))
      lines = {}
      mark(real(line - 1))
    end
  end

  -- Whether a record that failed on its 'attempt'th try and was not
  -- run again had a retry left: then only a halt stopped it (the engine
  -- runs a failure with retries left again unless the job halts), and it
  -- is not a failure but unsettled, as a record the halt never started.
  local function dropped(attempt)
    return attempt <= retries
  end

  local walk
  local function part(first, kid, where, recof)
    ranon(kid.host)
    local saved = tstart
    walk(first + kid.at - 1, kid.n, kid.value, kid.error, kid.attempt, kid.kids,
         kid.kind, kid.detail, recof)
    host, tstart = where, saved
  end
  walk = function(first, n, r, e, attempt, parts, kind, detail, recof)
    local kids, where = {}, host
    tstart = nil
    if starts then
      local key = first .. ":" .. attempt
      tstart, starts[key] = starts[key], nil
    end
    for _, kid in ipairs(parts or {}) do kids[kid.at] = kid end
    if r == nil and e == nil then return unsettled(first) end -- not run: the run halted
    if e ~= nil then
      -- lost with its worker (or stopped at its timeout): the record it
      -- was running fails unless it ran again; the others ran again
      -- (a record past the batch's last: it died after its records ran,
      -- before their result went; as the engine does, the one record of
      -- a batch of one fails, more run again alone, in parts)
      local at = type(e) == "table" and math.tointeger(e.record)
      if not at or at < 1 or at > n then at = n == 1 and 1 or nil end
      if type(e) == "table" and e.message then e = e.message end
      stopping(kind, detail)
      local k = 1
      while k <= n and not halted do
        if events and k == at and (kids[k] and kids[k].attempt > attempt or dropped(attempt)) then
          tried(first + k - 1, nil, attempt, e, evstatus(kind), kind) -- it runs again
        end
        if kids[k] then
          part(first, kids[k], where, recof)
          k = k + kids[k].n
        elseif k ~= at or dropped(attempt) then
          -- the halt left it: it did not run, or its retry did not
          unsettled(first + k - 1)
          k = k + 1
        else
          failure(first + k - 1, e, nil, attempt, recof(first + k - 1), kind, detail)
          k = k + 1
        end
      end
      return
    end
    if type(r) == "string" then
      if r ~= "" then write(r) end
      if logging or halt then logok(first, 1, n, nil, attempt) end
      return
    end
    local times, from = r.times, 1
    if r.bare then -- a long record's untagged line (--tag): the record first
      if whole and n == 1 then write(whole, 1, r.reclen) else write(recof(first)) end
      write("\t")
      writeln(r.bare)
    end
    for j = 1, #r do
      local p = r[j]
      if type(p) == "string" then
        write(p)
      else
        local k = p[1]
        logok(first, from, k - 1, times, attempt)
        from = k + 1
        if halted then return end
        local secs = times and string.unpack("d", times, 8 * k - 7)
        local pkind = select(4, M.unpackfailure(p[2]))
        if kids[k] then
          -- it ran again: --events tells of the try that failed too
          if events then tried(first + k - 1, secs, attempt, p[2], nil, pkind) end
          part(first, kids[k], where, recof)
        elseif dropped(attempt) then
          -- its retry did not run (the run halted): neither ok nor failed
          if events then tried(first + k - 1, secs, attempt, p[2], nil, pkind) end
          unsettled(first + k - 1)
        else
          failure(first + k - 1, p[2], secs, attempt, nil, pkind)
        end
        if halted then return end
      end
    end
    logok(first, from, (r.rest or n + 1) - 1, times, attempt)
    -- the records it handed back, in parts (none if the run halted)
    local k = r.rest or n + 1
    while k <= n and not halted do
      if not kids[k] then return unsettled(first + k - 1) end
      part(first, kids[k], where, recof)
      k = k + kids[k].n
    end
  end

  local function batch()
    local iter, _, _, j = pool:imap(batchf, items, jobopts)
    job = j
    -- the job closes the loop (5.4); a call gives it, for 5.1 and 5.2
    -- miscompile a loop of four expressions (a local of the body is lost)
    for i, r, e, where, kind, detail in closing(iter, job) do
      local first, n, block = reader:take(i)
      local recs
      local function recof(line) -- a record of this batch, split once
        recs = recs or c.split(block, nul)
        return recs[line - first + 1]
      end
      ranon(where)
      whole = n == 1 and type(block) == "string" and block or nil
      walk(first, n, r, e, 1, type(r) == "table" and r.kids, kind, detail, recof)
      whole = nil
      firstof[i] = nil
      -- a long line (its bytes from a pipe, its result from a file): let
      -- it go now, not when the next one is in too
      if isbig(block) then
        block, recs, r = nil, nil, nil -- luacheck: ignore 311
        collectgarbage()
      end
      if o.joblog then
        c.log(table.concat(lines))
        lines = {}
        if marking then mark(real(haltline or first + n - 1)) end
      end
      if halted then break end
      if prog then prog.step(n, failed) end
    end
  end

  -- One run for the whole input: while the input is quiet the workers
  -- wait and the results so far are written (see reader_next in main.c).
  local ok, err = pcall(function()
    if reader:wait() then
      pool = lpar.pool(opts)
      batch()
    end
  end)
  if not ok then err = caught(err) end
  if pool then
    local closed, cerr = pcall(pool.close, pool)
    if ok and not closed then ok, err = false, caught(cerr) end
  end
  if prog then prog.finish() end
  if events then
    local closed, cerr = events:close()
    if ok and not closed then ok, err = false, caught(("cannot write %s: %s"):format(o.events, cerr)) end
  end
  if ok and o.again and o.again.marked and o.output and c.caught() == 0 then
    -- the output now holds the lines run again too: a later --resume
    -- keeps them, and goes on from the same line as before
    c.markers(true)
    ok, err = pcall(mark, o.again.done)
    if not ok then err = caught(err) end
  end
  local outerr = c.finish()
  if outerr then outerr = caught(outerr) end
  local code, msg = 0, nil
  if not ok then
    code, msg = stopped(err)
  elseif outerr then
    code, msg = stopped(outerr)
  elseif c.caught() ~= 0 then
    code = 128 + c.caught()
    msg = "lpar: " .. (signame[code] or "interrupted")
  end
  if msg then say(c, msg) end
  if code ~= 0 then return code end
  if tripped and not halt.text then
    say(c, "lpar: stopped at the first failure (--halt)")
    say(c, ("lpar: %d of %d items failed"):format(failed, failed + succeeded) .. M.more(unshown, o))
    return 1
  end
  if tripped then
    say(c, ("lpar: stopped at %s %d (--halt %s: %d %s of %d)")
        :format(nul and "item" or "line", real(tripline), halt.text, tripn,
                halt.what == "fail" and "failed" or halt.what == "success" and "succeeded" or "done",
                failed + succeeded))
    if failed > 0 then
      say(c, ("lpar: %d of %d items failed"):format(failed, failed + succeeded) .. M.more(unshown, o))
    end
    return failed > 0 and 1 or 0
  end
  if failed > 0 then
    say(c, ("lpar: %d of %d items failed"):format(failed, reader:count() - skipped) .. M.more(unshown, o))
    return 1
  end
  return 0
end

-- The script of the -e options ('codes', a list): a function that runs
-- them in order and returns what the last one returns; or nil and the
-- first compile error. A chunk that is a function expression
-- ("function(s) ... end") gives that function.
function M.commandline(codes)
  local chunks = {}
  for k, code in ipairs(codes) do
    if code:match("^%s*function%s*%(") then code = "return " .. code end
    local chunk, msg = load(code, "=(command line)", "t")
    if not chunk then return nil, msg end
    chunks[k] = chunk
  end
  if #chunks == 1 then return chunks[1] end
  return function(...)
    for k = 1, #chunks - 1 do chunks[k](...) end
    return chunks[#chunks](...)
  end
end

-- ---- the script ----

-- While the script loads (or runs, as a program): the last byte it wrote
-- on stdout (w.tail) and whether it read stdin (w.stdin), seen through
-- print, io.write, io.read, io.lines and the stdin and stdout handles'
-- methods. w.restore() puts the originals back.
-- luacheck: push ignore 122 (io's fields are replaced)
function M.watchio()
  local w = {}
  local iolib = io
  local stdout, stdin = io.stdout, io.stdin
  local methods = getmetatable(stdout).__index
  local print, write, read, lines = _G.print, io.write, io.read, io.lines
  local fwrite, fread, flines = methods.write, methods.read, methods.lines
  local function track(...)
    for k = select("#", ...), 1, -1 do
      local v = select(k, ...)
      if math.type(v) then
        w.tail = "0"
        return
      elseif type(v) == "string" and v ~= "" then
        w.tail = v:sub(-1)
        return
      end
    end
  end
  _G.print = function(...)
    w.tail = "\n"
    return print(...)
  end
  iolib.write = function(...)
    if io.output() == stdout then track(...) end
    local f, e, n = write(...)
    return f, e, n
  end
  iolib.read = function(...)
    if io.input() == stdin then w.stdin = true end
    local t = table.pack(read(...))
    return table.unpack(t, 1, t.n)
  end
  iolib.lines = function(path, ...)
    if path == nil and io.input() == stdin then w.stdin = true end
    if path == nil and select("#", ...) == 0 then return lines() end -- 5.1 takes no nil
    local a, b, c, d = lines(path, ...)
    return a, b, c, d
  end
  methods.write = function(f, ...)
    if f == stdout then track(...) end
    local r, e, n = fwrite(f, ...)
    return r, e, n
  end
  methods.read = function(f, ...)
    if f == stdin then w.stdin = true end
    local t = table.pack(fread(f, ...))
    return table.unpack(t, 1, t.n)
  end
  methods.lines = function(f, ...)
    if f == stdin then w.stdin = true end
    local a, b, c, d = flines(f, ...)
    return a, b, c, d
  end
  function w.restore()
    _G.print, iolib.write, iolib.read, iolib.lines = print, write, read, lines
    methods.write, methods.read, methods.lines = fwrite, fread, flines
  end
  return w
end
-- luacheck: pop

-- The options of a run that a script's own lpar.parallel and lpar.imap
-- calls take as defaults (when it runs as a program).
local function calldefaults(o)
  local d = {timeout = o.timeout, retries = o.retries, max_memory = o.maxmem,
             chunksize = o.chunk, unordered = o.unordered}
  if o.jobsgiven then d.n_workers = o.jobs end
  return d
end

-- Give lpar.parallel, lpar.imap (and the global 'parallel') the defaults
-- of calldefaults(o), and count the calls of those and of lpar.pool
-- (u.calls). u.restore() puts the originals back.
function M.usedefaults(o)
  local lpar = require "lpar"
  local u = {calls = 0}
  local defaults = calldefaults(o)
  local was = {parallel = lpar.parallel, imap = lpar.imap, pool = lpar.pool,
               global = _G.parallel, workers = lpar.default_workers}
  -- the options argument with the defaults filled in; anything else (a
  -- bad value) is passed on as it is, to be refused as usual
  local function fill(opts, forimap)
    if opts ~= nil and not math.tointeger(opts) and type(opts) ~= "table" then
      return opts
    end
    local t = {}
    if type(opts) == "table" then
      for k, v in next, opts do t[k] = v end
    elseif opts ~= nil then
      t.n_workers = opts
    end
    for k, v in pairs(defaults) do
      -- --unordered is for imap: parallel's results are a table anyway
      if t[k] == nil and (forimap or k ~= "unordered") then t[k] = v end
    end
    return t
  end
  local parallel, imap, pool = was.parallel, was.imap, was.pool
  lpar.parallel = function(f, items, opts, ...)
    u.calls = u.calls + 1
    local t = table.pack(parallel(f, items, fill(opts), ...))
    return table.unpack(t, 1, t.n)
  end
  lpar.imap = function(f, items, opts, ...)
    u.calls = u.calls + 1
    local a, b, c, d = imap(f, items, fill(opts, true), ...)
    return a, b, c, d
  end
  if pool then
    lpar.pool = function(...)
      u.calls = u.calls + 1
      local t = table.pack(pool(...))
      return table.unpack(t, 1, t.n)
    end
  end
  if _G.parallel == was.parallel then _G.parallel = lpar.parallel end
  if o.jobsgiven then lpar.default_workers = o.jobs end
  function u.restore()
    lpar.parallel, lpar.imap, lpar.pool = was.parallel, was.imap, was.pool
    if _G.parallel == u.parallel then _G.parallel = was.global end
    lpar.default_workers = was.workers
  end
  u.parallel = lpar.parallel
  return u
end

-- The options that mean nothing to a script that returned nothing (run
-- as a program), as the user wrote them; their table is o.
local function notforprograms(o)
  local t = {}
  if o.files then t[#t + 1] = "-a" end
  if o.items then t[#t + 1] = "':::'" end
  if o.joblog then t[#t + 1] = "--joblog" end
  if o.events then t[#t + 1] = "--events" end
  if o.resume then t[#t + 1] = "--resume" end
  if o.resumefailed then t[#t + 1] = "--resume-failed" end
  if o.tag then t[#t + 1] = "--tag" end
  if o.number then t[#t + 1] = "--number" end
  if o.colsep then t[#t + 1] = "--colsep" end
  if o.shard then t[#t + 1] = "--shard" end
  if o.nul then t[#t + 1] = "-0" end
  if o.nulout then t[#t + 1] = "--null-output" end
  if o.json then t[#t + 1] = "--json" end
  if o.quiet then t[#t + 1] = "--quiet" end
  if o.progress then t[#t + 1] = "--progress" end
  if o.hosts then t[#t + 1] = "-S" end
  if o.hostsfile then t[#t + 1] = "--hosts" end
  if o.remotelpar then t[#t + 1] = "--remote-lpar" end
  local h = o.halt
  if h == false or (h and not (h.when == "now" and h.what == "fail" and h.n == 1)) then
    t[#t + 1] = "--halt " .. (h and h.text or "never")
  end
  return t
end

-- The message if a map script's -o file, opened before the script runs,
-- would be its script or items file; what the items are is guessed from
-- the arguments (args) as a map script takes them.
local function earlyclash(o, c, args)
  local items = o.files and o.files[1] or (not o.items and (args[1] or "-"))
  local id = items and c.fileid(items == "-" and "/dev/stdin" or items)
  return M.clash(o, c, {fileid = function() return id end})
end

-- The command: argv[0..n] as C gives it, c the C helpers. Returns the
-- exit status.
function M.main(argv, c)
  local o, err = M.parse(argv, c.cpus(), c.size)
  if not o then
    io.stderr:write("lpar: ", err, "\n", M.usage, "\n",
                    "try 'lpar --help' for more\n")
    return 2
  end
  if o.help or o.version then
    local f, werr = io.stdout:write(o.help and M.help or c.version .. "\n")
    if f then f, werr = io.stdout:flush() end
    if not f then return fail(1, "cannot write the output: " .. werr) end
    return 0
  end
  local chunk, msg
  if o.code then
    chunk, msg = M.commandline(o.code)
  else
    -- scripts load as text (5.1's loadfile takes no mode, and the Luas
    -- word the refusal each their own way)
    local f = io.open(o.script, "rb")
    local first = f and f:read(1)
    if f then f:close() end
    if first == "\27" then
      return fail(2, o.script .. " is precompiled Lua (bytecode): lpar loads scripts as text")
    end
    chunk, msg = loadfile(o.script, "t")
  end
  if not chunk then return fail(2, msg) end
  if o.code then
    o.source = o.code[1]
    if #o.code > 1 then -- each chunk, as <length>:<bytes>
      local parts = {}
      for k, code in ipairs(o.code) do parts[k] = #code .. ":" .. code end
      o.source = table.concat(parts)
    end
  else
    o.source = readall(o.script) or ""
  end
  local args = {}
  for k = 0, o.last do args[k - o.at] = argv[k] end
  o.args = args
  _G.arg = args
  -- -o is the script's standard output (as '> FILE' would be), opened
  -- before it runs; with --joblog it is opened at the run's start
  if o.output and not o.joblog then
    local clash = earlyclash(o, c, args)
    if clash then return fail(2, clash) end
    local ok, rerr = c.redirect(o.output, 0)
    if not ok then return fail(2, rerr) end
    o.redirected = true
  end
  local w, u = M.watchio(), M.usedefaults(o)
  local res = table.pack(xpcall(chunk, traceback,
                                table.unpack(args, 1, o.last - o.at)))
  w.restore()
  u.restore()
  if not res[1] then
    local e = res[2]
    local kind, sig = require("lpar").errkind(e)
    if kind == "interrupted" then return fail(128 + sig, e) end
    return fail(2, tostring(e))
  end
  local r = res[2]
  local name = o.script or "the script"
  if res.n == 1 then -- nothing returned: the script did its own work
    local wrong = notforprograms(o)
    if #wrong > 0 then
      return fail(2, ("%s does not apply: %s returned nothing, so it ran as a program, " ..
                      "not a map over items"):format(table.concat(wrong, ", "), name))
    end
    local first = args[1]
    if u.calls == 0 and first and (first == "-" or c.filetype(first) == "file") then
      return fail(2, ("%s returned nothing and called no lpar.parallel, imap or pool: " ..
                      "is its 'return' missing? (%s was not read)"):format(name, first))
    end
    return 0
  end
  local map, init, close
  if not r then
    return fail(2, ("%s returned %s, expected a function or a table with 'map' " ..
                    "(or no value at all, to run as a program)"):format(name, tostring(r)))
  elseif type(r) == "function" then
    map = r
  elseif type(r) == "table" then
    for k in next, r do
      if k ~= "map" and k ~= "init" and k ~= "close" then
        return fail(2, ("%s: unknown key %s in the table it returned (valid keys: map, init, close)")
                    :format(name, type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]"))
      end
    end
    if type(r.map) ~= "function" then
      return fail(2, ("%s: 'map' must be a function, got %s"):format(name, type(r.map)))
    end
    map, init, close = r.map, r.init, r.close
    for _, k in ipairs({"init", "close"}) do
      if r[k] ~= nil and type(r[k]) ~= "function" then
        return fail(2, ("%s: '%s' must be a function, got %s")
                    :format(name, k, type(r[k])))
      end
    end
  else
    return fail(2, ("%s must return a function, a table with a 'map' " ..
                    "function, or nothing (got %s)"):format(name, type(r)))
  end
  -- what the script printed while loading stands on its own line(s)
  if w.tail and w.tail ~= "\n" then io.stdout:write("\n") end
  if o.nulout then
    c.eol = "\0"
    c.endlines(true)
  end
  local k, n = o.shard and o.shard[1], o.shard and o.shard[2]
  local reader, rerr, counter
  if o.items then -- items from the command line, NUL-separated here
    o.nul = true
    local text = table.concat(o.items, "\0") .. (#o.items > 0 and "\0" or "")
    reader, rerr = c.open(nil, true, k or 1, n or 1, text)
    counter = function() return #o.items end
  else
    local paths = o.files or {args[1] or "-"}
    -- a regular file is read by the workers themselves (byte ranges); a
    -- host's workers get the bytes
    reader, rerr = c.open(#paths == 1 and paths[1] or paths, o.nul, k, n, nil,
                          not (o.hosts or o.hostsfile))
    counter = function()
      local total = 0
      for _, path in ipairs(paths) do
        local t = c.count(path == "-" and "/dev/stdin" or path, o.nul)
        if not t then return nil end
        total = total + t
      end
      return total
    end
  end
  if not reader then return fail(2, rerr) end
  -- a worker could not hold a record longer than its --max-memory
  if o.maxmem then reader:limit(c.size(o.maxmem)) end
  local fromstdin = false
  for _, path in ipairs(o.items and {} or o.files or {args[1] or "-"}) do
    if path == "-" then fromstdin = true end
  end
  if fromstdin and w.stdin then
    return fail(2, ("%s read the standard input while loading, but the items come from it: " ..
                    "give them as a file (lpar %s items.txt) or with -a"):format(name, o.script or "-e CODE"))
  end
  if fromstdin and c.isatty(0) and not o.quiet then
    io.stderr:write("lpar: reading items from the terminal (end with Ctrl-D)\n")
  end
  if o.resumefailed then -- the items the joblog records as failed, only
    local again, why = M.failedlines(o, c, reader)
    if not again then return fail(2, why) end
    if #again.lines == 0 then
      if not o.quiet then
        io.stderr:write(("lpar: %s records no failed item: nothing to run again\n"):format(o.joblog))
      end
      return 0
    end
    local text
    text, why = M.pick(o, o.files or {args[1] or "-"}, again.lines)
    if not text then return fail(2, why) end
    reader:close()
    reader, rerr = c.open(nil, o.nul, 1, 1, text)
    if not reader then return fail(2, rerr) end
    o.lines, o.again = again.lines, again
    counter = function() return #again.lines end
  end
  local code = M.run(o, c, reader, counter, map, init, close)
  reader:close()
  return code
end

return M
