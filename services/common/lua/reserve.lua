-- Reserve stock for one buyer, atomically. All keys share the activity's hash tag.
-- KEYS: 1 meta, 2 stock, 3 users, 4 resv, 5 resv:ts
-- ARGV: 1 user id, 2 quantity, 3 order number
-- Returns {code, value}:
--   { 1, stock left}  reserved        { 0, stock left}  not enough stock
--   {-1, 0} user already bought       {-2, start_ms}    sale not started
--   {-3, 0} sale ended                {-4, 0}           activity not warmed up (unknown)
--   {-5, 0} unverified: these counters were not built by this Redis process (it restarted or a
--           replica took over, and may have lost its last writes) and must be rebuilt first
local window = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'epoch')
if not window[1] then
  return {-4, 0}
end
-- LASTSAVE is this process's start time until its first RDB save: a restarted or promoted Redis
-- answers a value other than the one stamped by the warm-up or the last rebuild.
if window[3] ~= tostring(redis.call('LASTSAVE')) then
  return {-5, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts = tonumber(window[1])
if now < starts then
  return {-2, starts}
end
local ends = tonumber(window[2])
if ends >= 0 and now >= ends then
  return {-3, 0}
end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return {-1, 0}
end
local qty = tonumber(ARGV[2])
local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
if stock < qty then
  return {0, stock}
end
stock = redis.call('DECRBY', KEYS[2], qty)
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[3], 'R|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. now)
redis.call('ZADD', KEYS[5], now, ARGV[3])
return {1, stock}
