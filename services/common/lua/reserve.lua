-- Reserve stock for a lot of buyers of one activity, atomically, in the order given. All keys
-- share the activity's hash tag. Prepended with bulk.lua.
-- KEYS: 1 meta, 2 stock, 3 users, 4 resv, 5 resv:ts
-- ARGV: user id, quantity, order number, for each order of the lot (3 per order)
-- Returns {code, value} for each order, flattened ({code 1, value 1, code 2, value 2, ...}):
--   { 1, stock left}  reserved        { 0, stock left}  not enough stock
--   {-1, 0} user already bought       {-2, start_ms}    sale not started
--   {-3, 0} sale ended                {-4, 0}           activity not warmed up (unknown)
--   {-5, 0} unverified: these counters were not built by this Redis process (it restarted or a
--           replica took over, and may have lost its last writes) and must be rebuilt first
local n = #ARGV / 3
local answers = {}
local function every(code, value)
  for i = 1, n do
    answers[2 * i - 1] = code
    answers[2 * i] = value
  end
  return answers
end

local window = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms', 'epoch')
if not window[1] then
  return every(-4, 0)
end
-- LASTSAVE is this process's start time until its first RDB save: a restarted or promoted Redis
-- answers a value other than the one stamped by the warm-up or the last rebuild.
if window[3] ~= tostring(redis.call('LASTSAVE')) then
  return every(-5, 0)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts = tonumber(window[1])
if now < starts then
  return every(-2, starts)
end
local ends = tonumber(window[2])
if ends >= 0 and now >= ends then
  return every(-3, 0)
end

-- The lot's reservations are decided first and written after, one command per key: `taken`
-- users (also the ones that bought earlier in this lot), their records and their timestamps.
local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
local sold = 0
local taken, buyers, records, stamps = {}, {}, {}, {}
for i = 1, n do
  local user, quantity, order = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local qty = tonumber(quantity)
  local code = 1
  if taken[user] or redis.call('SISMEMBER', KEYS[3], user) == 1 then
    code = -1
  elseif stock < qty then
    code = 0
  else
    stock = stock - qty
    sold = sold + qty
    taken[user] = true
    buyers[#buyers + 1] = user
    records[#records + 1] = order
    records[#records + 1] = 'R|' .. user .. '|' .. quantity .. '|' .. now
    stamps[#stamps + 1] = now
    stamps[#stamps + 1] = order
  end
  answers[2 * i - 1] = code
  answers[2 * i] = (code == -1) and 0 or stock
end
if sold > 0 then
  redis.call('DECRBY', KEYS[2], sold)
  bulk('SADD', KEYS[3], buyers)
  bulk('HSET', KEYS[4], records)
  bulk('ZADD', KEYS[5], stamps)
end
return answers
