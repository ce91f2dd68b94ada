-- What `<close>` does to pools and jobs: Lua 5.4 only (no other Lua has
-- the syntax), so scripts/test runs this file on 5.4 alone. The specs
-- that run under every Lua close their pools with pool:close() or
-- H.closing.
local lpar = require "lpar"
local H = require "spec.helper"

local function children()
  local pids = {}
  for _, kid in ipairs(H.children()) do pids[#pids + 1] = kid.pid end
  table.sort(pids)
  return pids
end

describe("a <close> variable", function()
  after_each(function() assert.same({}, children()) end)

  it("closes its pool when it goes out of scope", function()
    do
      local p <close> = lpar.pool{n_workers = 2}
      assert.equal(2, #children())
      local pids = p:pids()
      table.sort(pids)
      assert.same(children(), pids)
    end
    assert.same({}, children())
  end)

  it("closes its pool when an error leaves the scope", function()
    local ok, err = pcall(function()
      local p <close> = lpar.pool{n_workers = 2}
      assert.equal(2, #p:pids())
      error("leaving", 0)
    end)
    assert.is_false(ok)
    assert.equal("leaving", err)
    assert.same({}, children())
  end)

  it("cancels a job left running when it goes", function()
    local pool = lpar.pool{n_workers = 2}
    local job
    do
      local j <close> = pool:submit(function(x)
        local t = os.clock()
        while os.clock() - t < 10 do end
        return x
      end, H.range(2))
      job = j
    end
    assert.equal("cancelled", job:status())
    pool:close()
  end)
end)
