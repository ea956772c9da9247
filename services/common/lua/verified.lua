-- Whether an activity's counters were built by this Redis process (see reserve.lua).
-- KEYS: 1 meta
-- Returns 1 verified, 0 unverified (to be rebuilt), -4 not warmed up.
local epoch = redis.call('HMGET', KEYS[1], 'start_ms', 'epoch')
if not epoch[1] then
  return -4
end
if epoch[2] == tostring(redis.call('LASTSAVE')) then
  return 1
end
return 0
