-- Removes a cached copy or hint, but never a copy pinned by a journal entry
-- not yet replayed: that copy is newer than the durable tier.
-- KEYS[1] key. Returns 1 when removed.
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HEXISTS', KEYS[1], 'p') == 1 then
  return 0
end
return redis.call('UNLINK', KEYS[1])
