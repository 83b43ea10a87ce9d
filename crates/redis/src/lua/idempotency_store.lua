-- Stores the response of a claimed idempotency key, within the bounds of
-- what stored responses may take: per caller and in all, in count and in
-- bytes. Each ledger is a sorted set (member: the key, score: when its
-- response expires, ms) beside a hash of sizes with the running total in
-- field '_bytes'; lapsed entries are taken off a hundred at a time. A
-- response past a bound is not stored and the claim is given up: the call
-- ran, and a retry runs again. (The service talks to one Redis server: the
-- all-callers ledger sits in a slot of its own.)
--
-- KEYS[1] the key's hash   KEYS[2], KEYS[3] the caller's ledger and sizes
-- KEYS[4], KEYS[5] the all-callers ledger and sizes
-- ARGV[1] fingerprint   ARGV[2] response   ARGV[3] lifetime (ms)   ARGV[4] now (ms)
-- ARGV[5], ARGV[6] caller's most responses, bytes
-- ARGV[7], ARGV[8] all callers' most responses, bytes
-- ARGV[9] the key's ledger member
-- Returns 1 when stored, 0 when not.
local now = tonumber(ARGV[4])
local size = string.len(ARGV[2])
local member = ARGV[9]

local function lapse(ledger, sizes)
  local gone = redis.call('ZRANGEBYSCORE', ledger, '-inf', now, 'LIMIT', 0, 100)
  for _, old in ipairs(gone) do
    local bytes = tonumber(redis.call('HGET', sizes, old) or '0')
    redis.call('HDEL', sizes, old)
    redis.call('HINCRBY', sizes, '_bytes', -bytes)
    redis.call('ZREM', ledger, old)
  end
end

local function forget(ledger, sizes)
  local bytes = redis.call('HGET', sizes, member)
  if bytes then
    redis.call('HDEL', sizes, member)
    redis.call('HINCRBY', sizes, '_bytes', -tonumber(bytes))
    redis.call('ZREM', ledger, member)
  end
end

local function fits(ledger, sizes, most, most_bytes)
  local held = tonumber(redis.call('HGET', sizes, '_bytes') or '0')
  return redis.call('ZCARD', ledger) < tonumber(most) and held + size <= tonumber(most_bytes)
end

lapse(KEYS[2], KEYS[3])
lapse(KEYS[4], KEYS[5])
forget(KEYS[2], KEYS[3])
forget(KEYS[4], KEYS[5])
if not (fits(KEYS[2], KEYS[3], ARGV[5], ARGV[6]) and fits(KEYS[4], KEYS[5], ARGV[7], ARGV[8])) then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], 'f', ARGV[1], 's', 'done', 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local expiry = now + tonumber(ARGV[3])
for _, pair in ipairs({{KEYS[2], KEYS[3]}, {KEYS[4], KEYS[5]}}) do
  redis.call('ZADD', pair[1], expiry, member)
  redis.call('HSET', pair[2], member, size)
  redis.call('HINCRBY', pair[2], '_bytes', size)
  redis.call('PEXPIRE', pair[1], ARGV[3])
  redis.call('PEXPIRE', pair[2], ARGV[3])
end
return 1
