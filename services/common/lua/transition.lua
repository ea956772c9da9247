-- Move reservations from one of the allowed states to a new state. Prepended with bulk.lua.
-- KEYS: 1 resv, 2 released
-- ARGV: 1 allowed states (e.g. "RA"), 2 new state, 3.. order numbers
-- Returns one code per order number: 1 moved, 0 no reservation (already settled, or never seen),
-- -1 in another state, -2 released (a tombstone exists: the order must not be created).
local out = {}
-- What this call moves, so that an order named twice sees its new state.
local written = {}
local recs = hmget(KEYS[1], ARGV, 3)
for i = 3, #ARGV do
  local rec = written[ARGV[i]] or recs[i - 2]
  if rec then
    local state = string.sub(rec, 1, 1)
    if string.find(ARGV[1], state, 1, true) then
      written[ARGV[i]] = ARGV[2] .. string.sub(rec, 2)
      out[#out + 1] = 1
    else
      out[#out + 1] = -1
    end
  elseif redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    out[#out + 1] = -2
  else
    out[#out + 1] = 0
  end
end
local moved = {}
for order, record in pairs(written) do
  moved[#moved + 1] = order
  moved[#moved + 1] = record
end
if #moved > 0 then
  bulk('HSET', KEYS[1], moved)
end
return out
