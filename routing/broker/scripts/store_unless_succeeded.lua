-- Store a task result as Celery's Redis backend does (SET with expiry, PUBLISH on the key's channel),
-- unless a final result (SUCCESS, FAILURE, REVOKED) is already stored there: Celery's own rule keeps
-- only a SUCCESS; here a failure a caller saw (e.g. SessionWorkerUnavailable, written when its worker
-- was declared dead) also stands against a late run that resumes. One atomic round trip instead of
-- Celery's GET, then MULTI/SET/PUBLISH/EXEC.
-- It is also published on the producer's reply channel when the call named one, and the delivery's
-- un-acked record (kombu's) is removed when a tag is given: the message is acknowledged with its result.
-- KEYS[1] celery-task-meta-<id>; KEYS[2] kombu's un-acked hash; KEYS[3] its index;
-- ARGV[1] the encoded result; ARGV[2] expiry in ms (0: none); ARGV[3] the reply channel ('' for none);
-- ARGV[4] the delivery tag to acknowledge ('' for none).
-- Replies {stored (1, or 0: a final result was there), acknowledged (1: an un-acked record was removed)}.
local acked = 0
if ARGV[4] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[4])
  acked = redis.call('HDEL', KEYS[2], ARGV[4])
end
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  local status = ok and type(meta) == 'table' and meta['status']
  if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then
    return {0, acked}
  end
end
local expiry = tonumber(ARGV[2])
if expiry > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', expiry)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return {1, acked}
