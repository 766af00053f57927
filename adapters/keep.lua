-- Keep replies whose send failed in a call's outbox, due for a re-send after a delay, for
-- as long as the call's keys live; nothing for a call that has expired. An empty payload
-- only reschedules the entry already kept under the key (by its commit).
-- KEYS: call, outbox, due (one hash slot)
-- ARGV: 1 outbox key, 2 payload ('' = the one kept), 3 its member of due, 4 the delay in ms
-- Returns 1 if kept, 0 if the call or the entry is gone.
local call, outbox, due = KEYS[1], KEYS[2], KEYS[3]
local ttl = redis.call('PTTL', call)
if ttl == -2 then
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if ARGV[2] == '' then
  if redis.call('HEXISTS', outbox, ARGV[1]) == 0 then
    return 0  -- acknowledged meanwhile
  end
else
  redis.call('HSET', outbox, ARGV[1], now .. ':' .. ARGV[2])
  if ttl > 0 then
    redis.call('PEXPIRE', outbox, ttl)
  end
end
redis.call('ZADD', due, now + tonumber(ARGV[4]), ARGV[3])
return 1
