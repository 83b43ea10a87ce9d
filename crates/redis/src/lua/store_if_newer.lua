-- Stores a record copy (or a deletion marker) confirmed by the durable tier,
-- unless the key already holds the same or a newer version. This is the single
-- rule that keeps a slow reader's fill from overwriting a newer write
-- (guarantee 1: no stale fill).
--
-- Hash fields: v version (20-digit zero-padded decimal, so string order is
-- numeric order; Lua numbers are doubles), d data JSON (absent: deleted),
-- c created_at, u updated_at, x expires_at (microseconds since the epoch),
-- p version of a journal entry not yet replayed (the key is then pinned).
--
-- KEYS[1] record key   KEYS[2] pinned ids of its collection and shard
-- ARGV[1] version   ARGV[2] data JSON, '' for a deletion marker
-- ARGV[3] created   ARGV[4] updated   ARGV[5] expires or ''
-- ARGV[6] time to live in milliseconds   ARGV[7] id
-- Returns 1 when stored, 0 when the key held a version >= ARGV[1].
local current = redis.call('HGET', KEYS[1], 'v')
if current and current >= ARGV[1] then
  return 0
end
-- A pinned copy replaced by a newer committed version is no longer ahead
-- of the durable tier.
if redis.call('HEXISTS', KEYS[1], 'p') == 1 then
  redis.call('ZREM', KEYS[2], ARGV[7])
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'u', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'c', ARGV[3], 'u', ARGV[4])
  if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], 'x', ARGV[5])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
