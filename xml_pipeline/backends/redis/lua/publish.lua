-- publish.lua, run by xml_pipeline/transport/redis.py (PUBLISH): input accepted by the
-- organism, added to every target inbox at once, and once: the call carries a token
-- (the message's pump-unique cause) kept for a while, so that the call sent again
-- after its answer was lost adds nothing twice.
-- KEYS: the token's key, then per entry its stream. ARGV: the token's lifetime (ms),
-- then per entry its field count and its fields and values.
-- Returns 1: added; 0: added already (by the same call, whose answer was lost).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local a = 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  redis.call('XADD', KEYS[k], '*', unpack(ARGV, a + 1, a + 2 * n))
  a = a + 1 + 2 * n
end
return 1
