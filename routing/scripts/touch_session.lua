-- Renew a session's inactivity TTL (and its recipes'), never re-creating a closed session.
-- KEYS[1] session hash, KEYS[2] recipes hash; ARGV[1] now (s), ARGV[2] ttl (ms)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
