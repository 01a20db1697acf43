-- deadletter_add.lua, run by xml_pipeline/backends/redis/backend.py (DEAD_LETTER_ADD).
-- KEYS: ids, data, seq, stats. ARGV: max dead letters, then (id, letter JSON) pairs,
-- stored in order. An id already stored is overwritten in place (so a retry stores
-- nothing twice). Returns {letters dropped by this call, total dropped so far}.
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), ARGV[i])
  end
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then
  return {0, 0}
end
local old = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[2], id)
end
return {excess, redis.call('HINCRBY', KEYS[4], 'dead_letters_dropped', excess)}
