-- Prepended to the scripts that write many fields or members of one key (`redis.rs`): one
-- command per key and call instead of one per order, so that Redis parses, runs and appends to
-- its AOF one command where it did one per order (docs/performance.md, "Redis commands per lot").
-- Lua's unpack takes at most about 8,000 values, so a long list goes in slices of 4,000 (even, so
-- that field-value pairs stay whole).
local function bulk(command, key, items)
  local done = 0
  for first = 1, #items, 4000 do
    done = done + redis.call(command, key, unpack(items, first, math.min(first + 3999, #items)))
  end
  return done
end

-- HMGET over a list of any length: the values in the order of the fields, false for a missing one.
local function hmget(key, fields, first)
  local values = {}
  for from = first, #fields, 4000 do
    local part = redis.call('HMGET', key, unpack(fields, from, math.min(from + 3999, #fields)))
    for i = 1, #part do
      values[#values + 1] = part[i]
    end
  end
  return values
end
