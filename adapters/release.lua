-- Hand a claimed member back (on shutdown): make it due now, but only if it is still
-- under the lease this instance took. A member done meanwhile, or re-claimed by another
-- instance after the lease lapsed, is left alone.
--
-- KEYS: due
-- ARGV: 1 member, 2 the lease's expiry (ms) as claim.lua set it
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
  return 1
end
return 0
