-- read.lua, run by xml_pipeline/transport/redis.py (READ): a node's read of its
-- inboxes, fenced by its leases. A shard is read (XREADGROUP) only while this
-- consumer's name is in its lease key, so that a node presumed dead (its lease
-- expired, another node took the shard) reads nothing more from it, even from a
-- read it had sent before it froze. Streams without a lease (the node's own reply
-- stream) are read always.
-- KEYS: per leased shard its lease key and its stream, then the unleased streams.
-- ARGV: group, consumer, count, number of leased shards, then one start per stream
-- (in KEYS order): '>' for new entries, or an id to page through what this consumer
-- holds already.
-- Returns {XREADGROUP's reply or false, streams whose lease is lost, marks}: when
-- nothing was read, marks lists per stream read from '>' the group's last delivered
-- id, to wait from (XREAD BLOCK) without taking anything.
local group, consumer, count, leased = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local streams, starts, lost = {}, {}, {}
for i = 1, leased do
  if redis.call('GET', KEYS[2 * i - 1]) == consumer then
    streams[#streams + 1] = KEYS[2 * i]
    starts[#starts + 1] = ARGV[4 + i]
  else
    lost[#lost + 1] = KEYS[2 * i]
  end
end
for j = 2 * leased + 1, #KEYS do
  streams[#streams + 1] = KEYS[j]
  starts[#starts + 1] = ARGV[4 + leased + j - 2 * leased]
end
if #streams == 0 then
  return {false, lost, {}}
end
local args = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS'}
for _, stream in ipairs(streams) do
  args[#args + 1] = stream
end
for _, start in ipairs(starts) do
  args[#args + 1] = start
end
local reply = redis.call(unpack(args))
if reply then
  return {reply, lost, {}}
end
local marks = {}
for k, stream in ipairs(streams) do
  if starts[k] == '>' then
    local mark = '0-0'
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local fields = {}
      for f = 1, #info, 2 do
        fields[info[f]] = info[f + 1]
      end
      if fields['name'] == group then
        mark = fields['last-delivered-id']
      end
    end
    marks[#marks + 1] = stream
    marks[#marks + 1] = mark
  end
end
return {false, lost, marks}
