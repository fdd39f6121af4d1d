-- The fleet LM cache's lookup (tasks/lm/fleet_cache.py), one round trip:
-- a hit (its access time refreshed for LRU), else the caller leads the request
-- (single-flight lock taken) or waits for the leader named in the lock.
-- KEYS: 1 value, 2 flight lock, 3 LRU (zset key -> last access, microseconds), 4 sizes (hash), 5 total bytes
-- ARGV: 1 token ('' = no single-flight), 2 lock lease ms
local t = redis.call('TIME')
-- microseconds (access order even within a ms), written out whole: Lua's %.14g would round them
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('ZADD', KEYS[3], now, KEYS[1])
  return {'hit', value}
end
local size = redis.call('HGET', KEYS[4], KEYS[1])
if size then  -- expired by its TTL: drop its accounting
  redis.call('HDEL', KEYS[4], KEYS[1])
  redis.call('ZREM', KEYS[3], KEYS[1])
  redis.call('DECRBY', KEYS[5], size)
end
if ARGV[1] == '' then
  return {'miss'}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'lead'}
end
local holder = redis.call('GET', KEYS[2])
if not holder then
  return {'miss'}
end
local waiters = KEYS[2] .. ':w:' .. holder
redis.call('INCR', waiters)
redis.call('PEXPIRE', waiters, ARGV[2])
return {'wait', holder, redis.call('PTTL', KEYS[2])}
