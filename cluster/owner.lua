-- The pool's owner (cluster/owner.py says the model). ARGV: prefix, op, member id, then:
--   claim lease ms: {token, holder}: this member's new fencing token (one more than the
--         last owner's) when no one holds the lease, else 0 and the holder's id.
--   renew token, lease ms: 1 if the lease is still this token's (and is renewed), else 0.
--   fence token: 1 if the lease is this token's, else 0 (every pool action asks first).
--   resign token: the lease is given up if it is this token's.
local P, OP, ID = ARGV[1], ARGV[2], ARGV[3]
local OWNER, TOKENS = P .. ':owner', P .. ':owner-token'
local holder = redis.call('GET', OWNER)
if OP == 'claim' then
  if holder then
    return {0, string.match(holder, '^(.*) %d+$')}
  end
  local token = redis.call('INCR', TOKENS)
  redis.call('SET', OWNER, ID .. ' ' .. token, 'PX', tonumber(ARGV[4]))
  return {token, ID}
end
local mine = holder == ID .. ' ' .. ARGV[4]
if OP == 'renew' then
  if mine then redis.call('PEXPIRE', OWNER, tonumber(ARGV[5])) return 1 end
  return 0
elseif OP == 'fence' then
  return mine and 1 or 0
elseif OP == 'resign' then
  if mine then redis.call('DEL', OWNER) end
  return 1
end
return redis.error_reply('unknown op ' .. OP)
