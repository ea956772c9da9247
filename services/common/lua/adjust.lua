-- Add (or, with a negative delta, take away) available stock of a warmed-up activity.
-- KEYS: 1 meta, 2 stock
-- ARGV: 1 delta, 2 change of the total (restock: the delta; drift repair: 0)
-- Returns the new stock, or -1 if the activity is not in Redis. Never goes below zero.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local delta = tonumber(ARGV[1])
local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
if stock + delta < 0 then
  delta = -stock
end
redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[2]))
return redis.call('INCRBY', KEYS[2], delta)
