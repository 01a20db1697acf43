-- publish.lua, run by xml_pipeline/transport/redis.py (PUBLISH): input accepted by the
-- organism, added to every target inbox at once, and once: the call carries a token
-- (the message's pump-unique cause) kept for a while, so that the call sent again
-- after its answer was lost adds nothing twice.
-- With a request() waiting, the cause's open counter starts at the number of entries
-- (see commit.lua).
-- KEYS: the token's key, the cause's open counter, then per entry its stream.
-- ARGV: the token's lifetime (ms), the counter's lifetime (ms, 0: no counter), then
-- per entry its field count and its fields and values.
-- Returns 1: added; 0: added already (by the same call, whose answer was lost).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
if ARGV[2] ~= '0' then
  redis.call('HSET', KEYS[2], 'n', #KEYS - 2)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local a = 3
for k = 3, #KEYS do
  local n = tonumber(ARGV[a])
  redis.call('XADD', KEYS[k], '*', unpack(ARGV, a + 1, a + 2 * n))
  a = a + 1 + 2 * n
end
return 1
