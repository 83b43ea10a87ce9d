-- Sets one counter value carried in by an import where Redis holds the
-- counters' truth (a cache-only deployment): only where the bucket holds no
-- value for the field, unless forced. The bucket is then complete (`_s`).
-- KEYS[1] bucket hash
-- ARGV[1] field   ARGV[2] units   ARGV[3] nanos   ARGV[4] '1' to force
-- ARGV[5] expiry (ms since the epoch) or ''
-- Returns 1 when written, 0 when the field held a value.
if ARGV[4] ~= '1' and redis.call('HEXISTS', KEYS[1], 'u:' .. ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], '_s', '1', 'u:' .. ARGV[1], ARGV[2], 'n:' .. ARGV[1], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[5])
end
return 1
