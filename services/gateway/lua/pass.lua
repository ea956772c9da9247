-- Spend a purchase pass once, or give it back. Keys share the activity's hash tag.
-- KEYS: 1 the pass' used marker, 2 passes (the room's admitted users by deadline), 3 spent
-- ARGV: 1 op (redeem | restore), 2 user, 3 from a waiting room (1) or not (0), 4 expiry ms
-- redeem returns 1 spent now, -1 spent before, -2 lapsed (a room pass whose admission is gone)
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
  return -1
end
if room then
  local deadline = redis.call('ZSCORE', KEYS[2], user)
  if not deadline or tonumber(deadline) <= now then
    if redis.call('SISMEMBER', KEYS[3], user) == 1 then
      return -1
    end
    return -2
  end
  redis.call('ZREM', KEYS[2], user)
  redis.call('SADD', KEYS[3], user)
end
redis.call('SET', KEYS[1], '1', 'PX', math.max(expiry - now, 1000))
return 1
