-- Prepended to the scripts that write many fields or members of one key (`redis.rs`): one
-- command per key and call instead of one per order, so that Redis parses, runs and appends to
-- its AOF one command where it did one per order (docs/performance.md, "Redis commands per lot").
-- Lua's unpack takes at most about 8,000 values, so a long list goes in slices of 4,000 (even, so
-- that field-value pairs stay whole).
local function slices(command, key, items, first)
  local replies = {}
  for from = first, #items, 4000 do
    replies[#replies + 1] =
      redis.call(command, key, unpack(items, from, math.min(from + 3999, #items)))
  end
  return replies
end

-- A write over the whole list; the sum of the slices' counts.
local function bulk(command, key, items)
  local done = 0
  for _, count in ipairs(slices(command, key, items, 1)) do
    done = done + count
  end
  return done
end

-- HMGET of fields[first..]: the values in the order of the fields, false for a missing one.
local function hmget(key, fields, first)
  local values = {}
  for _, part in ipairs(slices('HMGET', key, fields, first)) do
    for i = 1, #part do
      values[#values + 1] = part[i]
    end
  end
  return values
end
