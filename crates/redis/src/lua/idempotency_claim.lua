-- Claims an idempotency key for one request, or says what became of it.
-- KEYS[1] the key's hash (f fingerprint, s 'pending' | 'done', r response)
-- ARGV[1] fingerprint of this request   ARGV[2] lifetime of a pending claim (ms)
-- Returns {'claimed'}, {'done', response}, {'pending'} or {'mismatch'}.
local current = redis.call('HMGET', KEYS[1], 'f', 's', 'r')
if not current[1] then
  redis.call('HSET', KEYS[1], 'f', ARGV[1], 's', 'pending')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
if current[1] ~= ARGV[1] then
  return {'mismatch'}
end
if current[2] == 'done' then
  return {'done', current[3]}
end
return {'pending'}
