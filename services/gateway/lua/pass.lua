-- Spend a purchase pass once, or give it back. Keys share the activity's hash tag.
-- KEYS: 1 the pass' used marker, 2 passes (the room's admitted users by deadline), 3 spent,
--       4 the room's state (the redemption schedule: `next_ms`)
-- ARGV: 1 op (redeem | restore), 2 user, 3 from a waiting room (1) or not (0), 4 expiry ms,
--       5 the room's rate (0: redeem at once), 6 tolerance ms, 7 longest wait ms
-- redeem returns {1, wait ms} spent now, to be forwarded after the wait; {-1} spent before;
--   {-2} lapsed (a room pass whose admission is gone); {-3, wait ms} not spent: the schedule is
--   further ahead than the longest wait
-- restore returns 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local user, room, expiry = ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
if ARGV[1] == 'restore' then
  redis.call('DEL', KEYS[1])
  if room and expiry > now then
    redis.call('ZADD', KEYS[2], expiry, user)
    redis.call('SREM', KEYS[3], user)
  end
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local wait = 0
if room then
  local deadline = redis.call('ZSCORE', KEYS[2], user)
  if not deadline or tonumber(deadline) <= now then
    if redis.call('SISMEMBER', KEYS[3], user) == 1 then
      return {-1}
    end
    return {-2}
  end
  -- Redemptions go to order-service at the room's rate, cluster-wide: each takes the next slot
  -- of a schedule spaced 1/rate apart, and waits for it less the tolerance (a virtual-time
  -- leaky bucket), so a second takes at most rate * (1 + tolerance) orders.
  local rate = tonumber(ARGV[5])
  if rate > 0 then
    local slot = math.max(tonumber(redis.call('HGET', KEYS[4], 'next_ms') or '0'), now)
    wait = math.max(slot - now - tonumber(ARGV[6]), 0)
    if wait > tonumber(ARGV[7]) then
      return {-3, wait}
    end
    redis.call('HSET', KEYS[4], 'next_ms', string.format('%.3f', slot + 1000 / rate))
  end
  redis.call('ZREM', KEYS[2], user)
  redis.call('SADD', KEYS[3], user)
end
redis.call('SET', KEYS[1], '1', 'PX', math.max(expiry - now, 1000))
return {1, math.floor(wait)}
