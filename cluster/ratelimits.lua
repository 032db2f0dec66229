-- The tenants' rate windows and usage of every process sharing a key prefix
-- (cluster/ratelimits.py says the model). Times are the Redis server's (TIME).
-- ARGV: prefix, op, then the op's arguments:
--   admit tenant rpm tpm (0: no such limit) -> {admitted, now ms, requests steps, tokens steps}
--   record tenant model count_request prompt completion error wait_ms -> 1
--   report tenant... -> per tenant {requests in its window, tokens in its window, usage}
-- A window is a hash of (second -> use) for the seconds of the last minute; steps are flat
-- lists {second, use, ...}; usage is a hash of (model TAB field -> sum).
local P = ARGV[1]
local OP = ARGV[2]
local WINDOW = 60
local t = redis.call('TIME')
local second = tonumber(t[1])
local now = second * 1000 + math.floor(tonumber(t[2]) / 1000)

local function key(tenant, kind) return P .. ':rate:' .. tenant .. ':' .. kind end

-- The window's live steps (the older ones dropped), and their sum.
local function steps(k)
  local flat = redis.call('HGETALL', k)
  local live, old, sum = {}, {}, 0
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) <= second - WINDOW then
      old[#old + 1] = flat[i]
    else
      live[#live + 1] = tonumber(flat[i])
      live[#live + 1] = tonumber(flat[i + 1])
      sum = sum + tonumber(flat[i + 1])
    end
  end
  if #old > 0 then redis.call('HDEL', k, unpack(old)) end
  return live, sum
end

local function add(k, n)
  if n > 0 then
    redis.call('HINCRBY', k, second, n)
    redis.call('EXPIRE', k, WINDOW + 1)
  end
end

if OP == 'admit' then
  local tenant, rpm, tpm = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local rk = key(tenant, 'r')
  local requests, used = steps(rk)
  local tokens, spent = steps(key(tenant, 't'))
  if (rpm > 0 and used >= rpm) or (tpm > 0 and spent >= tpm) then
    return {0, now, requests, tokens}
  end
  add(rk, 1)
  requests = steps(rk)
  return {1, now, requests, tokens}
elseif OP == 'record' then
  local tenant, model = ARGV[3], ARGV[4]
  add(key(tenant, 'r'), tonumber(ARGV[5]))
  add(key(tenant, 't'), tonumber(ARGV[6]) + tonumber(ARGV[7]))
  local use = key(tenant, 'use')
  local figures = {requests = 1, prompt_tokens = ARGV[6], completion_tokens = ARGV[7],
                   errors = ARGV[8], queue_wait_ms = ARGV[9]}
  for field, n in pairs(figures) do
    if tonumber(n) > 0 then redis.call('HINCRBY', use, model .. '\t' .. field, n) end
  end
  return 1
elseif OP == 'report' then
  local out = {}
  for i = 3, #ARGV do
    local _, requests = steps(key(ARGV[i], 'r'))
    local _, tokens = steps(key(ARGV[i], 't'))
    out[#out + 1] = {requests, tokens, redis.call('HGETALL', key(ARGV[i], 'use'))}
  end
  return out
end
return redis.error_reply('unknown op ' .. tostring(OP))
