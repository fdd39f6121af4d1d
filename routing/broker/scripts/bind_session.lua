-- Bind a session to the least-loaded live worker of its pool, atomically.
-- KEYS[1] pool workers set, KEYS[2] session hash, KEYS[3] sessions index set
-- ARGV[1] session id, ARGV[2] pool, ARGV[3] affinity, ARGV[4] now (s), ARGV[5] ttl (ms),
-- ARGV[6] required capabilities (JSON list), ARGV[7] worker key prefix, ARGV[8] heartbeat key prefix,
-- ARGV[9] preferred node ('' = any), ARGV[10] excluded node ('' = none), ARGV[11] ttl (s)
-- A session already bound to a live, capable, not draining worker keeps it (unless a node is
-- preferred or excluded), so concurrent first calls or attaches never split its state.
-- Keys of workers are built from ARGV prefixes: fine on one Redis, not on Redis Cluster.
-- Returns {'ok', node, incarnation} or {'none', number of live workers seen}.
local required = cjson.decode(ARGV[6])
local best, best_load, best_inflight
local live = 0

local function has_all(caps_json)
  local caps = {}
  for _, c in ipairs(cjson.decode(caps_json or '[]')) do caps[c] = true end
  for _, r in ipairs(required) do
    if not caps[r] then return false end
  end
  return true
end

local function usable(node)
  local wkey = ARGV[7] .. node
  return redis.call('EXISTS', ARGV[8] .. node) == 1 and redis.call('HGET', wkey, 'draining') ~= '1'
    and has_all(redis.call('HGET', wkey, 'capabilities'))
end

local previous = redis.call('HGET', KEYS[2], 'worker')
if ARGV[9] == '' and ARGV[10] == '' and previous and previous ~= '' and usable(previous) then
  -- Kept only while the same run of the worker is there (a restart under the name lost the state).
  local held = redis.call('HGET', KEYS[2], 'incarnation') or ''
  if held == '' or held == (redis.call('HGET', ARGV[7] .. previous, 'incarnation') or '') then
    redis.call('HSET', KEYS[2], 'last_used', ARGV[4])
    return {'ok', previous, held}
  end
end

for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[10] and redis.call('EXISTS', ARGV[8] .. node) == 1 then
    live = live + 1
    if usable(node) then
      local wkey = ARGV[7] .. node
      local load = redis.call('SCARD', wkey .. ':sessions')
      local inflight = tonumber(redis.call('HGET', wkey, 'in_flight') or '0') or 0
      if node == ARGV[9] then
        best, best_load, best_inflight = node, -1, -1
      elseif best == nil or load < best_load
          or (load == best_load and inflight < best_inflight)
          or (load == best_load and inflight == best_inflight and node < best) then
        best, best_load, best_inflight = node, load, inflight
      end
    end
  end
end

if best == nil then
  return {'none', live}
end

if previous and previous ~= '' and previous ~= best then
  redis.call('SREM', ARGV[7] .. previous .. ':sessions', ARGV[1])
end
if redis.call('HEXISTS', KEYS[2], 'created') == 0 then
  redis.call('HSET', KEYS[2], 'created', ARGV[4])
end
local incarnation = redis.call('HGET', ARGV[7] .. best, 'incarnation') or ''
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'pool', ARGV[2], 'affinity', ARGV[3],
  'worker', best, 'incarnation', incarnation, 'last_used', ARGV[4], 'ttl_s', ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', ARGV[7] .. best .. ':sessions', ARGV[1])
return {'ok', best, incarnation}
