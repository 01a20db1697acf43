-- unlease.lua, run by xml_pipeline/transport/redis.py (UNLEASE): a node gives up its
-- lease on shards it no longer reads (it holds nothing of them any more), so that
-- another node takes them at once instead of after the lease's expiry.
-- KEYS: lease keys. ARGV: consumer. Returns how many were given up.
local given = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    given = given + 1
  end
end
return given
