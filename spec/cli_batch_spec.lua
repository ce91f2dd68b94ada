-- How the lpar command batches records: the one rule of the engine's
-- policy sizes them (see docs/cli.md, "Streaming").
local H = require "spec.helper"

local FIX = "spec/fixtures/cli/"
local tmpname = H.tmpfiles(after_each)

describe("lpar batches", function()
  it("hands out one record at a time while a batch is overdue", function()
    -- "s1" holds its worker until "s2" starts; the 4000 quick records
    -- between them show the other worker that s1's batch is overdue, so
    -- the batch with "s2" holds no quick record: s2 sees all the "a"
    -- records after it run in the other worker
    local dir = H.tmpdir()
    local n = 4000
    local items = tmpname()
    H.writefile(items, ("f\n"):rep(n) .. "s1\n" .. ("f\n"):rep(n) .. "s2\n" .. ("a\n"):rep(n))
    local code, out, err = H.lpar(("-j2 %s %s %s 1 %d"):format(FIX .. "hostage.lua", H.quote(items),
                                                                H.quote(dir), n), nil, 120)
    H.rmdir(dir)
    assert.equal(0, code, err)
    local got = H.lines(out)
    assert.equal(3 * n + 2, #got)
    assert.equal("s1", got[n + 1])
    assert.equal("s2 free", got[2 * n + 2])
  end)
end)
