-- lib_deadletter.lua: what every dead-letter script shares (loaded before it).
-- KEYS: ids (ZSET id -> sequence), data (HASH id -> letter JSON), seq, stats (HASH
-- of counters; 'dead_letter_bytes' is the length of every kept letter's JSON),
-- ts (ZSET id -> when it was written, ms by the server's clock).

local function dl_drop(id)
  local size = redis.call('HSTRLEN', KEYS[2], id)
  if redis.call('ZREM', KEYS[1], id) == 0 then
    return false
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('HINCRBY', KEYS[4], 'dead_letter_bytes', -size)
  return true
end

-- Drop (at most 1000 of) the letters written ttl_ms or longer ago; 0: none expire.
local function dl_expire(ttl_ms)
  if ttl_ms <= 0 then
    return 0
  end
  local t = redis.call('TIME')
  local limit = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl_ms
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', limit, 'LIMIT', 0, 1000)
  for _, id in ipairs(old) do
    if not dl_drop(id) then
      redis.call('ZREM', KEYS[5], id)
    end
  end
  if #old > 0 then
    redis.call('HINCRBY', KEYS[4], 'dead_letters_expired', #old)
  end
  return #old
end
