-- The waiting room of one activity: join, poll or look, after advancing the queue. All keys
-- share the activity's hash tag (docs/waiting-room.md).
-- KEYS: 1 meta, 2 stock, 3 queue, 4 state, 5 passes, 6 spent, 7 handed
-- ARGV: 1 op (join | status | info), 2 user, 3 rate (admissions/s), 4 burst, 5 pass ttl ms,
--       6 draw (a random score below 2^41, used by a join before the opening)
-- Returns {state, position, opens_ms, deadline_ms, waiting, admitted_by_this_call, first}:
--   state  1 admitted (deadline: the pass')  0 waiting (position 1-based, -1 before the opening)
--         -1 sold out (the admitted can take all that is left)    -2 sale ended
--         -3 unknown activity    -5 waiting, admission paused
--         -6 admitted and the pass spent    -7 admitted and the pass lapsed
-- info: {ends_ms, now_ms, stock, waiting, outstanding, mode (0 open, 1 paused, 2 queue-all), opens_ms}
local OPEN_BASE = 2199023255552 -- 2^41: after the opening, scores are this plus a sequence
local meta = redis.call('HMGET', KEYS[1], 'start_ms', 'end_ms')
if not meta[1] then
  return {-3, 0, 0, 0, 0, 0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts, ends = tonumber(meta[1]), tonumber(meta[2])
local ended = ends >= 0 and now >= ends
local op, user = ARGV[1], ARGV[2]
local rate, burst, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

local st = redis.call('HMGET', KEYS[4], 'tokens', 'ts', 'cursor', 'mode', 'w', 'seq')
local mode = st[4] or 'open'
if mode == 'queue-all' then
  burst = 0
end
-- A fresh room opens with a full bucket: `burst` buyers at once.
local tokens = tonumber(st[1] or tostring(burst))
local ts = tonumber(st[2] or '0')
local cursor = tonumber(st[3] or '0')
-- Buyers waiting after the last call: every join advances the queue first, so between two
-- calls nobody else waited, and the bucket cannot have earned more than they could take.
local waited = tonumber(st[5] or '0')
local seq = tonumber(st[6] or '0')

-- Joins `user` unless it has a place. Returns whether it joined now, and whether its place is
-- then known to be the last (after the opening, scores only grow). The sequence drawn is
-- written with the room's state below, and only by a buyer who joined.
local function join()
  if op ~= 'join' or ended then
    return false, false
  end
  if now < starts then
    return redis.call('ZADD', KEYS[3], 'NX', tonumber(ARGV[6]), user) == 1, false
  end
  local added = redis.call('ZADD', KEYS[3], 'NX', OPEN_BASE + seq + 1, user) == 1
  if added then
    seq = seq + 1
  end
  return added, added
end

-- Advance: the bucket earns `rate` admissions a second from the opening; the cursor moves over
-- as many waiting buyers as it holds, while the unexpired, unspent passes stay below the stock.
local total, stock, outstanding
local admitted = 0
local advanced = false
local function advance()
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  total = redis.call('ZCARD', KEYS[3])
  stock = tonumber(redis.call('GET', KEYS[2]) or '0')
  outstanding = redis.call('ZCARD', KEYS[5])
  if now < starts or ended or rate <= 0 then
    return
  end
  -- What the bucket earned since it was last advanced. Those who waited then take it as it
  -- comes; beyond them it fills to the burst only.
  local earned = tokens
  if mode ~= 'paused' then
    earned = math.min(tokens + rate * (now - math.max(ts, starts)) / 1000,
      math.max(burst, 1) + waited)
  end
  local n = math.min(math.floor(earned), total - cursor, math.max(stock - outstanding, 0))
  if mode == 'paused' or n < 0 then
    n = 0
  end
  if n > 0 then
    local members = redis.call('ZRANGE', KEYS[3], cursor, cursor + n - 1)
    for _, m in ipairs(members) do
      redis.call('ZADD', KEYS[5], now + ttl, m)
    end
    cursor = cursor + n
    outstanding = outstanding + n
    admitted = admitted + n
  end
  tokens = math.min(earned - n, math.max(burst, 1))
  ts = now
  advanced = true
end

-- With a burst, a quiet room admits the buyer who joins at once; without (or in queue-all),
-- the room advances first, so every buyer waits at least one poll.
local joined, last
if burst > 0 then
  joined, last = join()
  advance()
else
  advance()
  joined, last = join()
  if joined then
    total = total + 1
  end
end
local waiting = total - cursor
-- The bucket, the cursor, the sequence and `w`, in one write.
local state = {}
if advanced then
  state = {'tokens', tostring(tokens), 'ts', now, 'cursor', cursor}
end
if last then
  state[#state + 1] = 'seq'
  state[#state + 1] = seq
end
if rate > 0 then
  -- Buyers the stock holds back cannot take what the bucket earns meanwhile: while nothing is
  -- left to admit, they do not let it fill, or stock that comes back after a quiet spell would
  -- be admitted all at once.
  local takers = waiting
  if stock - outstanding <= 0 then
    takers = 0
  end
  state[#state + 1] = 'w'
  state[#state + 1] = takers
end
if #state > 0 then
  redis.call('HSET', KEYS[4], unpack(state))
end

if op == 'info' then
  local m = 0
  if mode == 'paused' then m = 1 elseif mode == 'queue-all' then m = 2 end
  return {ends, now, stock, waiting, outstanding, m, starts}
end

local rank
if last then
  rank = total - 1
else
  rank = redis.call('ZRANK', KEYS[3], user)
end
if not rank then
  if ended then
    return {-2, 0, starts, 0, waiting, admitted, 0}
  end
  -- A buyer told it was sold out left the queue; while it stays so, that is still the answer.
  if stock - outstanding <= 0 then
    return {-1, 0, starts, 0, waiting, admitted, 0}
  end
  -- A status poll (a join always has a place here): its ticket says it joined, so it left when
  -- told sold out (or the queue was lost). Stock is back: it queues again at the end, as a
  -- newcomer would.
  op = 'join'
  join()
  rank = redis.call('ZRANK', KEYS[3], user)
  waiting = waiting + 1
  redis.call('HSET', KEYS[4], 'w', waiting)
end
-- A buyer who joined after the room advanced was not admitted by it.
local deadline = false
if not (last and burst == 0) then
  deadline = redis.call('ZSCORE', KEYS[5], user)
end
if deadline then
  return {1, 0, starts, tonumber(deadline), waiting, admitted, redis.call('SADD', KEYS[7], user)}
end
if rank < cursor then
  if redis.call('SISMEMBER', KEYS[6], user) == 1 then
    return {-6, 0, starts, 0, waiting, admitted, 0}
  end
  if op == 'join' and not ended then
    -- A lapsed admission: the buyer joins again, at the end.
    redis.call('ZADD', KEYS[3], OPEN_BASE + redis.call('HINCRBY', KEYS[4], 'seq', 1), user)
    redis.call('SREM', KEYS[7], user)
    return {0, total - cursor, starts, 0, waiting, admitted, 0}
  end
  return {-7, 0, starts, 0, waiting, admitted, 0}
end
if ended then
  return {-2, 0, starts, 0, waiting, admitted, 0}
end
if stock - outstanding <= 0 then
  -- Told it is sold out, the buyer leaves the queue (behind the cursor, so no admitted place
  -- moves): if stock comes back, admission goes to those still there, not to those gone.
  redis.call('ZREM', KEYS[3], user)
  redis.call('HSET', KEYS[4], 'w', waiting - 1)
  return {-1, 0, starts, 0, waiting - 1, admitted, 0}
end
local position = -1
if now >= starts then
  position = rank - cursor + 1
end
if mode == 'paused' then
  return {-5, position, starts, 0, waiting, admitted, 0}
end
return {0, position, starts, 0, waiting, admitted, 0}
