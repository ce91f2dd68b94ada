-- Turns one results file of scripts/bench into the table of
-- docs/benchmarks.md and, with gnuplot, the chart of the README.
--   lua5.4 scripts/bench-report.lua RESULTS [--doc FILE [--check]] [--svg FILE]
-- --doc FILE   replaces what lies between the bench markers of FILE
-- --check      only says (exit 1) whether FILE's table is what RESULTS gives
-- --svg FILE   draws the chart
local cjson = require "cjson"

local results, doc, check, svg
do
  local args, i = {...}, 1
  while args[i] do
    local a = args[i]
    if a == "--doc" then
      i = i + 1
      doc = args[i]
    elseif a == "--svg" then
      i = i + 1
      svg = args[i]
    elseif a == "--check" then
      check = true
    elseif not results and not a:match("^%-") then
      results = a
    else
      io.stderr:write("bench-report: bad argument '", a, "'\n")
      os.exit(2)
    end
    i = i + 1
  end
  if not results or (check and not doc) then
    io.stderr:write("usage: lua5.4 scripts/bench-report.lua RESULTS [--doc FILE [--check]] [--svg FILE]\n")
    os.exit(2)
  end
end

local function readfile(path)
  local f, err = io.open(path, "rb")
  if not f then
    io.stderr:write("bench-report: ", err, "\n")
    os.exit(1)
  end
  local s = f:read("a")
  f:close()
  return s
end

local function writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local run = cjson.decode(readfile(results))

-- The tools, in the order of the table's columns and the chart's bars.
local tools = {
  {key = "lpar", name = "lpar"},
  {key = "parallel", name = "GNU parallel"},
  {key = "xargs", name = "`xargs -P`", plain = "xargs -P"},
  {key = "python", name = "Python `Pool`", plain = "Python Pool"},
}

local function fmt(s)
  if s < 1e-3 then return string.format("%.1f µs", s * 1e6) end
  if s < 1 then return string.format("%.2f ms", s * 1e3) end
  return string.format("%.3f s", s)
end

local function ratio(x) return string.format("%.2f×", x) end

-- The figure of a tool in a case (best, or median where the target says).
local function figure(c, m) return m[c.target.stat] or m.best end

-- Whether lpar met the case's target, and the target as words.
local function target(c)
  local t, m = c.target, c.tools.lpar
  local v = figure(c, m)
  local words, met = {}, true
  if t.max then
    words[#words + 1] = "≤ " .. fmt(t.max)
    met = met and v <= t.max
  end
  if t.speedup then
    words[#words + 1] = string.format("≥ %.2f× speed-up", t.speedup)
    met = met and c.serial / v >= t.speedup
  end
  if t.rate then
    words[#words + 1] = string.format("≥ %.2f GB/s", t.rate / 1e9)
    met = met and c.bytes / v >= t.rate
  end
  if t.ratio then
    words[#words + 1] = string.format("≤ %.2f× the loop's time", t.ratio)
    met = met and v / c.serial <= t.ratio
  end
  if t.ahead and c.tools[t.ahead] then -- faster than a peer in the same run
    words[#words + 1] = "ahead of " .. (t.ahead == "parallel" and "GNU parallel" or t.ahead)
    met = met and v < figure(c, c.tools[t.ahead])
  end
  if t.rss then
    words[#words + 1] = string.format("RSS ≤ %d MB", t.rss // 1024)
    met = met and (m.rss or math.huge) <= t.rss
  end
  if #words == 0 then return "–" end
  return table.concat(words, ", ") .. (met and ": met" or ": **missed**")
end

local function cell(c, key)
  local m = c.tools[key]
  if not m then return "–" end
  local v = figure(c, m)
  local s = string.format("%s (%s)", fmt(v), ratio(v / c.serial))
  if key == "lpar" and c.bytes then s = s .. string.format(", %.2f GB/s", c.bytes / v / 1e9) end
  if key == "lpar" and m.rss and c.target.rss then s = s .. string.format(", %.1f MB RSS", m.rss / 1024) end
  return s
end

-- A time and, in brackets, that time as a multiple of the serial one.
local function timed(v, serial) return string.format("%s (%s)", fmt(v), ratio(v / serial)) end

-- The cases of another Lua of the same run beside the first Lua's: each
-- Lua's serial time, floor and lpar, lpar's against its own Lua's serial
-- loop, and lpar's time on the other Lua as a multiple of the first's.
local function others_md(o, other)
  local first = run.lua or "Lua 5.4"
  local byid = {}
  for _, c in ipairs(run.cases) do byid[c.id] = c end
  o[#o + 1] = ""
  o[#o + 1] = string.format("The same cases on %s (`%s`, lpar built for it in `%s`), beside %s, in the same run: "
    .. "each case ran on %s right after %s, against that Lua's own serial loop and floor. The peers ran on %s "
    .. "only.", other.lua, other.interp, other.build, first, other.lua, first, first)
  o[#o + 1] = ""
  o[#o + 1] = string.format("| case | %s: serial | %s: floor | %s: lpar | %s: serial | %s: floor | %s: lpar "
    .. "| lpar, %s / %s |", first, first, first, other.lua, other.lua, other.lua, other.lua, first)
  o[#o + 1] = string.rep("| --- ", 8) .. "|"
  local differ = {}
  for _, c in ipairs(other.cases) do
    local a = byid[c.id]
    local row = {c.title .. (c.target.stat == "median" and ", medians" or "")}
    if a then
      local av = figure(a, a.tools.lpar)
      row[#row + 1] = fmt(a.serial)
      row[#row + 1] = timed(a.floor, a.serial)
      row[#row + 1] = timed(av, a.serial)
    else
      row[#row + 1], row[#row + 1], row[#row + 1] = "–", "–", "–"
    end
    local v = figure(c, c.tools.lpar)
    row[#row + 1] = fmt(c.serial)
    row[#row + 1] = timed(c.floor, c.serial)
    row[#row + 1] = timed(v, c.serial)
    row[#row + 1] = a and ratio(v / figure(a, a.tools.lpar)) or "–"
    o[#o + 1] = "| " .. table.concat(row, " | ") .. " |"
    if not a or a.serial_is ~= c.serial_is or a.floor_is ~= c.floor_is then
      differ[#differ + 1] = string.format("- %s: serial is %s; the floor is %s.", c.id, c.serial_is, c.floor_is)
    end
  end
  if #differ > 0 then
    o[#o + 1] = ""
    o[#o + 1] = string.format("Where serial and floor differ on %s:", other.lua)
    o[#o + 1] = ""
    for _, line in ipairs(differ) do o[#o + 1] = line end
  end
end

local function table_md()
  local o = {}
  o[#o + 1] = string.format("%s%s on %s, %d cores, load %s%s, %s%s.", run.version, run.lua and " (" .. run.lua .. ")"
    or "", run.system, run.cores, run.load, run.load_after and " at the start and " .. run.load_after .. " at the end"
    or "", run.date, run.tiny and " (a tiny run)" or "")
  if run.command then o[#o] = o[#o] .. string.format(" Made by `%s`.", run.command) end
  o[#o + 1] = ""
  local head = {"case", "serial", "floor"}
  for _, t in ipairs(tools) do head[#head + 1] = t.name end
  head[#head + 1] = "lpar's target"
  o[#o + 1] = "| " .. table.concat(head, " | ") .. " |"
  o[#o + 1] = string.rep("| --- ", #head) .. "|"
  for _, c in ipairs(run.cases) do
    local row = {c.title .. (c.target.stat == "median" and ", medians" or ""), fmt(c.serial),
      string.format("%s (%s)", fmt(c.floor), ratio(c.floor / c.serial))}
    for _, t in ipairs(tools) do row[#row + 1] = cell(c, t.key) end
    row[#row + 1] = target(c)
    o[#o + 1] = "| " .. table.concat(row, " | ") .. " |"
  end
  o[#o + 1] = ""
  o[#o + 1] = "What serial and floor are, case by case:"
  o[#o + 1] = ""
  for _, c in ipairs(run.cases) do
    o[#o + 1] = string.format("- %s: serial is %s; the floor is %s.", c.id, c.serial_is, c.floor_is)
  end
  for _, other in ipairs(run.others or {}) do others_md(o, other) end
  return table.concat(o, "\n") .. "\n"
end

local BEGIN = "<!-- bench:begin (made by scripts/bench-report.lua from bench/results.json; do not edit) -->"
local END = "<!-- bench:end -->"

if doc then
  local text = readfile(doc)
  local a, b = text:find(BEGIN, 1, true)
  local c = text:find(END, 1, true)
  if not a or not c or c < b then
    io.stderr:write("bench-report: ", doc, " has no bench markers (", BEGIN, " ... ", END, ")\n")
    os.exit(1)
  end
  local new = text:sub(1, b) .. "\n" .. table_md() .. text:sub(c)
  if check then
    if new ~= text then
      io.stderr:write("bench-report: the table of ", doc, " is not what ", results,
        " gives (run scripts/bench-report.lua ", results, " --doc ", doc, ")\n")
      os.exit(1)
    end
  elseif new ~= text then
    writefile(doc, new)
  end
end

if svg then
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir " .. dir))
  local data, lo = {}, math.huge
  for _, c in ipairs(run.cases) do
    local row = {c.label or c.id}
    for _, t in ipairs(tools) do
      local m = c.tools[t.key]
      local r = m and figure(c, m) / c.serial
      if r then lo = math.min(lo, r) end
      row[#row + 1] = r and string.format("%.6g", r) or "?"
    end
    row[#row + 1] = string.format("%.6g", c.floor / c.serial)
    lo = math.min(lo, c.floor / c.serial)
    data[#data + 1] = table.concat(row, "\t")
  end
  writefile(dir .. "/data", table.concat(data, "\n") .. "\n")
  local titles = {}
  for i, t in ipairs(tools) do
    titles[#titles + 1] = string.format("%s using %d%s title '%s'", i == 1 and "data" or "''", i + 1,
      i == 1 and ":xtic(1)" or "", t.plain or t.name)
  end
  titles[#titles + 1] = string.format("'' using %d title 'floor' fillstyle pattern 4", #tools + 2)
  local gp = table.concat({
    "set terminal svg size 960,520 dynamic font 'sans,12' background rgb 'white'",
    "set output '" .. svg .. "'",
    string.format("set title \"%s, %d cores, %s: time as a multiple of the serial loop's "
      .. "(log scale; lower is faster)\"", run.version, run.cores, run.date),
    "set datafile separator '\\t'",
    "set datafile missing '?'",
    "set style data histogram",
    "set style histogram clustered gap 1",
    "set style fill solid 0.85 border -1",
    "set boxwidth 0.9",
    "set logscale y",
    string.format("set yrange [%g:*]", 10 ^ math.floor(math.log(lo, 10))),
    "set ylabel 'time / serial'",
    "set grid ytics",
    "set key below horizontal",
    "set arrow from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 linewidth 2",
    "set label 'serial' at graph 1, first 1 offset -5, 0.7",
    "data = '" .. dir .. "/data'",
    "plot " .. table.concat(titles, ", "),
  }, "\n") .. "\n"
  writefile(dir .. "/plot.gp", gp)
  local ok = os.execute("gnuplot " .. dir .. "/plot.gp")
  os.execute("rm -rf " .. dir)
  if not ok then
    io.stderr:write("bench-report: gnuplot failed (is gnuplot-nox installed? scripts/setup installs it)\n")
    os.exit(1)
  end
end
