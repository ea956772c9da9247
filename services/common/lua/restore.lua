-- Put the stock of cancelled or expired orders back on sale and let their buyers buy again, once
-- per order number however often it is retried: the `returned` set remembers every order whose
-- stock came back (the warm-up and the rebuild add the returns MySQL already counts).
-- KEYS: 1 meta, 2 stock, 3 users, 4 returned
-- ARGV: triples of order number, user, quantity
-- Returns {-4} not warmed up (a warm-up reads MySQL's stock, which has them), {-5} unverified
-- (the rebuild will count them), else one code per order: 1 returned now, 0 already returned.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {-4}
end
if epoch ~= tostring(redis.call('LASTSAVE')) then
  return {-5}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #ARGV, 3 do
  if redis.call('ZSCORE', KEYS[4], ARGV[i]) then
    out[#out + 1] = 0
  else
    redis.call('INCRBY', KEYS[2], ARGV[i + 2])
    redis.call('SREM', KEYS[3], ARGV[i + 1])
    redis.call('ZADD', KEYS[4], now, ARGV[i])
    out[#out + 1] = 1
  end
end
return out
