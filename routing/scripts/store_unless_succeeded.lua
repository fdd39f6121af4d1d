-- Store a task result as Celery's Redis backend does (SET with expiry, PUBLISH on the key's channel),
-- unless a SUCCESS is already stored there (Celery's own rule against a lost duplicate overwriting a
-- completed result), in one atomic round trip instead of Celery's GET, then MULTI/SET/PUBLISH/EXEC.
-- It is also published on the producer's reply channel when the call named one.
-- KEYS[1] celery-task-meta-<id>; ARGV[1] the encoded result; ARGV[2] expiry in ms (0: none);
-- ARGV[3] the reply channel ('' for none)
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local expiry = tonumber(ARGV[2])
if expiry > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', expiry)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] and ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return 1
