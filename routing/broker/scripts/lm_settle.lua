-- An admitted LM request finished (tasks/lm/limiter.py): its token reservation becomes the
-- provider's reported usage (0 when it failed), and its concurrency lease is released.
-- KEYS: 1 tpm tokens (hash), 2 leases. ARGV: 1 request id, 2 tokens used, 3 settle tpm (1/0), 4 release lease (1/0)
if ARGV[3] == '1' then
  local reserved = redis.call('HGET', KEYS[1], ARGV[1])
  if reserved then  -- still in the window
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    redis.call('HINCRBY', KEYS[1], '_total', tonumber(ARGV[2]) - tonumber(reserved))
  end
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
