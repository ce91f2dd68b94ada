local lpar = require "lpar"

describe("lpar.parallel", function()
  it("returns results in item order and the item count", function()
    local r, n = lpar.parallel(function(x) return x * 2 end, {1, 2, 3})
    assert.same({2, 4, 6}, r)
    assert.equal(3, n)
  end)
end)
