-- Renew a worker's heartbeat only while it still names this run: never re-create a reaped or replaced one.
-- KEYS[1] heartbeat key; ARGV[1] incarnation, ARGV[2] ttl (ms)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
