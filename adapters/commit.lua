-- Commit one turn of one call, atomically: compare-and-set on the version,
-- de-duplicate on the activity id, write the record, transcript and history, keep the
-- call's timer in its shard's due schedule, and keep replies that must arrive in the
-- outbox until the sender acknowledges them.
--
-- KEYS (adapters/store.py COMMIT_KEYS, one hash slot):
local call, transcript, history, seen, outbox, reference, variables, due, was_index, is_index, feed, minute, hour, was_node, is_node, nodes = unpack(KEYS)
-- ARGV[1]: one JSON object; these are all its names (tests/test_store.py checks that
-- adapters/store.py's commit_args builds exactly these):
--   version, loaded_state  what the turn was computed from (compared, then version + 1)
--   loaded_node            the node it was at (was_node is its index)
--   activity               the de-duplication key (the activity id, or '~' .. token)
--   token                  tells this commit's own retried command from another commit
--   ttl                    the keys' TTL in seconds: idle time, or an ended call's retention
--   lifetime               a live call's maximum lifetime in seconds (0: none)
--   transcript_max, history_max, seen_max
--   fields                 record fields to write, {name: value}: a value '' is not stored
--                          (the field is deleted: readers take it as its default); the
--                          reference (only when it changed) and the sealed variables ('':
--                          none) go to their own keys, never into the record, which
--                          stays a compact listpack
--   timer_ms               > 0 arms the call's timer this long after now (else the
--                          deadline in fields stands: 0 means none)
--   timer                  the call's timer member of due
--   outbox                 replies to keep until acknowledged ('' = none), stored as
--                          '<now ms>:<outbox>' under the activity key
--   outbox_due, outbox_grace_ms  their member of due, and when they come due
--   lines                  transcript lines to append
--   steps                  {trigger, from, to, reason, history entry without its time, node}, ...
--   counters               '<outcome>:<queue>:<target>', ...
--   buckets                {{minute bucket, its hash's TTL}, {hour bucket, TTL}}
--   feed_max, feed_seconds the feed's approximate length and retention
-- Returns {1, version, deadline, since}  applied
--         {2, version, deadline, since}  already applied by this same token (a retried command)
--         {0, 0, 0, 0}                   duplicate: the activity was applied by another commit
--         {-1, version, 0, 0, record, transcript, reference, variables}
--                 conflict: the call is at another version; it is handed back as it stands
--                 (HGETALL, LRANGE, GET, GET), so the rerun needs no separate load
local args = cjson.decode(ARGV[1])
local key = args.activity
-- seen holds '<version>:<token>': the token recognises this commit's own retried command,
-- the version dates the entry so the oldest can be dropped.
local mark = (args.version + 1) .. ':' .. args.token

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
local record = redis.call('HMGET', call, 'version', 'state', 'since', 'created', 'reference')
local version = tonumber(record[1] or '0')
local old_state = record[2]
if version ~= args.version or (old_state or 'bot') ~= args.loaded_state then
  return {-1, version, 0, 0, redis.call('HGETALL', call), redis.call('LRANGE', transcript, 0, -1),
    redis.call('GET', reference), redis.call('GET', variables)}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
version = version + 1
local conversation = args.fields.id
local target = args.fields.target or ''
local state = args.fields.state or old_state
local since = 0
local fields = {'version', version, 'updated', now}
if version == 1 then
  fields[#fields + 1] = 'created'
  fields[#fields + 1] = now
end
-- Empty fields are deleted, not stored; so are the reference and variables a record written
-- by an earlier version holds: they live in keys of their own now (the reference moves there
-- below, the variables are written whole every commit).
local empty = {'reference', 'variables'}
for name, value in pairs(args.fields) do
  if name ~= 'reference' and name ~= 'variables' then
    if value == '' then
      empty[#empty + 1] = name
    else
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
  end
end
if state ~= old_state then
  fields[#fields + 1] = 'since'
  fields[#fields + 1] = now
  since = now
end
local deadline = 0
if args.timer_ms > 0 then
  deadline = now + args.timer_ms
  fields[#fields + 1] = 'deadline'
  fields[#fields + 1] = deadline
end
redis.call('HDEL', call, unpack(empty))
redis.call('HSET', call, unpack(fields))
local moved = args.fields.reference or record[5]
if moved and moved ~= '' then
  redis.call('SET', reference, moved)
end

-- The shard's per-state index (conversation id -> since) follows the call.
if state ~= old_state then
  if old_state then
    redis.call('ZREM', was_index, conversation)
  end
  redis.call('ZADD', is_index, now, conversation)
  if state == 'ended' then  -- ended calls expire after the retention: so do their entries
    redis.call('ZREMRANGEBYSCORE', is_index, '-inf', now - args.ttl * 1000)
  end
end

-- So does the shard's index of calls in bot at each node of the flow, and its set of the
-- nodes that have one (readers find the indexes there, never by a scan).
local node = args.fields.node or ''
local was_at = old_state == 'bot' and args.loaded_node ~= ''
local is_at = state == 'bot' and node ~= ''
local moved = node ~= args.loaded_node
if was_at and (moved or not is_at) then
  redis.call('ZREM', was_node, conversation)
  if redis.call('EXISTS', was_node) == 0 then
    redis.call('SREM', nodes, args.loaded_node)
  end
end
if is_at and (moved or not was_at) then
  redis.call('ZADD', is_node, now, conversation)
  redis.call('SADD', nodes, node)
end

-- The call's one timer (a transfer's watchdog, a no-input or inter-digit timeout, a
-- hang-up after its prompt) is scheduled exactly while it has a deadline.
if deadline == 0 then
  deadline = tonumber(args.fields.deadline or '') or 0
end
if deadline > 0 and state ~= 'ended' then
  redis.call('ZADD', due, deadline, args.timer)
else
  redis.call('ZREM', due, args.timer)
end

if args.outbox ~= '' then
  redis.call('HSET', outbox, key, now .. ':' .. args.outbox)
  redis.call('ZADD', due, now + args.outbox_grace_ms, args.outbox_due)
end

if #args.lines > 0 then
  redis.call('RPUSH', transcript, unpack(args.lines))
  redis.call('LTRIM', transcript, -args.transcript_max, -1)
end

-- The call's own history (the entry's time spliced in first), and the shard's feed of
-- every call's steps (for watchers).
if #args.steps > 0 then
  local entries = {}
  for n, step in ipairs(args.steps) do
    entries[n] = '[' .. now .. ',' .. string.sub(step[5], 2)
    redis.call('XADD', feed, 'MAXLEN', '~', args.feed_max, '*', 'call', conversation,
      'trigger', step[1], 'from', step[2], 'to', step[3], 'reason', step[4], 'target', target,
      'node', step[6])
  end
  redis.call('RPUSH', history, unpack(entries))
  redis.call('LTRIM', history, -args.history_max, -1)
  -- The feed is shared by the shard's calls, so it has no call's TTL: its entries go once
  -- older than any call is kept, and the whole stream when the shard has been quiet as long.
  redis.call('XTRIM', feed, 'MINID', now - args.feed_seconds * 1000)
  redis.call('EXPIRE', feed, args.feed_seconds)
end

-- Transfer counters (started, accepted, ... per queue and target), per minute and hour.
if #args.counters > 0 then
  for k, stats in ipairs({minute, hour}) do
    local bucket, ttl = args.buckets[k][1], args.buckets[k][2]
    for _, counter in ipairs(args.counters) do
      redis.call('HINCRBY', stats, bucket .. ':' .. counter, 1)
    end
    redis.call('EXPIRE', stats, ttl)
  end
end

redis.call('HSET', seen, key, mark)
-- The channel redelivers within seconds, so only recent activities need remembering: past
-- seen_max and a quarter, those older than the last seen_max versions go, in one sweep now
-- and then rather than every turn (an entry without a version, written by hand, with them).
local seen_max = args.seen_max
if redis.call('HLEN', seen) > seen_max + math.floor(seen_max / 4) then
  local all, old = redis.call('HGETALL', seen), {}
  for j = 1, #all, 2 do
    if tonumber(string.match(all[j + 1], '^(%d+):') or '0') <= version - seen_max then
      old[#old + 1] = all[j]
    end
  end
  if #old > 0 then
    redis.call('HDEL', seen, unpack(old))
  end
end
-- A live call's TTL is its idle time, but never past its maximum lifetime: a call that
-- never ends, however busy, still expires. An ended call is kept for the retention.
local ttl = args.ttl
if state ~= 'ended' and args.lifetime > 0 then
  local created = tonumber(record[4] or now)
  local left = math.ceil((created + args.lifetime * 1000 - now) / 1000)
  if left < ttl then
    ttl = math.max(left, 1)
  end
end
for _, k in ipairs({call, seen, transcript, history, outbox, reference}) do
  redis.call('EXPIRE', k, ttl)
end
if (args.fields.variables or '') ~= '' then
  redis.call('SET', variables, args.fields.variables, 'EX', ttl)
else
  redis.call('DEL', variables)
end
if since == 0 then  -- the state did not change: nor did its since
  since = tonumber(record[3] or '0')
end
return {1, version, deadline, since}
