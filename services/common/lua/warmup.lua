-- Load an activity into Redis unless a sale for it is already there.
-- KEYS: 1 meta, 2 stock, 3 users, 4 returned
-- ARGV: 1 start_ms, 2 end_ms (-1 = open ended), 3 available stock, 4 total stock, 5 n,
--       6..(5+n) buyers with a live order in MySQL (so a rebuilt activity still refuses them),
--       then the orders whose stock MySQL took back but Redis has not (see rebuild.lua)
-- Returns 1 loaded, 0 kept (only the sale window was updated; counters are never overwritten).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'start_ms', ARGV[1], 'end_ms', ARGV[2])
  return 0
end
redis.call('SET', KEYS[2], ARGV[3])
local buyers = tonumber(ARGV[5])
for i = 6, 5 + buyers do
  redis.call('SADD', KEYS[3], ARGV[i])
end
local t = redis.call('TIME')
for i = 6 + buyers, #ARGV do
  redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000, ARGV[i])
end
-- Counters built by this process from MySQL are verified: stamp them with its epoch.
redis.call('HSET', KEYS[1], 'start_ms', ARGV[1], 'end_ms', ARGV[2], 'total', ARGV[4],
  'epoch', tostring(redis.call('LASTSAVE')))
return 1
