-- Installs a bucket's values read from the durable tier, unless the bucket
-- is held already (another increment seeded it meanwhile).
-- KEYS[1] bucket hash
-- ARGV[1] '1' complete, '0' values unknown (durable tier unavailable)
-- ARGV[2] expiry (ms since the epoch) or ''   ARGV[3..] name, units, nanos ...
-- Returns 1 when installed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], '_s', ARGV[1])
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[1], 'u:' .. ARGV[i], ARGV[i + 1], 'n:' .. ARGV[i], ARGV[i + 2])
end
if ARGV[2] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 1
