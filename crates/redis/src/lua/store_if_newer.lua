-- Stores a record copy (or a deletion marker) unless the key already holds the
-- same or a newer version. This is the single rule that keeps a slow reader's
-- cache fill from overwriting a newer write (guarantee 1: no stale fill).
--
-- KEYS[1]  record key (hash: v = version, d = record JSON; no d = deleted)
-- ARGV[1]  version as a 20-digit zero-padded decimal, so that string order is
--          numeric order (Lua numbers are doubles and would lose precision)
-- ARGV[2]  record JSON, or '' for a deletion marker
-- ARGV[3]  time to live in milliseconds
-- Returns 1 when stored, 0 when the key already held a version >= ARGV[1].
local current = redis.call('HGET', KEYS[1], 'v')
if current and current >= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'd')
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
