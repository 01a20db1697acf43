-- commit.lua, run by xml_pipeline/transport/redis.py (COMMIT), after lib_append.lua:
-- the end of one delivery, all or nothing. If this consumer still owns the input entry
-- (the fence: it is pending in the group for this consumer), append the history slots
-- (idempotent by message id), add every output to its stream, acknowledge the input
-- and delete it from its stream. Otherwise change nothing.
-- When a request() waits for the conversation (its cause has an open counter), the
-- counter of messages its input caused that are still in the organism moves by the
-- deliveries this one made, minus itself; at 0 with no reply sent, the waiting node
-- is told (an entry k=n in its reply stream): the conversation ended without a reply.
-- KEYS: input stream, stats, then per slot hist, hidx, uuid key, then per output its
-- stream, then the cause's open counter and the waiting node's reply stream.
-- ARGV: group, entry id, consumer, max slots, ttl ms, chain key prefix,
-- refresh below (ms), slot count, output count, then per slot its field and JSON tail,
-- then per output its field count and the fields and values, then the cause ('' for
-- none), the deliveries made and 1 if a reply was sent.
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
local cause = ARGV[a]
if cause and cause ~= '' and redis.call('EXISTS', KEYS[k]) == 1 then
  local open = KEYS[k]
  if ARGV[a + 2] == '1' then
    redis.call('HSET', open, 'r', 1)
  end
  local left = redis.call('HINCRBY', open, 'n', tonumber(ARGV[a + 1]) - 1)
  if left <= 0 then
    -- (not to a reply stream gone with its client: it would be made again, for ever)
    if redis.call('HGET', open, 'r') ~= '1' and redis.call('EXISTS', KEYS[k + 1]) == 1 then
      redis.call('XADD', KEYS[k + 1], '*', 'k', 'n', 'c', cause)
    end
    redis.call('DEL', open)
  end
end
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
return 1
