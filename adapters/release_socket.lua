-- Let go of a call's socket: delete its :socket key if it still names this instance
-- (the channel may have moved the call to another instance's socket meanwhile).
-- KEYS: the call's socket key
-- ARGV: 1 this instance's name
-- Returns 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
