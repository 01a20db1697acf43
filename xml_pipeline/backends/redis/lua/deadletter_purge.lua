-- deadletter_purge.lua, run by xml_pipeline/backends/redis/backend.py
-- (DEAD_LETTER_PURGE), after lib_deadletter.lua (KEYS: ids, data, seq, stats, ts).
-- Returns how many there were.
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[5])
redis.call('HSET', KEYS[4], 'dead_letter_bytes', 0)
return n
