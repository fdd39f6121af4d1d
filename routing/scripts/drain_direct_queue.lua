-- Pop up to ARGV[1] more messages from a worker's own queue and record each as un-acked, in one atomic
-- step: what kombu's QoS.append writes per message (the index score and the [message, exchange,
-- routing key] entry), so no popped message is ever outside both the queue and the un-acked record.
-- KEYS[1] the queue's list; KEYS[2] kombu's un-acked hash; KEYS[3] its index (sorted set)
-- ARGV[1] how many at most; ARGV[2] now (the index score, seconds)
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then
  return {}
end
for _, item in ipairs(items) do
  local ok, message = pcall(cjson.decode, item)
  if ok and type(message) == 'table' and type(message['properties']) == 'table' then
    local properties = message['properties']
    local tag = properties['delivery_tag']
    local info = properties['delivery_info']
    if type(tag) == 'string' and type(info) == 'table' then
      local entry = '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
        .. cjson.encode(info['routing_key'] or '') .. ']'
      redis.call('HSET', KEYS[2], tag, entry)
      redis.call('ZADD', KEYS[3], ARGV[2], tag)
    end
  end
end
return items
