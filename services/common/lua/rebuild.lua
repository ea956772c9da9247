-- Rebuild an activity's counters from MySQL, the book of record, after this Redis process may
-- have lost writes (its epoch differs from the one the counters carry). The caller has made sure
-- that every order published before is in MySQL and has settled the reservations found there.
-- KEYS: 1 meta, 2 stock, 3 users, 4 resv
-- ARGV: 1 MySQL stock, 2.. buyers in MySQL
-- Returns {1, stock} rebuilt, {0, stock} already verified by this process, {-4, 0} unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-4, 0}
end
local epoch = tostring(redis.call('LASTSAVE'))
if redis.call('HGET', KEYS[1], 'epoch') == epoch then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
-- Reservations still pending are not in MySQL yet, so their stock is still taken.
local held = 0
for _, rec in ipairs(redis.call('HVALS', KEYS[4])) do
  held = held + tonumber(string.match(rec, '^%u|[^|]+|(%d+)|'))
end
local stock = tonumber(ARGV[1]) - held
redis.call('SET', KEYS[2], stock)
for i = 2, #ARGV do
  redis.call('SADD', KEYS[3], ARGV[i])
end
redis.call('HSET', KEYS[1], 'epoch', epoch)
return {1, stock}
