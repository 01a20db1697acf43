-- commit.lua, run by xml_pipeline/transport/redis.py (COMMIT), after lib_append.lua:
-- the end of one delivery, all or nothing. If this consumer still owns the input entry
-- (the fence: it is pending in the group for this consumer), append the history slots
-- (idempotent by message id), add every output to its stream, acknowledge the input
-- and delete it from its stream. Otherwise change nothing.
-- KEYS: input stream, stats, then per slot hist, hidx, uuid key, then per output its
-- stream. ARGV: group, entry id, consumer, max slots, ttl ms, chain key prefix,
-- refresh below (ms), slot count, output count, then per slot its field and JSON tail,
-- then per output its field count and the fields and values.
-- Returns 1: committed; 0: the entry is pending for another consumer (claimed);
-- -1: the entry is not pending at all (acknowledged already, or never delivered).
local stream, stats = KEYS[1], KEYS[2]
local group, entry, consumer = ARGV[1], ARGV[2], ARGV[3]
local pending = redis.call('XPENDING', stream, group, entry, entry, 1)
if #pending == 0 then
  return -1
end
if pending[1][2] ~= consumer then
  return 0
end
local max_slots, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local chain_prefix, refresh_below = ARGV[6], tonumber(ARGV[7])
local slots, outputs = tonumber(ARGV[8]), tonumber(ARGV[9])
local k, a = 3, 10
for _ = 1, slots do
  append_slot(KEYS[k], KEYS[k + 1], KEYS[k + 2], stats, ARGV[a], ARGV[a + 1], max_slots,
              ttl, chain_prefix, refresh_below)
  k, a = k + 3, a + 2
end
for _ = 1, outputs do
  local n = tonumber(ARGV[a])
  redis.call('XADD', KEYS[k], '*', unpack(ARGV, a + 1, a + 2 * n))
  k, a = k + 1, a + 1 + 2 * n
end
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
return 1
