"""The Lua scripts the Redis backend runs, shipped as ``.lua`` files in ``lua/``.

Each script's KEYS and ARGV are described at the top of its file. A :class:`Script`
carries its source and SHA-1, so :meth:`Pipeline.eval
<xml_pipeline.backends.redis.pipeline.Pipeline.eval>` can send EVALSHA and fall back
to EVAL when the server does not know the script yet.
"""

from __future__ import annotations

import hashlib
from importlib import resources

__all__ = [
    "COMMIT",
    "DEAD_LETTER_ADD",
    "DEAD_LETTER_DELETE",
    "DEAD_LETTER_LIST",
    "DEAD_LETTER_PURGE",
    "GET_SLOT",
    "LEASES",
    "PUBLISH",
    "READ",
    "REGISTRY_DELETE",
    "REGISTRY_GET",
    "Script",
    "UNLEASE",
    "WRITE",
]


class Script:
    """A Lua script and its SHA-1 (both bytes, as EVAL and EVALSHA send them).

    Args:
        source: the script's text.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()

    @classmethod
    def load(cls, *names: str) -> Script:
        """The scripts shipped as ``xml_pipeline/backends/redis/lua/<name>``, one after
        the other (a library file first, then the script that uses it)."""
        folder = resources.files(__package__).joinpath("lua")
        return cls("\n".join(folder.joinpath(name).read_text("utf-8") for name in names))


WRITE = Script.load("lib_append.lua", "lib_registry.lua", "write.lua")
"""The history appends and registry writes of one loop tick, in one call (``write.lua``)."""
COMMIT = Script.load("lib_append.lua", "commit.lua")
"""The end of a delivery on the Redis Streams transport (``commit.lua``)."""
LEASES = Script.load("leases.lua")
"""A round of a node's leases on the shards of a listener's inbox (``leases.lua``)."""
UNLEASE = Script.load("unlease.lua")
"""A node gives up its leases on shards (``unlease.lua``)."""
PUBLISH = Script.load("publish.lua")
"""Input added to its target inboxes at once, and once (``publish.lua``)."""
READ = Script.load("read.lua")
"""A node's read of its inboxes, fenced by its leases (``read.lua``)."""
GET_SLOT = Script.load("get_slot.lua")
REGISTRY_GET = Script.load("registry_get.lua")
"""One half of a registry entry, checked against the other (``registry_get.lua``)."""
REGISTRY_DELETE = Script.load("registry_delete.lua")
DEAD_LETTER_ADD = Script.load("lib_deadletter.lua", "deadletter_add.lua")
DEAD_LETTER_LIST = Script.load("lib_deadletter.lua", "deadletter_list.lua")
DEAD_LETTER_DELETE = Script.load("lib_deadletter.lua", "deadletter_delete.lua")
DEAD_LETTER_PURGE = Script.load("lib_deadletter.lua", "deadletter_purge.lua")
