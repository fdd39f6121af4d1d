-- Record a message BRPOP took from a worker's own queue as un-acked (ARGV[4] its tag, ARGV[5] its
-- entry, built by the caller, which has parsed it already; optional), pop up to
-- ARGV[1] more from the queue and record each too, in one atomic step: what kombu's QoS.append writes
-- per message (the index score and the [message, exchange, routing key] entry), so no popped message
-- is ever outside both the queue and the un-acked record, and a burst costs one round trip.
-- Replies {ARGV[4] or '', message, tag, message, tag, ...}; a tag is '' for a message it could not
-- read (not recorded). When it popped any, the reply is kept under KEYS[4]
-- for ARGV[3] ms: a retried call (its first reply lost) gets the same messages back instead of
-- popping more, so none is left recorded but never delivered.
-- KEYS[1] the queue's list; KEYS[2] kombu's un-acked hash; KEYS[3] its index; KEYS[4] this call's reply;
-- KEYS[5] the worker's registry hash (optional: its 'held' count is set, counting what this pops, and its
-- 'drains' counted, so the heartbeat's own count never overwrites a newer one; set_held.lua)
-- ARGV[1] how many more at most; ARGV[2] now (the index score, seconds); ARGV[3] how long the reply is
-- kept (ms); ARGV[4], ARGV[5] the tag and un-acked entry of the message BRPOP took (optional); ARGV[6] the
-- calls the worker held (received, not started) before this pop (with KEYS[5])
if redis.call('EXISTS', KEYS[4]) == 1 then
  return redis.call('LRANGE', KEYS[4], 0, -1)
end
local function record(item)
  local ok, message = pcall(cjson.decode, item)
  if ok and type(message) == 'table' and type(message['properties']) == 'table' then
    local properties = message['properties']
    local info = properties['delivery_info']
    if type(properties['delivery_tag']) == 'string' and type(info) == 'table' then
      local tag = properties['delivery_tag']
      local entry = '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
        .. cjson.encode(info['routing_key'] or '') .. ']'
      redis.call('HSET', KEYS[2], tag, entry)
      redis.call('ZADD', KEYS[3], ARGV[2], tag)
      return tag
    end
  end
  return ''
end
local reply = {''}
if ARGV[4] then
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
  reply[1] = ARGV[4]
end
local more = {}
if tonumber(ARGV[1]) > 0 then
  more = redis.call('RPOP', KEYS[1], tonumber(ARGV[1])) or {}
end
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 1 then
  -- The worker's calls received and not started: what it held before (ARGV[6]) and all popped here.
  redis.call('HINCRBY', KEYS[5], 'drains', 1)
  redis.call('HSET', KEYS[5], 'held', tonumber(ARGV[6]) + #more + (ARGV[4] and 1 or 0))
end
if #more == 0 then
  return reply
end
for _, item in ipairs(more) do
  reply[#reply + 1] = item
  reply[#reply + 1] = record(item)
end
redis.call('RPUSH', KEYS[4], unpack(reply))
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return reply
