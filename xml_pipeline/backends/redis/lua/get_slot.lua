-- get_slot.lua, run by xml_pipeline/backends/redis/backend.py (GET_SLOT).
-- KEYS: hist, hidx. ARGV: absolute index. Returns the slot bytes or nil.
local next = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
local pos = tonumber(ARGV[1]) - (next - redis.call('LLEN', KEYS[1]))
if pos < 0 then
  return false
end
return redis.call('LINDEX', KEYS[1], pos)
