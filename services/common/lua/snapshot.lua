-- One consistent view of an activity's counters.
-- KEYS: 1 meta, 2 stock, 3 resv
-- Returns {warmed (0/1), stock, total, pending reservations, pending quantity, now_ms}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0, 0, 0, now}
end
local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local records = redis.call('HVALS', KEYS[3])
local qty = 0
for _, rec in ipairs(records) do
  qty = qty + tonumber(string.match(rec, '^%u|[^|]+|(%d+)|'))
end
return {1, stock, total, #records, qty, now}
