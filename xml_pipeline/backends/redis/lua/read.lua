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
-- In chunks: unpack() of one command takes at most a few thousand values.
local reply = false
for first = 1, #streams, 500 do
  local last = math.min(first + 499, #streams)
  local args = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS'}
  for k = first, last do
    args[#args + 1] = streams[k]
  end
  for k = first, last do
    args[#args + 1] = starts[k]
  end
  local part = redis.call(unpack(args))
  if part then
    reply = reply or {}
    for _, item in ipairs(part) do
      reply[#reply + 1] = item
    end
  end
end
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
