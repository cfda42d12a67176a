"""The Lua scripts of the Redis stores (`redis`): each operation is one script, so it is atomic
and costs one round trip.

`RESERVE` and `SETTLE` are `rate_budget.RateBudget.reserve` and `.settle` (with its `Headroom`)
on a hash per (workspace, pool), a sorted set of the calls under way, each with a lease (named
`<party>.<token>` for the fair share), and a hash of when each party last waited; they
change together with that class and are held to the same tests. RESERVE may also lend a process
several calls at once, which `RELEASE` gives back when unused (`redis.RedisBudgets`). `CLAIM`,
`MARK` and `KEEP` are `idempotency.ResultStore`'s operations on a hash per (tenant, key,
batch); `BEAT` is a process's heartbeat and the check that Redis still holds what it kept;
`ACCEPT` sets a new generation after an operator acknowledged a loss.
"""

from __future__ import annotations

from typing import Final

RESERVE: Final = """
local now = tonumber(ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'paused', 'reset', 'left', 'limit', 'ours')
local paused = tonumber(b[1]) or 0
if paused > now then return {'spent', string.format('%.17g', paused)} end
local reset = tonumber(b[2]) or 0
local left = tonumber(b[3]) or 0
local limit = tonumber(b[4]) or 0
local ours = tonumber(b[5]) or 0
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local under = redis.call('ZCARD', KEYS[2])
if reset > 0 and reset <= now then
  reset = 0
  left = math.max(limit, 0)
  ours = under
  redis.call('HSET', KEYS[1], 'reset', '0', 'left', string.format('%d', left),
    'ours', string.format('%d', ours))
end
local known = reset > 0 or left > 0
local room = nil
if known then
  room = left
elseif limit == 0 then
  room = 1
end
if known and ARGV[6] == '1' then
  local l = math.max(limit, 0)
  local lane = tonumber(ARGV[11]) + math.ceil(tonumber(ARGV[12]) * l)
  room = left - tonumber(ARGV[7]) - math.ceil(tonumber(ARGV[8]) * l) - lane
  local cap = nil
  if tonumber(ARGV[9]) > 0 then
    cap = tonumber(ARGV[9])
  elseif tonumber(ARGV[10]) < 1 and l > 0 then
    cap = math.floor(tonumber(ARGV[10]) * l)
  end
  if cap then room = math.min(room, cap - lane - ours + under) end
  if under == 0 and room <= 0 and reset > 0 then return {'spent', string.format('%.17g', reset)} end
end
local party = ARGV[13]
local over = false
local rivals = 0
if party ~= '0' and room then
  local recent = now - tonumber(ARGV[14])
  local lane = tonumber(party) % 2
  local mine, active, waited = 0, {}, {}
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local p = string.match(m, '^(%d+)%.')
    if p == party then mine = mine + 1 elseif p then active[p] = true end
  end
  local w = redis.call('HGETALL', KEYS[3])
  for i = 1, #w, 2 do
    if tonumber(w[i + 1]) > recent then
      if w[i] ~= party then active[w[i]] = true; waited[w[i]] = true end
    else
      redis.call('HDEL', KEYS[3], w[i])
    end
  end
  local n, contended = 0, false
  for p, _ in pairs(active) do
    if tonumber(p) % 2 == lane then
      n = n + 1
      if waited[p] then contended = true end
    end
  end
  over = contended and mine >= math.max(1, math.ceil(room / (n + 1)))
  rivals = n
end
if room and (under >= room or over) then
  if party ~= '0' then
    redis.call('HSET', KEYS[3], party, string.format('%.17g', now))
    redis.call('EXPIRE', KEYS[3], ARGV[5])
  end
  local again = now + tonumber(ARGV[4])
  if reset > 0 then again = math.min(reset, again) end
  return {'held', string.format('%.17g', again)}
end
local n = 1
if tonumber(ARGV[15]) > 1 and rivals == 0 then
  n = tonumber(ARGV[15])
  if room then n = math.max(1, math.min(n, math.floor((room - under) / tonumber(ARGV[17])))) end
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
for i = 1, n - 1 do redis.call('ZADD', KEYS[2], ARGV[16], ARGV[2] .. '/' .. i) end
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'ours', string.format('%d', ours + n))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {'go', string.format('%d', ours + 1), n}
"""
"""A call that may start is counted as under way (a member of the calls' sorted set, with its
lease). A reserve may ask for ARGV[15] calls at once, a lease: it gets them only while no other
party of its lane is active and the room left after the calls under way is at least ARGV[17]
times as many, else one; the others are named `<token>/<i>` (the party's, for the fair share) and
lapse at ARGV[16]. Each is a call under way and one of ours, exactly as if reserved one by one."""


RELEASE: Final = """
local n = redis.call('ZREM', KEYS[2], unpack(ARGV))
local ours = tonumber(redis.call('HGET', KEYS[1], 'ours')) or 0
if n > 0 and ours > 0 then redis.call('HSET', KEYS[1], 'ours', string.format('%d', math.max(0, ours - n))) end
return n
"""
"""Calls reserved and never made (a lease's unused calls): no longer under way, nor ours."""


SETTLE: Final = """
local check, most, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local latest, paused = 0, 0
for i = 4, #ARGV, 8 do
  redis.call('ZREM', KEYS[2], ARGV[i])
  local now = tonumber(ARGV[i + 1])
  latest = math.max(latest, now)
  local b = redis.call('HMGET', KEYS[1], 'paused', 'reset', 'left', 'limit')
  paused = tonumber(b[1]) or 0
  if ARGV[i + 7] == '1' then
    local ours = tonumber(redis.call('HGET', KEYS[1], 'ours')) or 0
    if ours > 0 then redis.call('HSET', KEYS[1], 'ours', string.format('%d', ours - 1)) end
  end
  if ARGV[i + 2] == '1' then
    local status = tonumber(ARGV[i + 3])
    local limit = tonumber(ARGV[i + 6])
    if limit and limit > 0 then
      redis.call('HSET', KEYS[1], 'limit', string.format('%d', limit))
    elseif (tonumber(b[4]) or 0) == 0 and status >= 200 and status < 300 then
      redis.call('HSET', KEYS[1], 'limit', '-1')
    end
    local remaining = tonumber(ARGV[i + 4])
    local reset = tonumber(ARGV[i + 5])
    if remaining and reset and reset > now then
      local current = tonumber(b[2]) or 0
      if reset > current then
        if current > 0 then
          redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
          redis.call('HSET', KEYS[1], 'ours', string.format('%d', redis.call('ZCARD', KEYS[2])))
        end
        redis.call('HSET', KEYS[1], 'reset', string.format('%d', reset),
          'left', string.format('%d', remaining))
      elseif reset == current then
        redis.call('HSET', KEYS[1], 'left', string.format('%d', math.min(tonumber(b[3]) or 0, remaining)))
      end
    end
    if (status == 429 or remaining == 0) and reset and reset > now then
      paused = math.max(paused, math.min(reset, now + most))
      redis.call('HSET', KEYS[1], 'paused', string.format('%.17g', paused))
    end
    redis.call('EXPIRE', KEYS[1], ttl)
  end
end
local said = '0'
if paused > latest then said = string.format('%.17g', paused) end
if check ~= '1' then return {said} end
local w = redis.call('HMGET', KEYS[1], 'reset', 'left', 'limit', 'ours')
local under = redis.call('ZCOUNT', KEYS[2], '(' .. string.format('%.17g', latest), '+inf')
return {said, w[1] or '0', w[2] or '0', w[3] or '0', w[4] or '0', under}
"""
"""Calls ended, in the order they ended, each exactly as if settled alone (ARGV[1..3]: whether to
return the state below, the longest pause, the pool's TTL; then 8 per call: its token, the
clock, whether Braze responded, the status, x-ratelimit-remaining, -reset and -limit, and '1' if
it was never made): no longer under way (and, not made, not ours), what each reply tells learnt.
Returns the pause's end or '0', and with ARGV[1] = '1' what a process that holds a lease checks
it against: the window's reset, left, limit, ours and the calls under way. One script for the
settles of one pool that wait together (`redis.RedisBudgets`): one round trip for them all."""


CLAIM: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[8] then
  redis.call('SET', KEYS[2], 'lost')
  return {'refused'}
end
local v = redis.call('HMGET', KEYS[1], 'digest', 'owner', 'at', 'kept', 'sending')
if not v[1] then
  redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'owner', ARGV[1], 'at', ARGV[3], 'token', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'claimed'}
end
if v[1] ~= ARGV[2] then
  if v[4] then return {'mismatch', v[4]} end
  return {'mismatch'}
end
if v[4] then return {'kept', v[4]} end
local alive = v[2] == ARGV[1] or redis.call('EXISTS', ARGV[6] .. v[2]) == 1
if alive and tonumber(v[3]) + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return {'busy'} end
if not v[5] then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', ARGV[3], 'token', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'reclaimed'}
end
redis.call('HSET', KEYS[1], 'kept', '')
return {'lost'}
"""


MARK: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  redis.call('SET', KEYS[2], 'lost')
  return 'refused'
end
local v = redis.call('HMGET', KEYS[1], 'token', 'kept')
if v[1] ~= ARGV[1] or v[2] then return 'taken' end
redis.call('HSET', KEYS[1], 'sending', '1')
return 'ok'
"""


KEEP: Final = """
local v = redis.call('HMGET', KEYS[1], 'token', 'kept')
if ARGV[3] == '0' then
  if v[1] == ARGV[2] and not v[2] then redis.call('DEL', KEYS[1]) end
  return 0
end
if v[1] and v[1] ~= ARGV[2] and not v[2] then return 0 end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'kept', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


BEAT: Final = """
local m = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if not m then
    m = ARGV[2]
    redis.call('SET', KEYS[1], m)
  end
elseif m ~= ARGV[1] and not (ARGV[1] == 'lost' and m) then
  m = 'lost'
  redis.call('SET', KEYS[1], m)
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return m
"""
"""The heartbeat, and the check that Redis still holds what it kept. `cgw:generation` names
what Redis holds: set by the first gateway that finds none, remembered by each process. Gone
or changed under a running process, Redis lost its data (it restarted without it): the process
sets it to `lost`, and every gateway refuses keys until an operator sets a new generation
(`canvas-gateway-server --accept-lost-keys`), which a refusing process adopts. Claims and marks
check it too, in their own round trip, so none is made in an emptied Redis."""


ACCEPT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
"""A new generation, only in place of `lost` (two operators at once make one)."""
