-- registry_delete.lua, run by xml_pipeline/backends/redis/backend.py (REGISTRY_DELETE).
-- KEYS: uuid key. ARGV: chain key prefix, uuid. Returns 1 if the entry existed.
local chain = redis.call('GET', KEYS[1])
if not chain then
  return 0
end
redis.call('DEL', KEYS[1])
local other = ARGV[1] .. chain
if redis.call('GET', other) == ARGV[2] then
  redis.call('DEL', other)
end
return 1
