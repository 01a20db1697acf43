-- get_slot.lua, run by xml_pipeline/backends/redis/backend.py (GET_SLOT).
-- KEYS: hist, hidx. ARGV: absolute index. Returns the slot bytes or nil; an error
-- 'CORRUPTED <what>' when hist holds more slots than hidx says were written (hidx lost,
-- say): the position of an index cannot be known then.
local next = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
local len = redis.call('LLEN', KEYS[1])
if next < len then
  return redis.error_reply('CORRUPTED ' .. KEYS[1] .. ' holds ' .. len .. ' slot(s) but ' ..
                           KEYS[2] .. ' says ' .. next .. ' were written')
end
local pos = tonumber(ARGV[1]) - (next - len)
if pos < 0 then
  return false
end
return redis.call('LINDEX', KEYS[1], pos)
