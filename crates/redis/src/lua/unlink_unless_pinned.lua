-- Removes a cached copy or hint, but never a record the cache holds as the
-- truth: one of a cache-only collection (field a), nor, unless ARGV[1] is
-- '1', one pinned by a journal entry not yet replayed (field p, newer than
-- the durable tier; its entry stays in the journal either way).
-- KEYS[1] key. Returns 1 when removed.
if redis.call('TYPE', KEYS[1]).ok == 'hash'
  and (redis.call('HEXISTS', KEYS[1], 'a') == 1
    or (ARGV[1] ~= '1' and redis.call('HEXISTS', KEYS[1], 'p') == 1)) then
  return 0
end
return redis.call('UNLINK', KEYS[1])
