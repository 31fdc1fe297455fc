-- session-engine: ONE compare-and-set per session transition (docs/distributed.md).
-- Every key is in one bucket (one hash tag, so one Cluster slot):
--   KEYS[1] session hash {v = version, e = entry JSON}   KEYS[2] bucket record seq (INCRBY)
--   KEYS[3] bucket version counter (INCR)                 KEYS[4] bucket deadline ZSET (member = session id)
--   KEYS[5] bucket audit stream                         KEYS[6] the tenant's sessions in the bucket (ZSET)
--   KEYS[7] the bucket's creation token buckets (hash)   KEYS[8] the bucket's chain head (40 hex)
-- ARGV[1] expected version ("0": absent; "*": no session, records only)
-- ARGV[2] new entry JSON, "" unchanged, "-" ended (records only: "" or the head they must follow, a signature's)
-- ARGV[3] deadline (ZSET score, ms; "" unmoved)
-- ARGV[4] PEXPIRE of the session key (ms, relative: no clock of a replica is trusted for it)            ARGV[5] session id
-- ARGV[6] stream MAXLEN ("" keeps every record)        ARGV[7] this commit's token (unique per attempt)
-- ARGV[8] tenant ("" unscoped: no per-tenant limit)   ARGV[9] the tenant's live sessions allowed in this bucket ("" none)
-- ARGV[10] creations per minute allowed in this bucket ("" none), "" too when this commit creates no session by a
--          SetSession (only those are limited)          ARGV[11] now (ms, the replica's clock: the token bucket's)
-- ARGV[12] the session's last use after the commit (its score in KEYS[6])
-- ARGV[13..] records: JSON without its opening "{"
-- Reply: {1, version after, last seq, victims...} or, on a version mismatch, {0, current version, current entry}:
-- the caller applies the pure core again to that entry and retries. No rule of the engine lives here.
-- {2} (nothing written): the tenant is past its creations in this bucket; the caller applies its events again
-- with that SetSession refused. Victims: session id, last use (pairs) of the tenant's least recently used sessions
-- past its share of this bucket; the caller evicts each by an Evict event (the core keeps one used since).
-- A client may send a script again after a lost reply or a cluster redirect: the session keeps the
-- token of its last commit, so a commit that already landed answers {1, version, -1} instead of
-- a conflict (which would make the caller apply its events twice).
local expected = ARGV[1]
local version = '0'
local victims = {}
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
  local tenant = ARGV[8]
  if tenant ~= '' and ARGV[10] ~= '' and version == '0' and state ~= '' and state ~= '-' then
    -- a token bucket per (tenant, bucket): ARGV[10] tokens, refilled at ARGV[10] a minute
    local rate = tonumber(ARGV[10])
    local now = tonumber(ARGV[11])
    local tokens, at = rate, now
    local held = redis.call('HGET', KEYS[7], tenant)
    if held then
      local sp = string.find(held, ' ', 1, true)
      tokens, at = tonumber(string.sub(held, 1, sp - 1)), tonumber(string.sub(held, sp + 1))
      if now > at then
        tokens = math.min(rate, tokens + (now - at) * rate / 60000)
        at = now
      end
    end
    if tokens < 1 then
      return {2}
    end
    -- %.17g: the tokens as the double they are (engine.shell.capacity's bucket keeps the same float)
    redis.call('HSET', KEYS[7], tenant, string.format('%.17g %d', tokens - 1, at))
    redis.call('PEXPIRE', KEYS[7], 60000)  -- untouched for a minute, every bucket in it is full again
  end
  if state == '-' then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[4], ARGV[5])
    if tenant ~= '' then redis.call('ZREM', KEYS[6], ARGV[5]) end
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
    if tenant ~= '' then redis.call('ZREM', KEYS[6], ARGV[5]) end
  end
  if tenant ~= '' and ARGV[9] ~= '' and state ~= '' and state ~= '-' then
    redis.call('ZADD', KEYS[6], ARGV[12], ARGV[5])
    if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[6], ARGV[4]) end
    local over = redis.call('ZCARD', KEYS[6]) - tonumber(ARGV[9])
    if over > 0 then
      local oldest = redis.call('ZRANGE', KEYS[6], 0, over, 'WITHSCORES')
      for i = 1, #oldest, 2 do
        if oldest[i] ~= ARGV[5] and #victims < 2 * over then
          table.insert(victims, oldest[i])
          table.insert(victims, oldest[i + 1])
        end
      end
    end
  end
end
-- A records-only commit (ARGV[1] "*") whose ARGV[2] is not "" is a signature of that head: written only while the
-- bucket's head is still it, so the signed head is the entry's just before (else {3}: read the head again).
if expected == '*' and ARGV[2] ~= '' and redis.call('GET', KEYS[8]) ~= ARGV[2] then
  return {3}
end
-- The bucket's hash chain (docs/audit-log.md, "The chain on the Redis streams"): every entry carries
-- h = sha1hex(previous head .. r), the first one of the bucket's chain also g = its genesis (the previous
-- head it links to), and KEYS[8] holds the head after the newest entry. Redis 6.2 Lua has no SHA-256.
local n = #ARGV - 12
local seq = 0
if n > 0 then
  seq = redis.call('INCRBY', KEYS[2], n) - n
  local head = redis.call('GET', KEYS[8])
  local genesis = nil
  if not head then
    genesis = redis.sha1hex('session-engine genesis ' .. KEYS[5] .. ' ' .. ARGV[7] .. ' ' .. tostring(seq))
    head = genesis
  end
  for i = 1, n do
    seq = seq + 1
    local record = '{"seq":' .. string.format('%d', seq) .. ',' .. ARGV[12 + i]
    head = redis.sha1hex(head .. record)
    local args = {'XADD', KEYS[5]}
    if ARGV[6] ~= '' then
      table.insert(args, 'MAXLEN') table.insert(args, '~') table.insert(args, ARGV[6])
    end
    table.insert(args, '*') table.insert(args, 'r') table.insert(args, record)
    table.insert(args, 'h') table.insert(args, head)
    if genesis then
      table.insert(args, 'g') table.insert(args, genesis)
      genesis = nil
    end
    redis.call(unpack(args))
  end
  redis.call('SET', KEYS[8], head)
end
local reply = {1, version, seq}
for _, item in ipairs(victims) do table.insert(reply, item) end
return reply
