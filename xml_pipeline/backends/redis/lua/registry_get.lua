-- registry_get.lua, run by xml_pipeline/backends/redis/backend.py (REGISTRY_GET): one
-- half of a registry entry, checked against the other half.
-- KEYS: the key read (P:uuid:<uuid> or P:chain:<chain>). ARGV: the other half's key
-- prefix, the name read (the uuid or the chain). Returns the value, or nil if the key
-- is missing; an error 'CORRUPTED <what>' when the other half is missing or names
-- something else (Redis lost half of the entry).
local value = redis.call('GET', KEYS[1])
if not value then
  return false
end
local back = ARGV[1] .. value
local name = redis.call('GET', back)
if name ~= ARGV[2] then
  local found = ' is missing'
  if name then
    found = ' maps to ' .. name
  end
  return redis.error_reply('CORRUPTED ' .. KEYS[1] .. ' maps to ' .. value .. ' but ' ..
                           back .. found)
end
return value
