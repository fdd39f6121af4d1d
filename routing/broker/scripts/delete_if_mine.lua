-- Delete a worker's heartbeat only if it still names this run (a newer run under the same name keeps its own).
-- KEYS[1] heartbeat key; ARGV[1] incarnation
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
