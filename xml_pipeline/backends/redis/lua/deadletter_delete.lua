-- deadletter_delete.lua, run by xml_pipeline/backends/redis/backend.py
-- (DEAD_LETTER_DELETE), after lib_deadletter.lua (KEYS: ids, data, seq, stats, ts).
-- ARGV: id. Returns 1 if it existed.
dl_sync()
if dl_drop(ARGV[1]) then
  return 1
end
return 0
