-- The whole cluster as one picture, read (never written) in one call (cluster/view.py says
-- the model). ARGV: prefix, model count n, then the n model names. Times are the server's
-- (TIME), in ms. Reply: {now, the owner key's value ("id token") or false, the owner's lease
-- left (ms; PTTL), when it was elected (ms) or false, {id, record, lease deadline, ...} of
-- the members whose lease runs, {queued, in flight, ...} per model, {model, servers json,
-- ...} as the owner published them}.
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local members = {}
local leases = redis.call('ZRANGEBYSCORE', P .. ':member-leases', '(' .. now, '+inf',
                          'WITHSCORES')
for i = 1, #leases, 2 do
  local record = redis.call('HGET', P .. ':members', leases[i])
  if record then
    members[#members + 1] = leases[i]
    members[#members + 1] = record
    members[#members + 1] = leases[i + 1]
  end
end

local figures = {}
for i = 1, tonumber(ARGV[2]) do
  local m = ARGV[2 + i]
  figures[#figures + 1] = redis.call('ZCARD', P .. ':q:' .. m)
  figures[#figures + 1] = redis.call('SCARD', P .. ':fl:' .. m)
end

local owner = redis.call('GET', P .. ':owner')
local since = false
if owner then since = redis.call('GET', P .. ':owner-since') end
return {now, owner, redis.call('PTTL', P .. ':owner'), since, members, figures,
        redis.call('HGETALL', P .. ':servers')}
