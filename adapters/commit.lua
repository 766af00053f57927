-- Commit one turn of one call, atomically: compare-and-set on the version,
-- de-duplicate on the activity id, then write the record, transcript and history.
--
-- KEYS: call, transcript, history, seen                     (one hash slot)
-- ARGV: expected_version, dedupe_key (the activity id), token, ttl_seconds,
--       transcript_max, history_max, watchdog_ms (> 0 arms the deadline),
--       n_fields, field, value, ... , n_lines, line, ... ,
--       n_steps, trigger, source, dest, reason, ...
-- Returns {1, version, deadline}  applied
--         {2, version, deadline}  already applied by this same token (a retried command)
--         {0, 0, 0}               duplicate: the activity was applied by another commit
--         {-1, version, 0}        conflict: the call is at another version; reload, rerun
local call, transcript, history, seen = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local activity, token = ARGV[2], ARGV[3]

local prior = redis.call('HGET', seen, activity)
if prior then
  if prior == token then
    local record = redis.call('HMGET', call, 'version', 'deadline')
    return {2, tonumber(record[1] or '0'), tonumber(record[2] or '0')}
  end
  return {0, 0, 0}
end

local version = tonumber(redis.call('HGET', call, 'version') or '0')
if version ~= tonumber(ARGV[1]) then
  return {-1, version, 0}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
version = version + 1
local old_state = redis.call('HGET', call, 'state')
local fields = {'version', version, 'updated', now}
if version == 1 then
  fields[#fields + 1] = 'created'
  fields[#fields + 1] = now
end

local i = 9
for _ = 1, tonumber(ARGV[8]) do
  local name, value = ARGV[i], ARGV[i + 1]
  fields[#fields + 1] = name
  fields[#fields + 1] = value
  if name == 'state' and value ~= old_state then
    fields[#fields + 1] = 'since'
    fields[#fields + 1] = now
  end
  i = i + 2
end

local deadline = 0
local watchdog = tonumber(ARGV[7])
if watchdog > 0 then
  deadline = now + watchdog
  fields[#fields + 1] = 'deadline'
  fields[#fields + 1] = deadline
end
redis.call('HSET', call, unpack(fields))

local n_lines = tonumber(ARGV[i])
i = i + 1
if n_lines > 0 then
  redis.call('RPUSH', transcript, unpack(ARGV, i, i + n_lines - 1))
  redis.call('LTRIM', transcript, -tonumber(ARGV[5]), -1)
  i = i + n_lines
end

local n_steps = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_steps do
  redis.call('XADD', history, 'MAXLEN', ARGV[6], '*',
    'trigger', ARGV[i], 'from', ARGV[i + 1], 'to', ARGV[i + 2], 'reason', ARGV[i + 3],
    'activity', activity, 'version', version)
  i = i + 4
end

redis.call('HSET', seen, activity, token)
local ttl = ARGV[4]
redis.call('EXPIRE', call, ttl)
redis.call('EXPIRE', seen, ttl)
redis.call('EXPIRE', transcript, ttl)
redis.call('EXPIRE', history, ttl)
return {1, version, deadline}
