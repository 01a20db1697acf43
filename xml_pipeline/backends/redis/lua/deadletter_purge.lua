-- deadletter_purge.lua, run by xml_pipeline/backends/redis/backend.py (DEAD_LETTER_PURGE).
-- KEYS: ids, data. Returns how many there were.
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return n
