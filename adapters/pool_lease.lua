-- A number pool's leases, atomically: one number holds one call at a time, on every
-- instance. A lease is live while its 'until' is after now (Redis TIME, this node's
-- clock); a lapsed one is free, and its entry goes when the number is leased again.
--
-- KEYS (adapters/keys.py PoolKeys, one hash slot): leases, holders, free_at, then the
-- context key of each number the operation names, in the same order (lease: all of them)
local leases, holders, free_at = KEYS[1], KEYS[2], KEYS[3]
-- ARGV[1] is the operation; the rest are its arguments:
--   lease   call, key, ms, context,   the holder's live lease, else the configured number
--           previous, number...       free longest (never leased first, then in order)
--                                     for ms, its context stored to lapse with it; the
--                                     call's lease under key 'previous' (its last attempt,
--                                     "" for none) is released first, if it still holds it
--                                     (a retry right after a failure, before that failure's
--                                     release has landed, must not hold two); returns
--                                     {number, lease JSON, 1 if a lapsed lease of another
--                                     call was reclaimed else 0}, or false when every
--                                     number is held (the pool is exhausted)
--   release call, key, number         ends the holder's lease on number; returns when it
--                                     ended (now, or its 'until' if it had lapsed), or
--                                     false when the holder holds none there
--   settle  call, key, number, ms     the holder's live lease ends within ms from now (a
--                                     connected transfer's grace), marked 'settled' so
--                                     its end is no lapse; returns its 'until', or false
--                                     when the holder holds none there
--   claim   number, grace_ms          the live lease on number, its 'claimed' set to now
--                                     at the first claim (and its 'until' brought to
--                                     within grace_ms of it when grace_ms > 0); returns
--                                     {its JSON, its context, 1 if this claim was the
--                                     first else 0}, or false for a free or lapsed number
--   status  number...                 returns {free, leased, claimed, lapsed} counts: a
--                                     lease that ended settled or claimed counts free
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local op = ARGV[1]

local function holder_of(lease)
  return cjson.encode({lease.call, lease.lease})
end

-- Remove number's lease (and its context) and mark the number free from 'at'; the
-- holder's entry goes with it only if it still points here.
local function drop(number, lease, at, context)
  redis.call('HDEL', leases, number)
  if context then  -- absent for a number no longer configured
    redis.call('DEL', context)
  end
  local holder = holder_of(lease)
  if redis.call('HGET', holders, holder) == number then
    redis.call('HDEL', holders, holder)
  end
  redis.call('ZADD', free_at, at, number)
end

-- A lease that ended as it should (its transfer connected, or the agent side claimed it)
-- is no lapse: only one nobody gave back is.
local function given_back(lease)
  return lease.claimed > 0 or lease.settled ~= nil
end

local function read(number)
  local raw = redis.call('HGET', leases, number)
  return raw and cjson.decode(raw), raw
end

if op == 'lease' then
  local call, key, ms, context, previous = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local first = 7  -- ARGV[first + i] is the number whose context key is KEYS[4 + i]
  local contexts = {}
  for i = first, #ARGV do
    contexts[ARGV[i]] = KEYS[4 + i - first]
  end
  if previous ~= '' and previous ~= key then
    local before = redis.call('HGET', holders, cjson.encode({call, previous}))
    local lease = before and read(before)
    if lease and lease.call == call and lease.lease == previous then
      drop(before, lease, math.min(now, lease['until']), contexts[before])
    end
  end
  local holder = cjson.encode({call, key})
  local held = redis.call('HGET', holders, holder)
  if held then
    local lease, raw = read(held)
    local ours = lease and lease.call == call and lease.lease == key
    if ours and lease['until'] > now then
      -- The same call and key again (a rerun turn): the number it holds, for ms from now
      -- (its commit, and so its watchdog, comes later than the first run's) unless the
      -- transfer connected or was claimed: their grace stands.
      if not given_back(lease) and now + ms > lease['until'] then
        lease['until'] = now + ms
        raw = cjson.encode(lease)
        redis.call('HSET', leases, held, raw)
        redis.call('ZADD', free_at, lease['until'], held)
      end
      if context ~= '' and contexts[held] then
        redis.call('SET', contexts[held], context, 'PX', lease['until'] - now)
      end
      return {held, raw, 0}
    end
    if ours then
      drop(held, lease, lease['until'], contexts[held])  -- lapsed: leased afresh below
    else
      redis.call('HDEL', holders, holder)
    end
  end
  local best, best_at
  for i = first, #ARGV do
    local at = tonumber(redis.call('ZSCORE', free_at, ARGV[i]) or '-1')
    if at <= now and (best == nil or at < best_at) then
      best, best_at = ARGV[i], at
    end
  end
  if not best then
    return false
  end
  local lapsed = read(best)
  local reclaimed = 0
  if lapsed then
    drop(best, lapsed, lapsed['until'], contexts[best])
    if lapsed.call ~= call and not given_back(lapsed) then
      reclaimed = 1
    end
  end
  local raw = cjson.encode({call = call, lease = key, since = now, ['until'] = now + ms, claimed = 0})
  redis.call('HSET', leases, best, raw)
  redis.call('HSET', holders, holder, best)
  redis.call('ZADD', free_at, now + ms, best)
  if context ~= '' then
    redis.call('SET', contexts[best], context, 'PX', ms)
  end
  return {best, raw, reclaimed}
end

-- The holder's live lease on ARGV[4], or nil.
local function held_by_caller()
  local lease = read(ARGV[4])
  if not lease or lease.call ~= ARGV[2] or lease.lease ~= ARGV[3] then
    return nil
  end
  return lease
end

if op == 'release' then
  local lease = held_by_caller()
  if not lease then
    return false
  end
  local ended = math.min(now, lease['until'])
  drop(ARGV[4], lease, ended, KEYS[4])
  return ended
end

if op == 'settle' then
  local lease, number = held_by_caller(), ARGV[4]
  if not lease or lease['until'] <= now then
    return false
  end
  local ends = math.min(now + tonumber(ARGV[5]), lease['until'])
  lease.settled, lease['until'] = now, ends
  redis.call('HSET', leases, number, cjson.encode(lease))
  redis.call('ZADD', free_at, ends, number)
  redis.call('PEXPIREAT', KEYS[4], ends)
  return ends
end

if op == 'claim' then
  local number, grace = ARGV[2], tonumber(ARGV[3])
  local lease, raw = read(number)
  if not lease or lease['until'] <= now then
    return false
  end
  local first = 0
  if lease.claimed == 0 then
    first = 1
    lease.claimed = now
    if grace > 0 and now + grace < lease['until'] then
      lease['until'] = now + grace
      redis.call('ZADD', free_at, lease['until'], number)
      redis.call('PEXPIREAT', KEYS[4], lease['until'])
    end
    raw = cjson.encode(lease)
    redis.call('HSET', leases, number, raw)
  end
  return {raw, redis.call('GET', KEYS[4]) or '', first}
end

if op == 'status' then
  local free, leased, claimed, lapsed = 0, 0, 0, 0
  for i = 2, #ARGV do
    local lease = read(ARGV[i])
    if not lease or (lease['until'] <= now and given_back(lease)) then
      free = free + 1
    elseif lease['until'] <= now then
      lapsed = lapsed + 1
    elseif lease.claimed > 0 then
      claimed = claimed + 1
    else
      leased = leased + 1
    end
  end
  return {free, leased, claimed, lapsed}
end

return redis.error_reply('pool_lease.lua: unknown operation ' .. tostring(op))
