-- write.lua, run by xml_pipeline/backends/redis/backend.py (WRITE), after lib_append.lua
-- and lib_registry.lua: the history appends and registry writes of one loop tick, in
-- one script call, in the order they were issued.
-- KEYS: stats. ARGV: max slots, ttl ms, refresh below (ms), then the key prefixes of
-- hist, hidx, uuid and chain keys, then the items, each one of
--   'a', thread, field, slot JSON after '{"i":0,'    append a slot (its index)
--   's', chain, uuid                                 registry_set (the uuid)
--   'd', chain, uuid                                 registry_setdefault (the uuid
--                                                    the chain maps to afterwards)
-- Returns one reply per item, in order: its result, or its own error reply (a frame
-- Redis lost half of is 'CORRUPTED <what>' for that item only; the others are written).
local max_slots, ttl, refresh_below = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local hist, hidx, uuids, chains = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local stats = KEYS[1]
local out = {}
local i = 8
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  local ok, reply
  if op == 'a' then
    local t = ARGV[i + 1]
    ok, reply = pcall(append_slot, hist .. t, hidx .. t, uuids .. t, stats, ARGV[i + 2],
                      ARGV[i + 3], max_slots, ttl, chains, refresh_below)
    i = i + 4
  else
    local chain, uuid = ARGV[i + 1], ARGV[i + 2]
    ok, reply = pcall(registry_set, chains .. chain, uuids .. uuid, chain, uuid, ttl,
                      chains, uuids, op == 'd')
    i = i + 3
  end
  if not ok then
    if type(reply) ~= 'table' then
      reply = {err = 'ERR ' .. tostring(reply)}
    end
  end
  out[#out + 1] = reply
end
return out
