-- Installs a bucket's values read from the durable tier, unless the bucket
-- is held already (another increment seeded it meanwhile), or a bucket of
-- the scope's shard was dropped since the seeder took its ticket: values
-- read before that drop may miss increments the dropped bucket took.
-- KEYS[1] bucket hash   KEYS[2] the shard's drop count
-- ARGV[1] '1' complete, '0' values unknown (durable tier unavailable)
-- ARGV[2] expiry (ms since the epoch) or ''   ARGV[3] ticket (drop count read
-- before the values)   ARGV[4..] name, units, nanos ...
-- Returns 1 when installed, 0 when held, -1 when refused for a drop.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then
  return -1
end
redis.call('HSET', KEYS[1], '_s', ARGV[1])
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[1], 'u:' .. ARGV[i], ARGV[i + 1], 'n:' .. ARGV[i], ARGV[i + 2])
end
if ARGV[2] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return 1
