-- A token bucket shared by every gateway replica (the seed's RequestRateLimiter), atomically.
-- KEYS: 1 the bucket (hash: tokens, ts_us), hash-tagged per resource: gw:{rl:<resource>}:bucket
-- ARGV: 1 replenish rate (tokens per second), 2 burst capacity, 3 tokens requested
-- Returns {allowed (1/0), tokens left (floored), ms until the request would fit (0 if allowed)}.
-- Time is Redis' own clock, so replicas with skewed clocks still share one bucket.
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local requested = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts_us')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
  last = now
end
local elapsed = math.max(0, now - last)
tokens = math.min(capacity, tokens + elapsed * rate / 1000000)
local allowed = 0
local wait_ms = 0
if tokens >= requested then
  tokens = tokens - requested
  allowed = 1
else
  wait_ms = math.ceil((requested - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts_us', tostring(now))
-- A bucket left alone refills completely in capacity / rate seconds; after twice that it is
-- the same as no bucket, so it may expire.
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 2000 / rate) + 1000)
return {allowed, math.floor(tokens), wait_ms}
