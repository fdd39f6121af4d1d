-- A provider's 429 pauses a model for every worker of the broker (tasks/lm/limiter.py).
-- Never shortens a pause already set. KEYS: 1 pause key. ARGV: 1 pause ms. Returns: paused until (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', ARGV[1])
  return until_ms
end
return current
