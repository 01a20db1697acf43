-- registry_set.lua, run by xml_pipeline/backends/redis/backend.py (REGISTRY_SET).
-- KEYS: chain key, uuid key. ARGV: chain, uuid, ttl ms, chain key prefix, uuid key
-- prefix, "1" for setdefault. Returns the uuid the chain maps to afterwards.
-- setdefault of a chain already mapped checks the other half of the entry first: a
-- uuid key that is missing or names another chain is an error 'CORRUPTED <what>'
-- (Redis lost half of the entry), not a frame handed out as if it were whole.
local current = redis.call('GET', KEYS[1])
if current and ARGV[6] == '1' then
  local back = ARGV[5] .. current
  local chain = redis.call('GET', back)
  if chain ~= ARGV[1] then
    local found = ' is missing'
    if chain then
      found = ' maps to another chain, ' .. chain
    end
    return redis.error_reply('CORRUPTED ' .. KEYS[1] .. ' maps to ' .. current .. ' but ' ..
                             back .. found)
  end
  return current
end
local chain, uuid = ARGV[1], ARGV[2]
if current and current ~= uuid then
  local other = ARGV[5] .. current
  if redis.call('GET', other) == chain then
    redis.call('DEL', other)
  end
end
local old = redis.call('GET', KEYS[2])
if old and old ~= chain then
  local other = ARGV[4] .. old
  if redis.call('GET', other) == uuid then
    redis.call('DEL', other)
  end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], uuid, 'PX', ttl)
  redis.call('SET', KEYS[2], chain, 'PX', ttl)
else
  redis.call('SET', KEYS[1], uuid)
  redis.call('SET', KEYS[2], chain)
end
return uuid
