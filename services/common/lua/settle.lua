-- Forget reservations whose orders are now in MySQL. The buyer stays in the users set.
-- KEYS: 1 resv, 2 resv:ts
-- ARGV: order numbers
-- Returns how many reservations were removed.
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return n
