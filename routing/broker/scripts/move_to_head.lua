-- Move messages onto the head of a queue (the right end, which BRPOP takes next) in one atomic step: the
-- oldest items of a source list and/or un-acked deliveries, each pushed as the caller rewrote it.
-- Each message is taken only if it is still what the caller read (its sha1): a source whose oldest items
-- changed (popped meanwhile) moves nothing and replies -1 (read again); an un-acked entry that is gone or
-- changed (acked, restored) is skipped. Replies how many were pushed.
-- KEYS[1] the target list; KEYS[2] the source list; KEYS[3] kombu's un-acked hash; KEYS[4] its index
-- ARGV[1] how many of the source's oldest items are taken (all of them are listed below); then per message, in
-- push order (the one to run first comes last): 'q' or 'u'; a source item's place from the tail (0: the
-- oldest) or an un-acked tag; the sha1 of its bytes as read; what to push
local taken = tonumber(ARGV[1])
if taken > 0 then
  local tail = redis.call('LRANGE', KEYS[2], -taken, -1)
  if #tail ~= taken then
    return -1
  end
  for i = 2, #ARGV, 4 do
    if ARGV[i] == 'q' and redis.sha1hex(tail[taken - tonumber(ARGV[i + 1])]) ~= ARGV[i + 2] then
      return -1
    end
  end
  redis.call('LTRIM', KEYS[2], 0, -taken - 1)
end
local push = {}
for i = 2, #ARGV, 4 do
  local take = ARGV[i] == 'q'
  if not take then
    local current = redis.call('HGET', KEYS[3], ARGV[i + 1])
    take = current and redis.sha1hex(current) == ARGV[i + 2]
    if take then
      redis.call('HDEL', KEYS[3], ARGV[i + 1])
      redis.call('ZREM', KEYS[4], ARGV[i + 1])
    end
  end
  if take then
    push[#push + 1] = ARGV[i + 3]
  end
end
for first = 1, #push, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(push, first, math.min(first + 999, #push)))
end
return #push
