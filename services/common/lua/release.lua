-- Give a reservation's stock back and forget the buyer, if the reservation is in one of the
-- allowed states. Leaves a tombstone so that a late order message for it is skipped.
-- KEYS: 1 stock, 2 users, 3 resv, 4 resv:ts, 5 released
-- ARGV: 1 order number, 2 allowed states (e.g. "R")
-- Returns 1 released, 0 no such reservation, -1 reservation in another state.
local rec = redis.call('HGET', KEYS[3], ARGV[1])
if not rec then
  return 0
end
local state, user, qty = string.match(rec, '^(%u)|([^|]+)|(%d+)|')
if not string.find(ARGV[2], state, 1, true) then
  return -1
end
local t = redis.call('TIME')
redis.call('INCRBY', KEYS[1], qty)
redis.call('SREM', KEYS[2], user)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], tonumber(t[1]) * 1000, ARGV[1])
return 1
