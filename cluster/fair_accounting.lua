-- The tenants' order in each model's queue (kernel/fair_accounting.py's rules), on
-- accounting.lua: cluster/fair_accounting.py runs that script with this one before its ops.
-- This one replaces how a ticket is queued, chosen for a slot and handed it, dropped,
-- registered again and placed (locals of accounting.lua: its functions and ops call these).
-- The op's arguments begin with the tenants: their count n, gateway.max_priority_wait in ms,
-- n x (name, priority, 1 / weight, max_concurrent or 0); then the op's own, where join and each
-- ticket of a beat also name its tenant. In Redis besides: per model, the tenants with waiters in the order
-- they began to wait (sh), each one's waiters (tw) and virtual time (vt), each priority's
-- clock (clk); per tenant, the model slots it holds over every model (held) and its tickets,
-- queued or holding slots (count).
local NT, MAXWAIT = tonumber(A[1]), tonumber(A[2])
local TENANTS = {}
for i = 3, 2 + 4 * NT, 4 do
  TENANTS[A[i]] = {tonumber(A[i + 1]), tonumber(A[i + 2]), tonumber(A[i + 3])}
end
local ARGS = {}
for i = 3 + 4 * NT, K do ARGS[#ARGS + 1] = A[i] end
A = ARGS
LIVE = 4
local HELD, COUNT = P .. ':held', P .. ':count'
-- A tenant this caller's configuration lacks: priority 0, weight 1, no bound of its own.
local UNKNOWN = {0, 1, 0}

local function tenant(n) return TENANTS[n] or UNKNOWN end

-- Whether the tenant holds fewer model slots than its max_concurrent.
local function room(n)
  local bound = tenant(n)[3]
  return bound == 0 or tonumber(redis.call('HGET', HELD, n) or '0') < bound
end

local function line(m, n) return key('tw', #m .. ':' .. m .. ':' .. n) end

local fifo_queue = queue
queue = function(id, m, owner, since, n)
  fifo_queue(id, m, owner, since)
  redis.call('HSET', key('t', id), 'n', n)
  redis.call('HINCRBY', COUNT, n, 1)
  -- A tenant that begins to wait starts at its priority's clock: neither saved up nor owing.
  if redis.call('ZADD', key('sh', m), 'NX', redis.call('ZSCORE', key('w', m), id), n) == 1 then
    redis.call('HSET', key('vt', m), n, redis.call('HGET', key('clk', m), tenant(n)[1]) or 0)
  end
  redis.call('ZADD', line(m, n), redis.call('ZSCORE', key('w', m), id), id)
end

local function leave_line(id, m, n)
  redis.call('ZREM', line(m, n), id)
  if redis.call('EXISTS', line(m, n)) == 0 then
    redis.call('ZREM', key('sh', m), n)
    redis.call('HDEL', key('vt', m), n)
  end
end

-- The first waiter of a lower priority than the best that has waited MAXWAIT and whose tenant
-- has room, or nil.
local function aged(m, best)
  local horizon, from = now - MAXWAIT, 0
  while true do
    local ids = redis.call('ZRANGE', key('w', m), from, from + 15)
    if #ids == 0 then return nil end
    for _, id in ipairs(ids) do
      local h = redis.call('HMGET', key('t', id), 'since', 'n')
      if tonumber(h[1]) > horizon then return nil end
      if tenant(h[2])[1] < best and room(h[2]) then return id end
    end
    from = from + 16
  end
end

-- The waiter the rules grant the model's next slot to; nil: every waiter's tenant is at its
-- bound.
next_waiter = function(m)
  local best, bp, bv, lowest
  for _, n in ipairs(redis.call('ZRANGE', key('sh', m), 0, -1)) do
    if room(n) then
      local p = tenant(n)[1]
      local v = tonumber(redis.call('HGET', key('vt', m), n))
      if not lowest or p < lowest then lowest = p end
      if not best or p > bp or (p == bp and v < bv) then best, bp, bv = n, p, v end
    end
  end
  if not best then return nil end
  if lowest < bp then
    local id = aged(m, bp)
    if id then return id end
  end
  return redis.call('ZRANGE', line(m, best), 0, 0)[1]
end

-- The waiter the rules chose is handed its slot: its tenant's virtual time moves on.
local fifo_unwait = unwait
unwait = function(id, m)
  local n = redis.call('HGET', key('t', id), 'n')
  local v = tonumber(redis.call('HGET', key('vt', m), n))
  redis.call('HSET', key('clk', m), tenant(n)[1], v)
  redis.call('HSET', key('vt', m), n, v + tenant(n)[2])
  leave_line(id, m, n)
  redis.call('HINCRBY', HELD, n, 1)
  fifo_unwait(id, m)
end

-- Its tenant's counts go with it; a tenant that was at its bound may go on every model.
local fifo_drop = drop
drop = function(id)
  local h = redis.call('HMGET', key('t', id), 'm', 'st', 'n')
  local m, n = h[1], h[3]
  if not m then return end
  redis.call('HINCRBY', COUNT, n, -1)
  local bounded = false
  if h[2] == 'q' then
    leave_line(id, m, n)
  else
    bounded = redis.call('HINCRBY', HELD, n, -1) + 1 == tenant(n)[3]
  end
  fifo_drop(id)
  if bounded then
    for i = 1, NM do hand_out(NAMES[i]) end
  end
end

-- The model's queued tickets in the order the rules would grant them, as of now: those holding
-- its slot (waiting for a shared one), those aged, then each tenant's waiters one by one in the
-- order of the virtual times they would have. id -> place.
local function order(m)
  local at, placed = {}, 0
  local holding = redis.call('SDIFF', key('slot', m), key('fl', m))
  local rank = {}
  for _, id in ipairs(holding) do rank[id] = tonumber(redis.call('ZSCORE', key('q', m), id)) end
  table.sort(holding, function(a, b) return rank[a] < rank[b] end)
  for _, id in ipairs(holding) do placed = placed + 1; at[id] = placed end
  local shares, top = {}, nil
  for _, n in ipairs(redis.call('ZRANGE', key('sh', m), 0, -1)) do
    local t = tenant(n)
    shares[#shares + 1] = {p = t[1], step = t[2], k = 1, ids = redis.call('ZRANGE', line(m, n), 0, -1),
                           v = tonumber(redis.call('HGET', key('vt', m), n))}
    if not top or t[1] > top then top = t[1] end
  end
  if not top then return at end
  local horizon = now - MAXWAIT
  for _, id in ipairs(redis.call('ZRANGE', key('w', m), 0, -1)) do
    local h = redis.call('HMGET', key('t', id), 'since', 'n')
    if tonumber(h[1]) > horizon then break end
    if tenant(h[2])[1] < top then placed = placed + 1; at[id] = placed end
  end
  while true do
    local best
    for _, s in ipairs(shares) do
      if s.k <= #s.ids and (not best or s.p > best.p or (s.p == best.p and s.v < best.v)) then
        best = s
      end
    end
    if not best then return at end
    local id = best.ids[best.k]
    best.k, best.v = best.k + 1, best.v + best.step
    if not at[id] then placed = placed + 1; at[id] = placed end
  end
end

local fifo_register = register
register = function(owner, i)
  local n = A[i + 3]
  if A[i + 2] == '1' then
    fifo_register(owner, i)
    redis.call('HSET', key('t', A[i]), 'n', n)
    redis.call('HINCRBY', HELD, n, 1)
    redis.call('HINCRBY', COUNT, n, 1)
  else
    queue(A[i], A[i + 1], owner, now, n)
  end
end

local orders = {}
place = function(id)
  local m = redis.call('HGET', key('t', id), 'm')
  if not m then return 0 end
  if not orders[m] then orders[m] = order(m) end
  return orders[m][id] or 0
end
