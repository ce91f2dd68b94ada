-- The example host of examples/embed run as a real process: Lua embedded
-- in C with a render thread of its own, lpar registered by luaL_requiref.
local H = require "spec.helper"

local host = H.build .. "/lpar_embed"

local function alive(pids)
  for pid in pids:gmatch("%d+") do
    if H.alive(pid) then return pid end
  end
end

-- Wait up to 5 s for the processes named in 'pids' to be gone.
local function gone(pids)
  local deadline = H.now() + 5
  while alive(pids) and H.now() < deadline do H.sleep(0.02) end
  return not alive(pids)
end

describe("the example host", function()
  it("is built", function()
    local f = io.open(host)
    assert.is_not_nil(f, host .. " missing: build the lpar_embed target")
    f:close()
  end)

  it("runs lpar.parallel and a pool job while its frames and thread go on", function()
    local rc, out, err = H.run(host .. " examples/embed/frame.lua")
    assert.equal("", err)
    assert.equal(0, rc)
    assert.matches("^lpar_embed: lpar %d+%.%d+%.%d+\n", out)
    assert.matches("level: 32 chunks with lpar.parallel", out)
    local items, frames = out:match("pool: (%d+) items in %d+ ms, (%d+) frames drawn meanwhile")
    assert.equal("16", items)
    assert.is_true(tonumber(frames) >= 10)
    local drawn = out:match("render thread drew (%d+)")
    assert.is_true(tonumber(drawn) > 0)
    assert.not_matches("FAILED", out)
    assert.matches("\nlpar_embed: ok\n$", out)
    local pids = out:match("workers: ([%d ]+)")
    assert.is_not_nil(pids)
    assert.is_true(gone(pids))
  end)

  it("reports a script error and exits 1, leaving no worker behind", function()
    local rc, out, err = H.run(host .. " spec/fixtures/pool/frame_error.lua")
    assert.equal(1, rc)
    assert.matches("lpar_embed: frame: .-item 1: broken item 7", err)
    assert.matches("lpar_embed: FAILED\n$", out)
    assert.is_true(gone(out:match("workers: ([%d ]+)") or ""))
  end)

  it("exits 2 when the script cannot be loaded", function()
    local rc, _, err = H.run(host .. " /nonexistent/frame.lua")
    assert.equal(2, rc)
    assert.matches("lpar_embed: /nonexistent/frame.lua: cannot open", err)
  end)
end)
