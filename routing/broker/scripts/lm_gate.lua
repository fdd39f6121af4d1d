-- Whether one LM request may go to the provider now, for every worker of the broker
-- (tasks/lm/limiter.py), in one round trip: the model's 429 pause, the session's and
-- run's budgets, then its limits, checked and (when all pass) taken together.
--   rpm: a sliding-window log, the times of the requests of the last window (ms);
--   tpm: the same window holding each request's tokens (reserved from an estimate,
--        settled with the provider's usage by lm_settle.lua), with their total in '_total';
--   concurrency: leases (expiry ms), so a killed worker's slots come back after the lease.
-- No window of `window` ms ever holds more than rpm requests or tpm tokens.
-- KEYS: 1 pause, 2 session usage, 3 run usage, 4 rpm log, 5 tpm log, 6 tpm tokens (hash), 7 leases
-- ARGV: 1 request id, 2 token estimate, 3 rpm, 4 tpm, 5 concurrency (0 = no limit), 6 window ms,
--       7 lease ms, 8 check session budget (1/0), 9 check run budget (1/0)
-- Returns {'ok'} | {'wait', ms, reason} | {'budget', key, spent, budget, kind} | {'never', reason}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('GET', KEYS[1]) or '0')
if paused > now then
  return {'wait', paused - now, 'paused after a 429'}
end

local function over_budget(key)
  local f = redis.call('HMGET', key, 'budget_tokens', 'budget_usd', 'prompt_tokens', 'completion_tokens', 'cost_usd')
  local tokens = (tonumber(f[3]) or 0) + (tonumber(f[4]) or 0)
  local usd = tonumber(f[5]) or 0
  if f[1] and tokens >= tonumber(f[1]) then
    return {'budget', key, tostring(tokens), tostring(f[1]), 'tokens'}
  end
  if f[2] and usd >= tonumber(f[2]) then
    return {'budget', key, tostring(usd), tostring(f[2]), 'usd'}
  end
  return nil
end
if ARGV[8] == '1' then
  local over = over_budget(KEYS[2])
  if over then return over end
end
if ARGV[9] == '1' then
  local over = over_budget(KEYS[3])
  if over then return over end
end

local id, estimate = ARGV[1], tonumber(ARGV[2])
local rpm, tpm, slots = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local window, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local since = '(' .. (now - window)

if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', since)
  local n = redis.call('ZCARD', KEYS[4])
  if n >= rpm then  -- the (n - rpm + 1)-th oldest must leave the window first
    local leaving = redis.call('ZRANGE', KEYS[4], n - rpm, n - rpm, 'WITHSCORES')
    return {'wait', tonumber(leaving[2]) + window - now + 1, 'rpm'}
  end
end

if tpm > 0 then
  if estimate > tpm then
    return {'never', 'the request alone (~' .. estimate .. ' tokens) is more than the tpm limit'}
  end
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', since)
  for _, member in ipairs(old) do
    local tokens = tonumber(redis.call('HGET', KEYS[6], member) or '0')
    redis.call('HDEL', KEYS[6], member)
    redis.call('HINCRBY', KEYS[6], '_total', -tokens)
  end
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', since)
  end
  local total = tonumber(redis.call('HGET', KEYS[6], '_total') or '0')
  if total + estimate > tpm then
    local need = total + estimate - tpm
    local entries = redis.call('ZRANGE', KEYS[5], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      need = need - tonumber(redis.call('HGET', KEYS[6], entries[i]) or '0')
      if need <= 0 then
        return {'wait', tonumber(entries[i + 1]) + window - now + 1, 'tpm'}
      end
    end
    return {'wait', 50, 'tpm'}  -- reservations outside the log (settling): look again soon
  end
end

if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)  -- leases of killed workers run out
  if redis.call('ZCARD', KEYS[7]) >= slots then
    return {'wait', 0, 'concurrency'}
  end
end

if rpm > 0 then
  redis.call('ZADD', KEYS[4], now, id)
  redis.call('PEXPIRE', KEYS[4], window * 2)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[5], now, id)
  redis.call('HSET', KEYS[6], id, estimate)
  redis.call('HINCRBY', KEYS[6], '_total', estimate)
  redis.call('PEXPIRE', KEYS[5], window * 2)
  redis.call('PEXPIRE', KEYS[6], window * 2)
end
if slots > 0 then
  redis.call('ZADD', KEYS[7], now + lease, id)
  redis.call('PEXPIRE', KEYS[7], lease * 2)
end
return {'ok'}
