-- Claim a shard's due work: every member due by now (Redis time) is leased to the
-- caller by pushing its time to now + lease. A claimer that dies simply lets the lease
-- lapse, and the member is due again for whoever polls next.
--
-- KEYS: due
-- ARGV: 1 limit, 2 lease_ms
-- Returns {now_ms, member, ...}
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local leased = now + tonumber(ARGV[2])
for _, member in ipairs(members) do
  redis.call('ZADD', KEYS[1], leased, member)
end
table.insert(members, 1, now)
return members
