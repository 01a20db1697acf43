-- deadletter_list.lua, run by xml_pipeline/backends/redis/backend.py (DEAD_LETTER_LIST),
-- after lib_deadletter.lua (KEYS: ids, data, seq, stats, ts).
-- ARGV: last rank (-1: all), TTL in ms (0: none). Drops the expired letters, then
-- returns the letters' JSON, oldest first.
dl_sync()
dl_expire(tonumber(ARGV[2]))
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  local data = redis.call('HGET', KEYS[2], id)
  if data then
    out[#out + 1] = data
  end
end
return out
