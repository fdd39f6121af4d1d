-- The fleet LM cache's write (tasks/lm/fleet_cache.py): store a response, evict
-- least-recently-used entries past the size cap (only keys this cache wrote: it
-- never relies on Redis maxmemory eviction), then end the flight: the lock goes
-- and every registered waiter gets a wake-up on the flight's own list.
-- KEYS: 1 value, 2 flight lock, 3 LRU, 4 sizes, 5 total bytes
-- ARGV: 1 value ('' = only end the flight), 2 TTL ms, 3 max bytes, 4 token ('' = none), 5 entry bytes
local t = redis.call('TIME')
-- microseconds (access order even within a ms), written out whole: Lua's %.14g would round them
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
if ARGV[1] ~= '' then
  local size = tonumber(ARGV[5])
  local old = tonumber(redis.call('HGET', KEYS[4], KEYS[1]) or '0')
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[4], KEYS[1], size)
  redis.call('ZADD', KEYS[3], now, KEYS[1])
  local total = redis.call('INCRBY', KEYS[5], size - old)
  local function forget(key)
    local s = tonumber(redis.call('HGET', KEYS[4], key) or '0')
    redis.call('HDEL', KEYS[4], key)
    redis.call('DEL', key)
    return redis.call('DECRBY', KEYS[5], s)
  end
  -- not read for a whole TTL: surely expired, its bytes no longer held
  local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.0f', tonumber(now) - tonumber(ARGV[2]) * 1000), 'LIMIT', 0, 64)
  for _, key in ipairs(stale) do
    redis.call('ZREM', KEYS[3], key)
    total = forget(key)
  end
  local evicted = 0
  while total > tonumber(ARGV[3]) and evicted < 256 do
    local victim = redis.call('ZPOPMIN', KEYS[3])
    if #victim == 0 then break end
    total = forget(victim[1])
    evicted = evicted + 1
  end
end
if ARGV[4] ~= '' then
  if redis.call('GET', KEYS[2]) == ARGV[4] then
    redis.call('DEL', KEYS[2])
  end
  local waiters = KEYS[2] .. ':w:' .. ARGV[4]
  local n = tonumber(redis.call('GET', waiters) or '0')
  if n > 0 then
    local wake = KEYS[2] .. ':n:' .. ARGV[4]
    for _ = 1, n do
      redis.call('RPUSH', wake, '1')
    end
    redis.call('PEXPIRE', wake, 10000)
    redis.call('DEL', waiters)
  end
end
return 1
