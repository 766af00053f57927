-- Put a call's timer back in step with the call after a claim found nothing to do:
-- scheduled at its deadline while the call has one and has not ended (as commit.lua
-- keeps it), gone otherwise.
--
-- KEYS: call, due
-- ARGV: 1 the call's timer member
local record = redis.call('HMGET', KEYS[1], 'state', 'deadline')
local deadline = tonumber(record[2] or '0')
if record[1] and record[1] ~= 'ended' and deadline > 0 then
  redis.call('ZADD', KEYS[2], deadline, ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
