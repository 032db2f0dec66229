-- The members of a key prefix (cluster/members.py says the model). ARGV: prefix, op, then the
-- op's arguments. Times are the server's (TIME), in ms.
--   join  id, record, lease ms, digest, then key, value pairs of the shared configuration:
--         {1} joined; {0, key, theirs or false} the configuration differs from the members'
--         there (the first differing key, and its value there); a prefix with no member takes
--         the joiner's configuration.
--   beat  id, lease ms: {1, id, record, ...} the members now; {-1} this one is not a member
--         (its lease ran out, or Redis lost it): it joins again.
--   check id, record, lease ms, digest, pairs (as join): join's answer, without joining.
--   leave id: {1}.
-- Every op first drops the members whose lease ran out.
local P = ARGV[1]
local OP = ARGV[2]
local MEMBERS, LEASES = P .. ':members', P .. ':member-leases'
local CONFIG, DIGEST = P .. ':config', P .. ':config-digest'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)) do
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', MEMBERS, id)
end

if OP == 'join' or OP == 'check' then
  local id, record, lease, digest = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local others = redis.call('ZCARD', LEASES) - (redis.call('ZSCORE', LEASES, id) and 1 or 0)
  if others == 0 then
    if OP == 'check' then return {1} end
    redis.call('DEL', CONFIG)
    for i = 7, #ARGV, 2 do redis.call('HSET', CONFIG, ARGV[i], ARGV[i + 1]) end
    redis.call('SET', DIGEST, digest)
  elseif redis.call('GET', DIGEST) ~= digest then
    local theirs = {}
    local flat = redis.call('HGETALL', CONFIG)
    for i = 1, #flat, 2 do theirs[flat[i]] = flat[i + 1] end
    local first, value = nil, false
    local function consider(k, v)
      if (first == nil or k < first) then first, value = k, v end
    end
    local mine = {}
    for i = 7, #ARGV, 2 do
      mine[ARGV[i]] = true
      if theirs[ARGV[i]] ~= ARGV[i + 1] then consider(ARGV[i], theirs[ARGV[i]] or false) end
    end
    for k, v in pairs(theirs) do
      if not mine[k] then consider(k, v) end
    end
    return {0, first or 'the configuration', value}
  end
  if OP == 'check' then return {1} end
  redis.call('ZADD', LEASES, now + lease, id)
  redis.call('HSET', MEMBERS, id, record)
  return {1}
elseif OP == 'beat' then
  local id, lease = ARGV[3], tonumber(ARGV[4])
  if not redis.call('ZSCORE', LEASES, id) then return {-1} end
  redis.call('ZADD', LEASES, now + lease, id)
  local reply = {1}
  local flat = redis.call('HGETALL', MEMBERS)
  for i = 1, #flat do reply[#reply + 1] = flat[i] end
  return reply
elseif OP == 'leave' then
  redis.call('ZREM', LEASES, ARGV[3])
  redis.call('HDEL', MEMBERS, ARGV[3])
  return {1}
end
return redis.error_reply('unknown op ' .. OP)
