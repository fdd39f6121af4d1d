-- Delete a session record and its binding. KEYS[1] session hash, KEYS[2] sessions index,
-- KEYS[3] recipes hash, KEYS[4] contexts hash (optional); ARGV[1] session id, ARGV[2] worker key prefix.
-- Returns the node it was bound to ('' if unbound), or false when it did not exist.
local node = redis.call('HGET', KEYS[1], 'worker')
local existed = redis.call('EXISTS', KEYS[1]) == 1
if node and node ~= '' then
  redis.call('SREM', ARGV[2] .. node .. ':sessions', ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[3])
if KEYS[4] then redis.call('DEL', KEYS[4]) end
redis.call('SREM', KEYS[2], ARGV[1])
if not existed then return false end
return node or ''
