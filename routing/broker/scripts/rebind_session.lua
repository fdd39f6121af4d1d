-- Move a live session record to another worker (hint affinity: whoever ran the call).
-- KEYS[1] session hash; ARGV[1] session id, ARGV[2] new node, ARGV[3] worker key prefix, ARGV[4] now,
-- ARGV[5] the new node's incarnation
-- Returns the previous node, or false when the session no longer exists.
local previous = redis.call('HGET', KEYS[1], 'worker')
if not previous then return false end
if previous ~= ARGV[2] then
  redis.call('SREM', ARGV[3] .. previous .. ':sessions', ARGV[1])
  redis.call('SADD', ARGV[3] .. ARGV[2] .. ':sessions', ARGV[1])
  redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'incarnation', ARGV[5], 'last_used', ARGV[4])
end
return previous
