-- A token bucket shared by every gateway replica (the seed's RequestRateLimiter), atomically.
-- A replica takes a lease: at least the tokens one request needs, at most what it asks for.
-- KEYS: 1 the bucket (hash: tokens, ts_us), hash-tagged per resource: gw:{rl:<resource>}:bucket
-- ARGV: 1 replenish rate (tokens per second), 2 burst capacity, 3 tokens one request needs,
--       4 tokens wanted (>= ARGV[3]), 5 unused tokens of the replica's previous lease, given back
-- Returns {tokens granted (0: refused), tokens left (floored), ms until ARGV[3] would fit}.
-- Time is Redis' own clock, so replicas with skewed clocks still share one bucket. Given-back
-- tokens never lift the bucket above its capacity, so leasing never admits more than one exact
-- bucket would: it only moves when a token is spent, by at most the lease's length.
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local needed = tonumber(ARGV[3])
local wanted = math.max(needed, tonumber(ARGV[4]))
local returned = math.max(0, tonumber(ARGV[5]))
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
tokens = math.min(capacity, tokens + elapsed * rate / 1000000 + returned)
local granted = 0
local wait_ms = 0
if tokens >= needed then
  granted = math.min(wanted, math.floor(tokens))
  tokens = tokens - granted
else
  wait_ms = math.ceil((needed - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts_us', tostring(now))
-- A bucket left alone refills completely in capacity / rate seconds; after twice that it is
-- the same as no bucket, so it may expire.
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 2000 / rate) + 1000)
return {granted, math.floor(tokens), wait_ms}
