-- Commit one turn of one call, atomically: compare-and-set on the version,
-- de-duplicate on the activity id, write the record, transcript and history, keep the
-- call's watchdog in its shard's due schedule, and park replies that must be
-- delivered in the outbox until the sender acknowledges them.
--
-- KEYS: call, transcript, history (a list), seen, outbox, due,
--       the shard's index of the loaded state, the shard's index of the new state,
--       the shard's feed, its minute and hour transfer-counter buckets  (one hash slot)
-- ARGV: 1 expected_version, 2 dedupe_key (the activity id), 3 token, 4 ttl_seconds,
--       5 transcript_max, 6 history_max, 7 seen_max,
--       8 watchdog_ms (> 0 arms the deadline), 9 watchdog member of due,
--       10 outbox payload ('' = none; stored as '<now ms>:<payload>'), 11 outbox member of due,
--       12 outbox grace ms,
--       13 n_fields, field, value, ... , n_lines, line, ... ,
--       n_steps, trigger, source, dest, reason, history entry without its time, ...,
--       n_counters, '<outcome>:<target>', ..., feed max length,
--       minute bucket, minute hash ttl, hour bucket, hour hash ttl,
--       the feed's retention in seconds, a live call's maximum lifetime in seconds (0: none),
--       last: the state the turn was computed from (compared with the version)
-- Returns {1, version, deadline, since}  applied
--         {2, version, deadline, since}  already applied by this same token (a retried command)
--         {0, 0, 0, 0}                   duplicate: the activity was applied by another commit
--         {-1, version, 0, 0, record, transcript}
--                 conflict: the call is at another version; it is handed back as it stands
--                 (HGETALL and LRANGE), so the rerun needs no separate load
local call, transcript, history, seen, outbox, due = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local was_index, is_index, feed = KEYS[7], KEYS[8], KEYS[9]
local key = ARGV[2]
-- seen holds '<version>:<token>': the token recognises this commit's own retried command,
-- the version dates the entry so the oldest can be dropped.
local mark = (tonumber(ARGV[1]) + 1) .. ':' .. ARGV[3]

local prior = redis.call('HGET', seen, key)
if prior then
  if prior == mark then
    local record = redis.call('HMGET', call, 'version', 'deadline', 'since')
    return {2, tonumber(record[1] or '0'), tonumber(record[2] or '0'), tonumber(record[3] or '0')}
  end
  return {0, 0, 0, 0}
end

-- The version is the compare-and-set token; the state is compared too, so a record edited
-- by hand (a state changed without the version) is not overwritten from a cached copy.
local record = redis.call('HMGET', call, 'version', 'state', 'since', 'created')
local version = tonumber(record[1] or '0')
local old_state = record[2]
if version ~= tonumber(ARGV[1]) or (old_state or 'bot') ~= ARGV[#ARGV] then
  return {-1, version, 0, 0, redis.call('HGETALL', call), redis.call('LRANGE', transcript, 0, -1)}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
version = version + 1
local state = old_state
local since = 0
local conversation, target = '', ''
local fields = {'version', version, 'updated', now}
if version == 1 then
  fields[#fields + 1] = 'created'
  fields[#fields + 1] = now
end

local i = 14
for _ = 1, tonumber(ARGV[13]) do
  local name, value = ARGV[i], ARGV[i + 1]
  fields[#fields + 1] = name
  fields[#fields + 1] = value
  if name == 'id' then
    conversation = value
  elseif name == 'target' then
    target = value
  elseif name == 'state' then
    state = value
    if value ~= old_state then
      fields[#fields + 1] = 'since'
      fields[#fields + 1] = now
      since = now
    end
  end
  i = i + 2
end

local deadline = 0
if tonumber(ARGV[8]) > 0 then
  deadline = now + tonumber(ARGV[8])
  fields[#fields + 1] = 'deadline'
  fields[#fields + 1] = deadline
end
redis.call('HSET', call, unpack(fields))

-- The shard's per-state index (conversation id -> since) follows the call.
if state ~= old_state then
  if old_state then
    redis.call('ZREM', was_index, conversation)
  end
  redis.call('ZADD', is_index, now, conversation)
  if state == 'ended' then  -- ended calls expire after the retention: so do their entries
    redis.call('ZREMRANGEBYSCORE', is_index, '-inf', now - tonumber(ARGV[4]) * 1000)
  end
end

-- A watchdog is scheduled exactly while the call is transferring.
if state == 'transferring' then
  if deadline == 0 then
    deadline = tonumber(redis.call('HGET', call, 'deadline') or '0')
  end
  redis.call('ZADD', due, deadline, ARGV[9])
else
  redis.call('ZREM', due, ARGV[9])
end

if ARGV[10] ~= '' then
  redis.call('HSET', outbox, key, now .. ':' .. ARGV[10])  -- parked at (ms):payload
  redis.call('ZADD', due, now + tonumber(ARGV[12]), ARGV[11])
end

local n_lines = tonumber(ARGV[i])
i = i + 1
if n_lines > 0 then
  redis.call('RPUSH', transcript, unpack(ARGV, i, i + n_lines - 1))
  redis.call('LTRIM', transcript, -tonumber(ARGV[5]), -1)
  i = i + n_lines
end

local n_steps = tonumber(ARGV[i])
i = i + 1
local steps_at = i
i = i + 5 * n_steps
local n_counters = tonumber(ARGV[i])
local counters_at = i + 1
i = counters_at + n_counters
local feed_max, buckets_at = ARGV[i], i + 1

-- The call's own history (the entry's time spliced in first), and the shard's feed of
-- every call's steps (for watchers).
i = steps_at
local entries = {}
for _ = 1, n_steps do
  entries[#entries + 1] = '[' .. now .. ',' .. string.sub(ARGV[i + 4], 2)
  redis.call('XADD', feed, 'MAXLEN', '~', feed_max, '*', 'call', conversation,
    'trigger', ARGV[i], 'from', ARGV[i + 1], 'to', ARGV[i + 2], 'reason', ARGV[i + 3],
    'target', target)
  i = i + 5
end
if n_steps > 0 then
  redis.call('RPUSH', history, unpack(entries))
  redis.call('LTRIM', history, -tonumber(ARGV[6]), -1)
  -- The feed is shared by the shard's calls, so it has no call's TTL: its entries go once
  -- older than any call is kept, and the whole stream when the shard has been quiet as long.
  local feed_keep = tonumber(ARGV[#ARGV - 2])
  redis.call('XTRIM', feed, 'MINID', now - feed_keep * 1000)
  redis.call('EXPIRE', feed, feed_keep)
end

-- Transfer counters (started, accepted, failed, timeout per target), per minute and hour.
if n_counters > 0 then
  for k = 0, 1 do
    local bucket, ttl = ARGV[buckets_at + 2 * k], ARGV[buckets_at + 2 * k + 1]
    for c = counters_at, counters_at + n_counters - 1 do
      redis.call('HINCRBY', KEYS[10 + k], bucket .. ':' .. ARGV[c], 1)
    end
    redis.call('EXPIRE', KEYS[10 + k], ttl)
  end
end

redis.call('HSET', seen, key, mark)
-- The channel redelivers within seconds, so only recent activities need remembering: past
-- seen_max + a quarter entries, those older than the last seen_max versions go (in one
-- sweep, now and then, not every turn). Undated entries (written before versions were
-- stored) stay until the call expires.
local seen_max = tonumber(ARGV[7])
if redis.call('HLEN', seen) > seen_max + math.floor(seen_max / 4) then
  local all, old = redis.call('HGETALL', seen), {}
  for j = 1, #all, 2 do
    local at = tonumber(string.match(all[j + 1], '^(%d+):'))
    if at and at <= version - seen_max then
      old[#old + 1] = all[j]
    end
  end
  if #old > 0 then
    redis.call('HDEL', seen, unpack(old))
  end
end
-- A live call's TTL is its idle time, but never past its maximum lifetime: a call that
-- never ends, however busy, still expires. An ended call is kept for the retention.
local ttl = tonumber(ARGV[4])
local lifetime = tonumber(ARGV[#ARGV - 1])
if state ~= 'ended' and lifetime > 0 then
  local created = now
  if record[4] then
    created = tonumber(record[4])
  end
  local left = math.ceil((created + lifetime * 1000 - now) / 1000)
  if left < ttl then
    ttl = math.max(left, 1)
  end
end
for _, k in ipairs({call, seen, transcript, history, outbox}) do
  redis.call('EXPIRE', k, ttl)
end
if since == 0 then  -- the state did not change: nor did its since
  since = tonumber(record[3] or '0')
end
return {1, version, deadline, since}
