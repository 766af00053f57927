-- Drop index entries of calls whose record has expired (a call nobody ended, or an ended
-- call past its retention), unless the entry moved meanwhile. A node index left empty
-- leaves its shard's set of nodes, as a commit that empties it does.
-- KEYS: the index, the record hash of each candidate, then for a node index the shard's
--       set of nodes (one hash slot)
-- ARGV: member, score, member, score, ... (as read, in KEYS order), then for a node index
--       its node
-- Returns the number of entries removed.
local removed = 0
for n = 1, math.floor(#ARGV / 2) do
  local member, score = ARGV[2 * n - 1], ARGV[2 * n]
  local now_score = redis.call('ZSCORE', KEYS[1], member)
  if now_score and tonumber(now_score) == tonumber(score) and redis.call('EXISTS', KEYS[n + 1]) == 0 then
    redis.call('ZREM', KEYS[1], member)
    removed = removed + 1
  end
end
if #ARGV % 2 == 1 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[#KEYS], ARGV[#ARGV])
end
return removed
