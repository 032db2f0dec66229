-- The accounting of every process sharing a key prefix (cluster/accounting.py says the model).
-- ARGV: prefix, shared slots (0: none), lease ms, model count n, then n x (name, slots per
-- replica), then the op, its argument count k and its k arguments, then the ids of the caller's
-- queued tickets (their places come back). Reply: the op's result, the call's number (in the
-- order the calls ran), 3 figures per model (queued,
-- in flight, ms the first in line has waited or -1), then the places asked for, then, for each
-- dead process whose tickets this call reclaimed, its id, its slots and its queue places.
local P = ARGV[1]
local TOTAL = tonumber(ARGV[2])
local LEASE = tonumber(ARGV[3])
local NM = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local NAMES, PER = {}, {}
for i = 1, NM do
  NAMES[i] = ARGV[3 + 2 * i]
  PER[NAMES[i]] = tonumber(ARGV[4 + 2 * i])
end
local at = 5 + 2 * NM
local OP = ARGV[at]
local K = tonumber(ARGV[at + 1])
local A = {}
for i = 1, K do A[i] = ARGV[at + 1 + i] end
local OWN = P .. ':own'
local TQ, TT = P .. ':tq', P .. ':tt'

local function key(kind, m) return P .. ':' .. kind .. ':' .. m end

local function capacity(m)
  local c = redis.call('GET', key('cap', m))
  if c then return tonumber(c) end
  -- A model this caller's configuration no longer has (a reload removed it): none handed out.
  return PER[m] or 0
end

local function grant(id, m, owner)
  redis.call('ZREM', key('q', m), id)
  redis.call('SADD', key('fl', m), id)
  redis.call('HSET', key('t', id), 'st', 'f')
  redis.call('RPUSH', key('in', owner), id)
end

local function hand_shared()
  while TOTAL > 0 and redis.call('SCARD', TT) < TOTAL do
    local first = redis.call('ZRANGE', TQ, 0, 0)[1]
    if not first then return end
    redis.call('ZREM', TQ, first)
    redis.call('SADD', TT, first)
    local h = redis.call('HMGET', key('t', first), 'm', 'o')
    grant(first, h[1], h[2])
  end
end

-- The waiter that the model's next slot goes to (the first come), or nil; and what being
-- handed it takes (out of the waiters).
local function next_waiter(m) return redis.call('ZRANGE', key('w', m), 0, 0)[1] end
local function unwait(id, m) redis.call('ZREM', key('w', m), id) end

local function hand_out(m)
  local s = key('slot', m)
  local c = capacity(m)
  while redis.call('SCARD', s) < c do
    local first = next_waiter(m)
    if not first then return end
    unwait(first, m)
    redis.call('SADD', s, first)
    local owner = redis.call('HGET', key('t', first), 'o')
    if TOTAL == 0 then
      grant(first, m, owner)
    elseif redis.call('ZCARD', TQ) == 0 and redis.call('SCARD', TT) < TOTAL then
      redis.call('SADD', TT, first)
      grant(first, m, owner)
    else
      redis.call('ZADD', TQ, redis.call('INCR', P .. ':seq'), first)
      redis.call('HSET', key('t', first), 'st', 'w')
    end
  end
end

-- Out of every line, its slots given back and handed on.
local function drop(id)
  local h = redis.call('HMGET', key('t', id), 'm', 'o', 'st')
  local m = h[1]
  if not m then return end
  redis.call('DEL', key('t', id))
  redis.call('SREM', key('o', h[2]), id)
  redis.call('ZREM', key('q', m), id)
  redis.call('ZREM', key('w', m), id)
  if h[3] ~= 'q' then
    redis.call('SREM', key('slot', m), id)
    redis.call('SREM', key('fl', m), id)
    redis.call('ZREM', TQ, id)
    if redis.call('SREM', TT, id) == 1 then hand_shared() end
    hand_out(m)
  end
end

-- The tickets of every process whose lease ran out are dropped: for each such process, its id,
-- the slots it held and the queue places it had go into RECLAIMED (the reply's tail).
local RECLAIMED = {}
local function sweep()
  for _, owner in ipairs(redis.call('ZRANGEBYSCORE', OWN, '-inf', now)) do
    local slots, places = 0, 0
    for _, id in ipairs(redis.call('SMEMBERS', key('o', owner))) do
      if redis.call('HGET', key('t', id), 'st') == 'q' then places = places + 1
      else slots = slots + 1 end
      drop(id)
    end
    redis.call('DEL', key('o', owner), key('in', owner))
    redis.call('ZREM', OWN, owner)
    RECLAIMED[#RECLAIMED + 1] = owner
    RECLAIMED[#RECLAIMED + 1] = slots
    RECLAIMED[#RECLAIMED + 1] = places
  end
end

local function queue(id, m, owner, since)
  local seq = redis.call('INCR', P .. ':seq')
  redis.call('ZADD', key('q', m), seq, id)
  redis.call('ZADD', key('w', m), seq, id)
  redis.call('HSET', key('t', id), 'm', m, 'o', owner, 'st', 'q', 'since', since)
  redis.call('SADD', key('o', owner), id)
end

local function state(id)
  local st = redis.call('HGET', key('t', id), 'st')
  if st == 'f' then return 1 elseif st then return 0 end
  return -1
end

-- A live ticket that the beat registers again (A[i]: its id, model, 1 if in flight): in
-- flight, or queued anew. LIVE: the arguments of each.
local LIVE = 3
local function register(owner, i)
  local id, m = A[i], A[i + 1]
  if A[i + 2] == '1' then
    redis.call('HSET', key('t', id), 'm', m, 'o', owner, 'st', 'f', 'since', now)
    redis.call('SADD', key('o', owner), id)
    redis.call('SADD', key('slot', m), id)
    redis.call('SADD', key('fl', m), id)
    if TOTAL > 0 then redis.call('SADD', TT, id) end
  else
    queue(id, m, owner, now)
  end
end

-- A queued ticket's place in its model's queue (1: next), or 0.
local function place(id)
  local rank = redis.call('ZRANK', key('q', redis.call('HGET', key('t', id), 'm') or '') , id)
  if rank then return rank + 1 end
  return 0
end

local result = 0
sweep()
if OP == 'join' then
  -- owner, id, model, queue bound (and the tenant, for fair_accounting.lua): 1 queued, 2 holding its slots already (they were free and
  -- no one waited: the join and the try of a request are one call); -1: the owner is not
  -- registered (Redis lost it), beat first
  if not redis.call('ZSCORE', OWN, A[1]) then
    result = -1
  elseif redis.call('ZCARD', key('q', A[3])) < tonumber(A[4]) then
    queue(A[2], A[3], A[1], now, A[5])
    hand_out(A[3])
    result = 1 + state(A[2])
    -- granted here: the reply tells the caller, so its inbox need not wake it
    if result == 2 then redis.call('LREM', key('in', A[1]), -1, A[2]) end
  end
elseif OP == 'try' then
  -- id, model: the free slots go to those first in line; does the ticket hold its slots now?
  hand_out(A[2])
  result = state(A[1])
elseif OP == 'give_up' then
  -- id: a wait that ended keeps slots that came in time, else gives back what it took
  result = state(A[1])
  if result ~= 1 then drop(A[1]) end
elseif OP == 'leave' then
  drop(A[1])
elseif OP == 'serving' then
  -- model, slots
  redis.call('SET', key('cap', A[1]), A[2])
  hand_out(A[1])
elseif OP == 'beat' then
  -- owner, n, n x (id, model, flying 0/1): its live tickets, then ids it left that Redis may
  -- still hold (a leave that did not reach it). The lease is renewed; if Redis had lost the
  -- owner (restarted empty, or the lease ran out), its live tickets are registered again.
  local owner, n = A[1], tonumber(A[2])
  local lost = not redis.call('ZSCORE', OWN, owner)
  redis.call('ZADD', OWN, now + LEASE, owner)
  for i = 3, 2 + LIVE * n, LIVE do
    if lost and redis.call('EXISTS', key('t', A[i])) == 0 then
      result = result + 1
      register(owner, i)
    end
  end
  for i = 3 + LIVE * n, #A do drop(A[i]) end
  for i = 1, NM do hand_out(NAMES[i]) end
elseif OP == 'part' then
  -- owner: a process that stops gives back everything it holds
  for _, id in ipairs(redis.call('SMEMBERS', key('o', A[1]))) do drop(id) end
  redis.call('DEL', key('o', A[1]), key('in', A[1]))
  redis.call('ZREM', OWN, A[1])
elseif OP == 'counts' then
  -- each tenant's tickets, queued or holding slots (fair_accounting.lua keeps them)
  result = redis.call('HGETALL', P .. ':count')
end

-- A number that grows with every call, so that a process keeps the figures of the latest.
local out = {result, redis.call('INCR', P .. ':version')}
for i = 1, NM do
  local m = NAMES[i]
  out[#out + 1] = redis.call('ZCARD', key('q', m))
  out[#out + 1] = redis.call('SCARD', key('fl', m))
  local first = redis.call('ZRANGE', key('w', m), 0, 0)[1]
  local age = -1
  if first then age = now - tonumber(redis.call('HGET', key('t', first), 'since')) end
  out[#out + 1] = age
end
for i = at + 2 + K, #ARGV do out[#out + 1] = place(ARGV[i]) end
for _, v in ipairs(RECLAIMED) do out[#out + 1] = v end
return out
