-- Store a task result the way Celery's Redis backend does (SET + PUBLISH on the key's channel, and
-- on the producer's reply channel when the call named one), unless a result is already stored:
-- a call that completed keeps its result.
-- KEYS[1] celery-task-meta-<id>; ARGV[1] the encoded result, ARGV[2] expiry (s), ARGV[3] reply channel ('': none)
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('PUBLISH', KEYS[1], ARGV[1])
  if ARGV[3] and ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], ARGV[1])
  end
  return 1
end
return 0
