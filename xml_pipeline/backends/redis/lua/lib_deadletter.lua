-- lib_deadletter.lua: what every dead-letter script shares (loaded before it).
-- KEYS: ids (ZSET id -> sequence), data (HASH id -> letter JSON), seq, stats (HASH
-- of counters; 'dead_letter_bytes' is the length of every kept letter's JSON),
-- ts (ZSET id -> when it was written, ms by the server's clock).

local function dl_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Letters kept by a release before the budget and the TTL have no byte count and no
-- time: both are made once, the first time a script runs (the time: now).
local function dl_sync()
  if redis.call('HEXISTS', KEYS[4], 'dead_letter_bytes') == 1 then
    return
  end
  local used, now = 0, dl_now_ms()
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    used = used + redis.call('HSTRLEN', KEYS[2], id)
    if not redis.call('ZSCORE', KEYS[5], id) then
      redis.call('ZADD', KEYS[5], now, id)
    end
  end
  redis.call('HSET', KEYS[4], 'dead_letter_bytes', used)
end

local function dl_drop(id)
  local size = redis.call('HSTRLEN', KEYS[2], id)
  if redis.call('ZREM', KEYS[1], id) == 0 then
    return false
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[5], id)
  if redis.call('HINCRBY', KEYS[4], 'dead_letter_bytes', -size) < 0 then
    redis.call('HSET', KEYS[4], 'dead_letter_bytes', 0)
  end
  return true
end

-- Drop (at most 1000 of) the letters written ttl_ms or longer ago; 0: none expire.
local function dl_expire(ttl_ms)
  if ttl_ms <= 0 then
    return 0
  end
  local limit = dl_now_ms() - ttl_ms
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', limit, 'LIMIT', 0, 1000)
  local dropped = 0
  for _, id in ipairs(old) do
    if dl_drop(id) then
      dropped = dropped + 1
    else
      redis.call('ZREM', KEYS[5], id)
    end
  end
  if dropped > 0 then
    redis.call('HINCRBY', KEYS[4], 'dead_letters_expired', dropped)
  end
  return dropped
end
