-- LuaRocks: builds and installs the lpar module (lpar.so) and the lpar
-- command with the project's CMake build. From a checkout:
--   luarocks --lua-version=5.4 make lpar-0.1.0-1.rockspec
-- (or 5.1, 5.2, 5.3: the build is for the Lua luarocks runs)
rockspec_format = "3.0"
package = "lpar"
version = "0.1.0-1"
source = {
  url = "lpar-0.1.0.tar.gz",
  dir = "lpar-0.1.0",
}
description = {
  summary = "Parallel map for Lua 5.1-5.4 and LuaJIT over forked worker processes",
  detailed = [[
lpar runs a Lua function over many items on many processes: forked
workers that inherit the caller's whole state (lpar.parallel, lpar.imap),
or persistent pools whose jobs a host polls without blocking (lpar.pool).
Linux only: it relies on fork, epoll and prctl.]],
  license = "MIT",
}
supported_platforms = {"linux"}
dependencies = {
  "lua >= 5.1, < 5.5",
}
external_dependencies = {
  -- the build finds Lua's headers through pkg-config (lua5.4.pc, ...)
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    CMAKE_INSTALL_BINDIR = "$(BINDIR)",
    LPAR_INSTALL_LMOD = "$(LIBDIR)",
    LPAR_INSTALL_DEV = "OFF",
    LPAR_LUA_FROM = "$(LUA)",
  },
}
