-- Rebuild an activity's counters from MySQL, the book of record, after this Redis process may
-- have lost writes (its epoch differs from the one the counters carry). The caller has made sure
-- that every order published before is in MySQL and has settled the reservations found there.
-- KEYS: 1 meta, 2 stock, 3 users, 4 resv, 5 returned
-- ARGV: 1 MySQL stock, 2 n, 3..(2+n) buyers with a live order in MySQL, then the orders whose
--       stock MySQL has taken back but whose return to Redis is not recorded (read with the
--       stock in one snapshot): the stock counts them, so a later restore must not.
-- Returns {1, stock} rebuilt, {0, stock} already verified by this process, {-4, 0} unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-4, 0}
end
local epoch = tostring(redis.call('LASTSAVE'))
if redis.call('HGET', KEYS[1], 'epoch') == epoch then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
-- The buyers' set is rebuilt whole: live orders in MySQL, and reservations still pending (not in
-- MySQL yet, so their stock is still taken too). A buyer whose order was given back may buy again.
redis.call('DEL', KEYS[3])
local held = 0
for _, rec in ipairs(redis.call('HVALS', KEYS[4])) do
  local user, qty = string.match(rec, '^%u|([^|]+)|(%d+)|')
  held = held + tonumber(qty)
  redis.call('SADD', KEYS[3], user)
end
local stock = tonumber(ARGV[1]) - held
redis.call('SET', KEYS[2], stock)
local buyers = tonumber(ARGV[2])
for i = 3, 2 + buyers do
  redis.call('SADD', KEYS[3], ARGV[i])
end
local t = redis.call('TIME')
for i = 3 + buyers, #ARGV do
  redis.call('ZADD', KEYS[5], tonumber(t[1]) * 1000, ARGV[i])
end
redis.call('HSET', KEYS[1], 'epoch', epoch)
return {1, stock}
