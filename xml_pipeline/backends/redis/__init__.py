"""The Redis backend: histories, registry and dead letters shared by several processes.

``redis://[[user]:[password]@]HOST:PORT/DB`` (also ``rediss://``, Redis over TLS, and
``unix:///PATH?db=DB``, Redis over a unix socket), on
``redis.asyncio`` with the hiredis parser. Only this package imports ``redis``.

Key layout (``P`` is the prefix, ``xml_pipeline`` by default; ids and chains are UTF-8)::

    P:hist:<thread>   LIST    the frame's kept slots, oldest first; each item is
                              exactly slot_to_bytes(slot) with its assigned index
    P:hidx:<thread>   HASH    "in:<message id>" / "out:<message id>" -> absolute index
                              "#<index>"   -> that slot's "in:/out:" field (for trimming)
                              "next"       -> the next index (next - LLEN were trimmed)
    P:chain:<chain>   STRING  the uuid of a chain      } a frame's registry entry: two
    P:uuid:<uuid>     STRING  the chain of a uuid      } keys, written together
    P:dl:ids          ZSET    dead-letter ids, scored by P:dl:seq (oldest first)
    P:dl:data         HASH    dead-letter id -> dead_letter_to_bytes(letter)
    P:dl:seq          STRING  the dead-letter sequence (INCR)
    P:dl:ts           ZSET    dead-letter ids, scored by when they were written (ms)
    P:stats           HASH    slots_trimmed, dead_letter_bytes (the JSON kept in
                              P:dl:data), dead_letters_dropped, _expired,
                              _over_budget and _over_budget:<code>

Everything stored is the documented JSON of :mod:`~xml_pipeline.backends.base` or plain
text: nothing is pickled. Appending (idempotency check, index, push, trimming past
``max_slots_per_thread``, TTL refresh of the frame's history *and* registry entry) is
done by a Lua script, run with EVALSHA (EVAL when the server does not know it yet), so
each append is atomic; ``registry_set``/``registry_setdefault``/``registry_delete``
and the dead-letter writes are scripts too (``deadletter_add_many`` stores its whole
batch with one script call). Listing uses SCAN, never KEYS.

Limits: ``ttl_s`` (0 or less: never) is set on a frame's four keys when they are
written first, and the frame's writes refresh it once it has run down by a tenth (by a
minute at most), so an idle frame expires between ``0.9 * ttl_s`` (``ttl_s - 60`` for
long TTLs) and ``ttl_s`` after its last write. ``max_threads`` is enforced by that TTL
only (Redis keeps no LRU order of frames for us); an expired frame is not counted in
``info()``. Dead letters are dropped ``dead_letter_ttl_s`` after they were written (by
the server's clock, at the next dead-letter write or list) and past
``max_dead_letters``; once their JSON holds ``dead_letter_budget_bytes``, a rejection of
outside input is stored as its sample. Scripts build
the keys of the other half of a registry entry themselves, so this backend needs one
Redis server or a primary, not Redis Cluster.

Round trips: commands issued from one event loop are queued and sent together — what
is ready in one loop tick goes out as one pipeline on one of a few connections, and
what arrives while those are busy goes in the next pipeline. A hundred concurrent
``buffer_append`` calls cost one or two round trips, not a hundred. Writes are folded
too: the appends and registry writes gathered for one pipeline are one call of
``write.lua``, which makes them in the order they were issued and answers each on its
own (a write refused, such as a damaged frame's, fails alone; the others are made). A
hop of the pump costs a fraction of a script call instead of three; see
``RedisStatistics.folded``.

Failures: connect and socket timeouts are explicit. A command that never reached the
server (refused, reset while connecting) is retried; a command that may have run (the
reply was lost or late) is retried only if it is idempotent: every write here is
(appends by ``(message_id, direction)``, registry writes by value, dead letters by
their client-generated id; so a folded call, retried whole, writes each item once),
except the deletes and purge, whose answer (did it
exist?) could be wrong on a second try. Retries back off exponentially (0.1 s doubling
up to 2 s, jittered), at most ``retries`` times; then the caller gets
:class:`~xml_pipeline.exceptions.BackendUnavailable`. An outage and the recovery are
logged once each. A backend instance belongs to the event loop it is first used on.

A frame whose keys Redis lost some of (a history without its index, or behind it; an
index without its history; half a registry entry) is refused by the scripts that meet
it (an error reply ``CORRUPTED <what>``), which the caller gets as
:class:`~xml_pipeline.exceptions.BackendCorrupted`, never retried: counting the frame
again from 0 would write duplicate and wrong indexes.

Modules (import from the package: ``from xml_pipeline.backends.redis import
RedisBackend``)::

    backend.py    RedisBackend: the key layout above and the store operations
    pipeline.py   Pipeline: the pipelining connection layer (the pool, the queue, the
                  lanes, retries and backoff, the outage log lines, RedisStatistics);
                  any command or script, so not only the backend's. The only module
                  that imports redis
    scripts.py    Script: a Lua script and its SHA-1; the backend's scripts, loaded
                  from lua/*.lua (each file's header says its KEYS and ARGV)
"""

from __future__ import annotations

from .backend import RedisBackend
from .pipeline import RedisStatistics

__all__ = ["RedisBackend", "RedisStatistics"]
