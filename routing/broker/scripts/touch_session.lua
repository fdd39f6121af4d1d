-- Renew a session's inactivity TTL (and its recipes' and stored contexts'), never re-creating a closed session.
-- KEYS[1] session hash, KEYS[2] recipes hash, KEYS[3] contexts hash; ARGV[1] now (s), ARGV[2] ttl (ms)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if KEYS[3] then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
return 1
