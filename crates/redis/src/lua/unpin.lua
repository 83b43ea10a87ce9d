-- After a journal entry has been applied to the durable tier: the copy no
-- longer needs pinning. If the durable tier already held a newer version
-- (written while this cache was unreachable), the copy is stale and goes.
--
-- KEYS[1] record key   KEYS[2] pinned ids of its collection and shard
-- ARGV[1] version of the replayed entry   ARGV[2] time to live (ms)
-- ARGV[3] '1' when the durable tier held a newer version   ARGV[4] id
local pinned = redis.call('HGET', KEYS[1], 'p')
if pinned ~= ARGV[1] then
  -- A newer journaled write pinned it again; its own replay will unpin.
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[4])
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HDEL', KEYS[1], 'p')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
