-- A worker's count of calls received and not started ('held' in its registry hash), as its heartbeat
-- counted it, unless a drain (drain_direct_queue.lua) set a newer one meanwhile: the drains counted in
-- Redis are then more than the worker had completed when it counted. Only on a registered worker's hash.
-- KEYS[1] the worker's registry hash; ARGV[1] the count; ARGV[2] the drains the worker had completed.
if redis.call('HEXISTS', KEYS[1], 'node') == 1
    and tonumber(redis.call('HGET', KEYS[1], 'drains') or '0') <= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'held', ARGV[1])
  return 1
end
return 0
