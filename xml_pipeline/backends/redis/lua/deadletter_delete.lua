-- deadletter_delete.lua, run by xml_pipeline/backends/redis/backend.py (DEAD_LETTER_DELETE).
-- KEYS: ids, data. ARGV: id. Returns 1 if it existed.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
