-- deadletter_add.lua, run by xml_pipeline/backends/redis/backend.py (DEAD_LETTER_ADD),
-- after lib_deadletter.lua (KEYS: ids, data, seq, stats, ts).
-- ARGV: max dead letters, byte budget, TTL in ms (0: none), then per letter: id,
-- letter JSON, its sample's JSON ('' if it is kept whole past the budget), code.
-- Stored in order; an id already stored is overwritten in place (so a retry stores
-- nothing twice). Returns {letters dropped by this call, total dropped so far,
-- letters cut to their sample by this call, total cut so far}.
dl_sync()
dl_expire(tonumber(ARGV[3]))
local budget = tonumber(ARGV[2])
local used = tonumber(redis.call('HGET', KEYS[4], 'dead_letter_bytes') or '0')
if redis.call('ZCARD', KEYS[1]) == 0 then
  used = 0 -- nothing kept: start the count afresh
end
local now = dl_now_ms()
local cut = 0
for i = 4, #ARGV, 4 do
  local id, letter, sample = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = 0
  if redis.call('HEXISTS', KEYS[2], id) == 1 then
    old = redis.call('HSTRLEN', KEYS[2], id)
  else
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), id)
    redis.call('ZADD', KEYS[5], now, id)
  end
  if sample ~= '' and used - old + #letter > budget then
    letter = sample
    cut = cut + 1
    redis.call('HINCRBY', KEYS[4], 'dead_letters_over_budget:' .. ARGV[i + 3], 1)
  end
  redis.call('HSET', KEYS[2], id, letter)
  used = used - old + #letter
end
redis.call('HSET', KEYS[4], 'dead_letter_bytes', used)
local total_cut = 0
if cut > 0 then
  total_cut = redis.call('HINCRBY', KEYS[4], 'dead_letters_over_budget', cut)
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then
  return {0, 0, cut, total_cut}
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
  dl_drop(id)
end
return {excess, redis.call('HINCRBY', KEYS[4], 'dead_letters_dropped', excess), cut, total_cut}
