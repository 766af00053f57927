-- Put a call's watchdog back in step with the call after a claim found nothing to do:
-- scheduled at its deadline while transferring, gone otherwise.
--
-- KEYS: call, due
-- ARGV: 1 watchdog member
local record = redis.call('HMGET', KEYS[1], 'state', 'deadline')
if record[1] == 'transferring' and tonumber(record[2] or '0') > 0 then
  redis.call('ZADD', KEYS[2], tonumber(record[2]), ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
