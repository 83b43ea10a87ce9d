-- After a journal entry has been applied to the durable tier, in one step:
-- unpin its copy (see unpin.lua) and remove the entry from the stream and
-- the consumer group. The record, its pinned-id set and the stream share the
-- shard's hash tag.
--
-- KEYS[1] record key   KEYS[2] pinned ids of its collection and shard
-- KEYS[3] journal stream
-- ARGV[1] version of the replayed entry   ARGV[2] time to live (ms)
-- ARGV[3] '1' when the durable tier held a newer version   ARGV[4] id
-- ARGV[5] consumer group   ARGV[6] entry id
local pinned = redis.call('HGET', KEYS[1], 'p')
-- A newer journaled write may have pinned it again; its own replay unpins.
if pinned == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[4])
  if ARGV[3] == '1' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HDEL', KEYS[1], 'p')
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[3], ARGV[6])
return 1
