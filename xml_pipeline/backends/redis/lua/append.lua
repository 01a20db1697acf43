-- append.lua, run by xml_pipeline/backends/redis/backend.py (APPEND), after lib_append.lua.
-- KEYS: hist, hidx, uuid key, stats. ARGV: field, slot JSON after '{"i":0,', max slots,
-- ttl ms, chain key prefix, refresh below (ms). Returns the slot's index.
return append_slot(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]),
                   tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]))
