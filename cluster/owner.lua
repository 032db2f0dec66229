-- The pool's owner (cluster/owner.py says the model). ARGV: prefix, op, member id, then:
--   claim lease ms: {token, holder}: this member's new fencing token (one more than the
--         last owner's) when no one holds the lease (and when, by the server's clock, in
--         ``owner-since``), else 0 and the holder's id.
--   renew token, lease ms: 1 if the lease is still this token's (and is renewed), else 0.
--   fence token: 1 if the lease is this token's, else 0 (every pool action asks first).
--   resign token: the lease is given up if it is this token's.
--   publish token, lease ms, then model, servers pairs: the pool's servers (cluster/board.py)
--         replace those published, if the lease is this token's (1, else 0); they expire
--         with the lease unless published again (a dead owner's picture goes with it).
local P, OP, ID = ARGV[1], ARGV[2], ARGV[3]
local OWNER, TOKENS = P .. ':owner', P .. ':owner-token'
local holder = redis.call('GET', OWNER)
if OP == 'claim' then
  if holder then
    return {0, string.match(holder, '^(.*) %d+$')}
  end
  local token = redis.call('INCR', TOKENS)
  redis.call('SET', OWNER, ID .. ' ' .. token, 'PX', tonumber(ARGV[4]))
  local t = redis.call('TIME')
  redis.call('SET', P .. ':owner-since', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  return {token, ID}
end
local mine = holder == ID .. ' ' .. ARGV[4]
if OP == 'renew' then
  if mine then redis.call('PEXPIRE', OWNER, tonumber(ARGV[5])) return 1 end
  return 0
elseif OP == 'fence' then
  return mine and 1 or 0
elseif OP == 'publish' then
  if not mine then return 0 end
  local SERVERS = P .. ':servers'
  redis.call('DEL', SERVERS)
  for i = 6, #ARGV, 2 do redis.call('HSET', SERVERS, ARGV[i], ARGV[i + 1]) end
  redis.call('PEXPIRE', SERVERS, tonumber(ARGV[5]))
  return 1
elseif OP == 'resign' then
  if mine then redis.call('DEL', OWNER) end
  return 1
end
return redis.error_reply('unknown op ' .. OP)
