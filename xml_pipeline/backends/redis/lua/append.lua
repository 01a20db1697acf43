-- append.lua, run by xml_pipeline/backends/redis/backend.py (APPEND).
-- KEYS: hist, hidx, uuid key, stats. ARGV: field, slot JSON after '{"i":0,', max slots,
-- ttl ms, chain key prefix, refresh below (ms). Returns the slot's index.
local hist, hidx = KEYS[1], KEYS[2]
local got = redis.call('HMGET', hidx, ARGV[1], 'next')
local index = got[1]
if index then
  index = tonumber(index)
else
  index = tonumber(got[2] or '0')
  local kept = redis.call('RPUSH', hist, '{"i":' .. string.format('%d', index) .. ',' .. ARGV[2])
  redis.call('HSET', hidx, ARGV[1], index, '#' .. index, ARGV[1], 'next', index + 1)
  local drop = kept - tonumber(ARGV[3])
  if drop > 0 then
    local oldest = index + 1 - kept
    redis.call('LTRIM', hist, drop, -1)
    for i = oldest, oldest + drop - 1 do
      local field = redis.call('HGET', hidx, '#' .. i)
      if field then
        redis.call('HDEL', hidx, field, '#' .. i)
      end
    end
    redis.call('HINCRBY', KEYS[4], 'slots_trimmed', drop)
  end
end
local ttl = tonumber(ARGV[4])
if ttl > 0 and redis.call('PTTL', hist) < tonumber(ARGV[6]) then
  redis.call('PEXPIRE', hist, ttl)
  redis.call('PEXPIRE', hidx, ttl)
  local chain = redis.call('GET', KEYS[3])
  if chain then
    redis.call('PEXPIRE', KEYS[3], ttl)
    redis.call('PEXPIRE', ARGV[5] .. chain, ttl)
  end
end
return index
