-- lib_registry.lua: writing a registry entry, for write.lua (scripts.py puts this file
-- in front of it). Keys: the chain key (P:chain:<chain>), the uuid key (P:uuid:<uuid>);
-- the chain, the uuid, ttl ms, the chain key prefix, the uuid key prefix, true for
-- setdefault. Returns the uuid the chain maps to afterwards.
-- setdefault of a chain already mapped checks the other half of the entry first: a
-- uuid key that is missing or names another chain is an error 'CORRUPTED <what>'
-- (Redis lost half of the entry), not a frame handed out as if it were whole.
local function registry_set(chain_key, uuid_key, chain, uuid, ttl, chain_prefix,
                            uuid_prefix, setdefault)
  local current = redis.call('GET', chain_key)
  if current and setdefault then
    local back = uuid_prefix .. current
    local found_chain = redis.call('GET', back)
    if found_chain ~= chain then
      local found = ' is missing'
      if found_chain then
        found = ' maps to another chain, ' .. found_chain
      end
      return redis.error_reply('CORRUPTED ' .. chain_key .. ' maps to ' .. current ..
                               ' but ' .. back .. found)
    end
    return current
  end
  if current and current ~= uuid then
    local other = uuid_prefix .. current
    if redis.call('GET', other) == chain then
      redis.call('DEL', other)
    end
  end
  local old = redis.call('GET', uuid_key)
  if old and old ~= chain then
    local other = chain_prefix .. old
    if redis.call('GET', other) == uuid then
      redis.call('DEL', other)
    end
  end
  if ttl > 0 then
    redis.call('SET', chain_key, uuid, 'PX', ttl)
    redis.call('SET', uuid_key, chain, 'PX', ttl)
  else
    redis.call('SET', chain_key, uuid)
    redis.call('SET', uuid_key, chain)
  end
  return uuid
end
