-- Load an activity into Redis unless a sale for it is already there.
-- KEYS: 1 meta, 2 stock, 3 users
-- ARGV: 1 start_ms, 2 end_ms (-1 = open ended), 3 available stock, 4 total stock, 5.. buyers known
--       to MySQL (so a rebuilt activity still refuses them)
-- Returns 1 loaded, 0 kept (only the sale window was updated; counters are never overwritten).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'start_ms', ARGV[1], 'end_ms', ARGV[2])
  return 0
end
redis.call('SET', KEYS[2], ARGV[3])
for i = 5, #ARGV do
  redis.call('SADD', KEYS[3], ARGV[i])
end
-- Counters built by this process from MySQL are verified: stamp them with its epoch.
redis.call('HSET', KEYS[1], 'start_ms', ARGV[1], 'end_ms', ARGV[2], 'total', ARGV[4],
  'epoch', tostring(redis.call('LASTSAVE')))
return 1
