-- lib_append.lua: appending one history slot, shared by write.lua and commit.lua
-- (scripts.py puts this file in front of theirs). Keys: hist, hidx, the frame's uuid
-- key, stats; field "in:<id>"/"out:<id>"; tail = the slot's JSON after '{"i":0,';
-- max slots, ttl ms, the chain key prefix, refresh below (ms). Returns the slot's index
-- (the existing one when the field was appended before: idempotent by message id).
-- A frame that lost one of its two keys (hist holds more slots than hidx says were
-- written, or hist is gone while hidx says slots were written) is refused with an error
-- 'CORRUPTED <what>', and nothing of this slot is written: counting again from the
-- index hidx lacks would write duplicates and wrong indexes. The check costs nothing
-- more than a comparison: RPUSH answers the list's length, and the push is undone.
local function append_slot(hist, hidx, uuid_key, stats, field, tail, max_slots, ttl,
                           chain_prefix, refresh_below)
  local got = redis.call('HMGET', hidx, field, 'next')
  local index = got[1]
  local created = false  -- hist was made by this push: it has no TTL yet
  if index then
    index = tonumber(index)
  else
    index = tonumber(got[2] or '0')
    local kept = redis.call('RPUSH', hist, '{"i":' .. string.format('%d', index) .. ',' .. tail)
    if kept > index + 1 or (kept == 1 and index > 0) then
      redis.call('RPOP', hist)
      if not got[2] then
        error({err = 'CORRUPTED ' .. hist .. ' holds ' .. (kept - 1) .. ' slot(s) but ' ..
               hidx .. ', its index, is missing'})
      elseif kept == 1 then
        error({err = 'CORRUPTED ' .. hist .. ' is missing but ' .. hidx .. ' says ' ..
               index .. ' slot(s) were written'})
      end
      error({err = 'CORRUPTED ' .. hist .. ' holds ' .. (kept - 1) .. ' slot(s) but ' ..
             hidx .. ' says only ' .. index .. ' were written'})
    end
    created = kept == 1
    redis.call('HSET', hidx, field, index, '#' .. index, field, 'next', index + 1)
    local drop = kept - max_slots
    if drop > 0 then
      local oldest = index + 1 - kept
      redis.call('LTRIM', hist, drop, -1)
      for i = oldest, oldest + drop - 1 do
        local old = redis.call('HGET', hidx, '#' .. i)
        if old then
          redis.call('HDEL', hidx, old, '#' .. i)
        end
      end
      redis.call('HINCRBY', stats, 'slots_trimmed', drop)
    end
  end
  -- The registry entry is refreshed with the history, unless it was written lately
  -- (as a new frame's entry is, just before its first append): two commands fewer.
  if ttl > 0 and (created or redis.call('PTTL', hist) < refresh_below) then
    redis.call('PEXPIRE', hist, ttl)
    redis.call('PEXPIRE', hidx, ttl)
    if redis.call('PTTL', uuid_key) < refresh_below then
      local chain = redis.call('GET', uuid_key)
      if chain then
        redis.call('PEXPIRE', uuid_key, ttl)
        redis.call('PEXPIRE', chain_prefix .. chain, ttl)
      end
    end
  end
  return index
end
