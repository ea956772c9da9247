-- Registers this gateway replica and counts the live ones, for the local fallback's share.
-- KEYS: 1 the replica set (zset: instance id -> last beat, ms), gw:{gateway}:replicas
-- ARGV: 1 instance id, 2 ms after which a replica that has not beaten is dropped
-- Returns the number of live replicas, this one included.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
