"""The manager backend: one :class:`~xml_pipeline.backends.store.Store`, served to
several processes on one machine.

A :class:`ManagerServer` keeps the reference ``Store`` and serves it over TCP (an
event loop of its own in one thread); :class:`ManagerBackend` is the async client
the pump and its workers use, on the caller's event loop with asyncio streams
(pipelined calls, answers read by the connection's protocol, the loop's own timeouts). Either
a pump serves the store itself (``serve``: a thread in that process) or a
standalone server runs it::

    XML_PIPELINE_MANAGER_AUTHKEY=... python -m xml_pipeline manager --address 127.0.0.1:50555
    XML_PIPELINE_MANAGER_AUTHKEY=... python -m xml_pipeline organism.yaml \\
        --backend manager://127.0.0.1:50555

The URL is ``manager://HOST:PORT``; ``manager://HOST:PORT?serve=1`` (or the
``serve`` option) makes this process the server, and port 0 then picks a free port.
The authkey comes from the ``authkey`` option or the ``XML_PIPELINE_MANAGER_AUTHKEY``
environment variable (never from the URL); it is never logged or shown.

Wire format (protocol 1)
------------------------

Transport: one TCP connection per client, framed as :mod:`multiprocessing.connection`
frames (``Connection.send_bytes``/``recv_bytes``: a 4-byte big-endian length, then
the bytes; never ``send``/``recv``, which pickle). On connect both sides prove they
hold the authkey with that module's HMAC challenge (``deliver_challenge`` /
``answer_challenge``: the server challenges first; both sides speak it on asyncio
streams), the whole exchange bounded in time, so a silent peer cannot hold either
side. After that every frame is UTF-8 JSON; nothing is pickled.

A request is a JSON array of calls, run in order with nothing in between (a batch:
the calls a client made in one event-loop tick); the response has one
``[status, value]`` per call, in the same order: ``[0, RESULT]`` or
``[1, "why it failed"]``. A client may send further requests before the first is
answered (pipelining): the server runs a connection's requests one after the
other and answers them in the order they came::

    → [["buffer_append","9b2f…",SLOT],["registry_get_chain","9b2f…"]]
    ← [[0,7],[0,"[\\"console\\",\\"greeter\\"]"]]

``SLOT`` and ``LETTER`` are exactly the JSON objects of
:func:`~xml_pipeline.backends.base.slot_to_bytes` and
:func:`~xml_pipeline.backends.base.dead_letter_to_bytes`; a ``ROW`` is a slot as
an array of the same values in :class:`~xml_pipeline.backends.base.Slot`'s order,
except that the XML is a string, not base64 (its bytes decoded as UTF-8 with
``surrogateescape``: any bytes survive), ``[i, d, f, t, p, m, ts, xml]``, which a
client parses about twice as fast (the client reads histories with
``buffer_get_rows``, and with ``buffer_get_thread`` from a server that does not
know it). The calls are the ``Store`` methods, each
one server-side method call::

    call                   arguments                     result
    hello                  protocol (1)                  {"protocol": 1, "limits": {...}}
    ping                   -                             null
    buffer_append          thread, SLOT                  index
    buffer_contains        thread, message id, direction true | false
    buffer_get_thread      thread                        [SLOT, ...]
    buffer_get_rows        thread                        [ROW, ...]
    buffer_get_slot        thread, index                 SLOT | null
    buffer_thread_len      thread                        count
    buffer_thread_exists   thread                        true | false
    buffer_delete_thread   thread                        true | false
    buffer_list_threads    -                             [thread, ...]
    buffer_clear           -                             null
    registry_set           chain, uuid                   null
    registry_setdefault    chain, uuid                   uuid
    registry_get_uuid      chain                         uuid | null
    registry_get_chain     uuid                          chain | null
    registry_delete        uuid                          true | false
    registry_list_all      -                             {uuid: chain, ...}
    registry_clear         -                             null
    deadletter_add         LETTER                        id
    deadletter_add_many    [LETTER, ...]                 [id, ...]
    deadletter_list        limit | null                  [LETTER, ...]
    deadletter_delete      id                            true | false
    deadletter_purge       -                             count
    info                   -                             {name: count, ...}

The client's first call on a connection is ``hello``. A frame that is not a JSON
array, or larger than :data:`MAX_REQUEST_BYTES`, ends the connection.

The handshake authenticates both ends but nothing is encrypted: serve on a loopback
address (the server warns otherwise).

The package: :mod:`~xml_pipeline.backends.manager.protocol` (framing, the
handshake, the JSON codec, the slot encodings), :mod:`~xml_pipeline.backends.manager.server`
(:class:`ManagerServer`, :func:`serve_forever`) and
:mod:`~xml_pipeline.backends.manager.client` (:class:`ManagerBackend`).
"""

from __future__ import annotations

from .client import ManagerBackend, ManagerStatistics
from .protocol import (
    AUTHKEY_ENV,
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_CALLS,
    PROTOCOL,
    parse_address,
)
from .server import ManagerServer, serve_forever

__all__ = [
    "AUTHKEY_ENV",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_CALLS",
    "PROTOCOL",
    "ManagerBackend",
    "ManagerServer",
    "ManagerStatistics",
    "parse_address",
    "serve_forever",
]
