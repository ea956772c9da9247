-- Forget reservations whose orders are now in MySQL. The buyer stays in the users set.
-- Prepended with bulk.lua.
-- KEYS: 1 resv, 2 resv:ts
-- ARGV: order numbers
-- Returns how many reservations were removed.
local n = bulk('HDEL', KEYS[1], ARGV)
bulk('ZREM', KEYS[2], ARGV)
return n
