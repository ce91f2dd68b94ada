-- cmake --install into a temporary prefix, then use what was installed:
-- the module from lua5.4 with only that prefix on LUA_CPATH, and the
-- header and static library through pkg-config from a C host.
local H = require "spec.helper"

local function sh(cmd)
  local rc, out, err = H.run(cmd)
  return rc, out, err
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

describe("the installed tree", function()
  local prefix

  setup(function()
    prefix = os.tmpname()
    os.remove(prefix)
    local rc, out, err = sh("cmake --install " .. q(H.build) .. " --prefix " .. q(prefix))
    assert(rc == 0, "cmake --install failed:\n" .. out .. err)
  end)

  teardown(function() sh("rm -rf " .. q(prefix)) end)

  it("holds the module, the command, the header, the library and lpar.pc", function()
    for _, path in ipairs{"lib/lua/5.4/lpar.so", "bin/lpar", "include/lpar.h",
                          "lib/liblpar.a", "lib/pkgconfig/lpar.pc"} do
      assert.is_true(exists(prefix .. "/" .. path), path)
    end
  end)

  it("loads in lua5.4 with only the prefix on LUA_CPATH", function()
    local code = [[
      local lpar = require "lpar"
      io.write(package.searchpath("lpar", package.cpath), "\n")
      local r, n = lpar.parallel(function(x) return x * x end, {1, 2, 3, 4}, 2)
      io.write(n, " ", table.concat(r, ","), "\n")
      local pool <close> = lpar.pool{n_workers = 2}
      io.write(table.concat(pool:map(function(x) return x + 1 end, {1, 2}), ","), "\n")
    ]]
    local rc, out, err = sh(string.format("env LUA_CPATH=%s LUA_PATH='' LUA_INIT='' lua5.4 -e %s",
      q(prefix .. "/lib/lua/5.4/?.so"), q(code)))
    assert.equal("", err)
    assert.equal(0, rc)
    assert.equal(prefix .. "/lib/lua/5.4/lpar.so\n4 1,4,9,16\n2,3\n", out)
  end)

  it("runs the installed command", function()
    local script = os.tmpname()
    local f = io.open(script, "w")
    f:write("print(parallel(function(x) return x + 1 end, {41}, 1)[1])\n")
    f:close()
    local rc, out = sh(q(prefix .. "/bin/lpar") .. " " .. q(script))
    os.remove(script)
    assert.equal(0, rc)
    assert.equal("42\n", out)
  end)

  it("gives C hosts their flags through pkg-config", function()
    local env = "PKG_CONFIG_PATH=" .. q(prefix .. "/lib/pkgconfig") .. " "
    local rc, out = sh(env .. "pkg-config --cflags --libs lpar")
    assert.equal(0, rc)
    assert.matches("%-I" .. prefix:gsub("%p", "%%%0") .. "/lib/pkgconfig/%.%./%.%./include", out)
    assert.matches("%-llpar", out)
    assert.matches("%-llua5%.4", out)
    local _, version = sh(env .. "pkg-config --modversion lpar")
    assert.equal("0.1.0\n", version)
  end)

  it("builds the example host from the installed header and library", function()
    local exe = prefix .. "/lpar_embed"
    local env = "export PKG_CONFIG_PATH=" .. q(prefix .. "/lib/pkgconfig") .. "; "
    local rc, out, err = sh(env .. "cc -std=c11 -D_GNU_SOURCE -o " .. q(exe) ..
      " examples/embed/host.c $(pkg-config --cflags --libs lpar) -pthread")
    assert.equal(0, rc, out .. err)
    rc, out = sh("cd examples/embed && " .. q(exe) .. " frame.lua")
    assert.equal(0, rc)
    assert.matches("\nlpar_embed: ok\n$", out)
  end)

  it("can be moved: lpar.pc finds the prefix from its own place", function()
    local moved = prefix .. ".moved"
    assert.equal(0, (sh("mv " .. q(prefix) .. " " .. q(moved))))
    local rc, out = sh("PKG_CONFIG_PATH=" .. q(moved .. "/lib/pkgconfig") ..
      " pkg-config --cflags lpar")
    sh("mv " .. q(moved) .. " " .. q(prefix))
    assert.equal(0, rc)
    assert.matches(moved:gsub("%p", "%%%0") .. "/lib/pkgconfig/%.%./%.%./include", out)
  end)
end)

describe("the rockspec", function()
  local luarocks = sh("command -v luarocks") == 0

  it("builds and installs the module into a rocks tree", function()
    if not luarocks then
      pending("luarocks is not installed")
      return
    end
    -- build from a copy, so that build.luarocks/ stays out of the checkout
    local src, tree = os.tmpname(), os.tmpname()
    os.remove(src)
    os.remove(tree)
    local rc, out, err = sh("mkdir -p " .. q(src) .. " && cp -r CMakeLists.txt lpar.pc.in " ..
      "lpar-0.1.0-1.rockspec src lua scripts examples " .. q(src) .. " && cd " .. q(src) ..
      " && luarocks --lua-version=5.4 --tree=" .. q(tree) .. " make lpar-0.1.0-1.rockspec")
    assert.equal(0, rc, out .. err)
    rc, out = sh(string.format("env LUA_CPATH=%s LUA_PATH='' lua5.4 -e %s",
      q(tree .. "/lib/lua/5.4/?.so"),
      q("local p <close> = require('lpar').pool(1) print(p:map(string.upper, {'rock'})[1])")))
    assert.equal(0, rc)
    assert.equal("ROCK\n", out)
    assert.is_true(exists(tree .. "/bin/lpar"))
    sh("rm -rf " .. q(src) .. " " .. q(tree))
  end)
end)
