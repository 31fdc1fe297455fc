-- session-engine: ONE compare-and-set per session transition (docs/distributed.md).
-- Every key is in one bucket (one hash tag, so one Cluster slot):
--   KEYS[1] session hash {v = version, e = entry JSON}   KEYS[2] bucket record seq (INCRBY)
--   KEYS[3] bucket version counter (INCR)                 KEYS[4] bucket deadline ZSET (member = session id)
--   KEYS[5] bucket audit stream
-- ARGV[1] expected version ("0": absent; "*": no session, records only)
-- ARGV[2] new entry JSON, "" unchanged, "-" ended      ARGV[3] deadline (ZSET score, ms; "" unmoved)
-- ARGV[4] PEXPIRE of the session key (ms, relative: no clock of a replica is trusted for it)            ARGV[5] session id
-- ARGV[6] stream MAXLEN ("" keeps every record)        ARGV[7] this commit's token (unique per attempt)
-- ARGV[8..] records: JSON without its opening "{"
-- Reply: {1, version after, last seq} or, on a version mismatch, {0, current version, current entry}:
-- the caller applies the pure core again to that entry and retries. No rule of the engine lives here.
-- A client may send a script again after a lost reply or a cluster redirect: the session keeps the
-- token of its last commit, so a commit that already landed answers {1, version, -1} instead of
-- a conflict (which would make the caller apply its events twice).
local expected = ARGV[1]
local version = '0'
if expected ~= '*' then
  local cur = redis.call('HMGET', KEYS[1], 'v', 'e', 't')
  if cur[1] then
    version = cur[1]
  elseif redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.error_reply('SEFOREIGN ' .. KEYS[1] .. ' is not a session-engine session (no version field)')
  end
  if version ~= expected then
    if cur[3] == ARGV[7] then
      return {1, version, -1}
    end
    return {0, version, cur[2] or ''}
  end
  local state = ARGV[2]
  if state == '-' then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[4], ARGV[5])
    version = '0'
  elseif state ~= '' then
    version = tostring(redis.call('INCR', KEYS[3]))
    redis.call('HSET', KEYS[1], 'v', version, 'e', state, 't', ARGV[7])
    if ARGV[3] ~= '' then  -- the deadline moved (a use, a pin): move it and restart the key's TTL
      redis.call('PEXPIRE', KEYS[1], ARGV[4])
      redis.call('ZADD', KEYS[4], ARGV[3], ARGV[5])
    end
  elseif version == '0' then
    redis.call('ZREM', KEYS[4], ARGV[5])  -- freed by its PEXPIRE while no replica ran: forget its deadline
  end
end
local n = #ARGV - 7
local seq = 0
if n > 0 then
  seq = redis.call('INCRBY', KEYS[2], n) - n
  for i = 1, n do
    seq = seq + 1
    local record = '{"seq":' .. string.format('%d', seq) .. ',' .. ARGV[7 + i]
    if ARGV[6] == '' then
      redis.call('XADD', KEYS[5], '*', 'r', record)
    else
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'r', record)
    end
  end
end
return {1, version, seq}
