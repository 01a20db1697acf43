-- leases.lua, run by xml_pipeline/transport/redis.py (LEASES): one round of a node's
-- leases on the shards of one listener's inbox. A shard (a stream) is read by one
-- consumer at a time, the one whose name its lease key holds, so that one frame's
-- messages (always in one shard) reach the listener in order across nodes.
-- Renews this consumer's leases; then, while it owns fewer than it wants, takes free
-- shards (whose lease expired or was given up) and, in the same step, takes over
-- every entry still pending there for another consumer (XAUTOCLAIM, idle or not):
-- from then on the former owner can neither read that shard nor commit what it held.
-- KEYS: the lease keys of the shards, then their streams, in shard order.
-- ARGV: group, consumer, lease ms, shards wanted.
-- Returns {owned shard numbers (0-based), shards taken in this round, entries claimed}.
local n = #KEYS / 2
local group, consumer, ms, want = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local owned, taken, free = {}, {}, {}
for i = 1, n do
  local owner = redis.call('GET', KEYS[i])
  if owner == consumer then
    redis.call('PEXPIRE', KEYS[i], ms)
    owned[#owned + 1] = i - 1
  elseif not owner then
    free[#free + 1] = i
  end
end
local claimed = 0
for _, i in ipairs(free) do
  if #owned >= want then
    break
  end
  redis.call('SET', KEYS[i], consumer, 'PX', ms)
  local start = '0-0'
  repeat
    local reply = redis.pcall('XAUTOCLAIM', KEYS[n + i], group, consumer, 0, start,
                              'COUNT', 1000, 'JUSTID')
    if type(reply) ~= 'table' or reply.err then
      break  -- no stream or group yet: nothing to take over
    end
    start = reply[1]
    claimed = claimed + #reply[2]
  until start == '0-0'
  owned[#owned + 1] = i - 1
  taken[#taken + 1] = i - 1
end
return {owned, taken, claimed}
