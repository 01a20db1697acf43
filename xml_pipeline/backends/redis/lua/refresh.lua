-- refresh.lua, run by xml_pipeline/transport/redis.py (REFRESH): a node's lease on
-- the entries it holds (read, not yet committed). Each entry still pending for this
-- consumer has its idle time reset (XCLAIM ... 0 JUSTID), so that other nodes do not
-- claim it while this node is alive; an entry another consumer took is left alone.
-- KEYS: the stream. ARGV: group, consumer, entry ids. Returns the ids still held.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local held = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if #pending > 0 and pending[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
