-- Drop state-index entries of calls whose record has expired (a call nobody ended, or
-- an ended call past its retention), unless the entry moved meanwhile.
-- KEYS: the index, then the record hash of each candidate (one hash slot)
-- ARGV: member, score, member, score, ... (as read, in KEYS order)
-- Returns the number of entries removed.
local removed = 0
for n = 2, #KEYS do
  local member, score = ARGV[2 * n - 3], ARGV[2 * n - 2]
  local now_score = redis.call('ZSCORE', KEYS[1], member)
  if now_score and tonumber(now_score) == tonumber(score) and redis.call('EXISTS', KEYS[n]) == 0 then
    redis.call('ZREM', KEYS[1], member)
    removed = removed + 1
  end
end
return removed
