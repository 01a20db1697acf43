"""The exception tree of xml_pipeline.

Every error the package raises on purpose derives from :class:`XmlPipelineError`.
Errors about one message carry the ``code`` that its ``Huh`` reply uses::

    XmlPipelineError
    ├── ConfigError (ValueError)              bad organism YAML, handler not importable
    ├── PumpError (RuntimeError)              the pump was used outside its lifetime
    │   └── PumpClosed                        not running: not started yet, stopping or stopped
    ├── BackendError
    │   ├── BackendUnavailable                the backend cannot be reached
    │   ├── BackendCorrupted                  the backend lost part of a frame (Redis)
    │   └── RequestTooLarge                   one call is over the backend's request cap (not sent)
    └── MessageError                          one message was rejected; .code names why
        ├── MalformedMessage        malformed   not well-formed XML, DTD, entities, XInclude
        ├── MessageTooLarge         too-large   over the byte, depth, element or attribute limit
        ├── EnvelopeError           envelope    well-formed XML, but not a valid envelope
        ├── NoRoute                 no-route    nobody accepts the payload (or ``to`` names nobody)
        ├── PayloadInvalid          validation  the payload failed its class's validation
        ├── PeerDenied              peer-denied a forward to a listener outside ``peers``
        ├── DepthExceeded           depth-exceeded  a forward went deeper than ``max_depth``
        ├── HandlerFailed           handler-error   the handler raised
        ├── InvalidReturn           invalid-return  the handler returned something unusable
        ├── HandlerTimeout          timeout         the handler ran past ``timeout_s``
        ├── WorkerCrashed           worker-crashed  a cpu_bound handler's worker process died
        ├── Overloaded              overloaded      a forward while ``max_in_pump`` messages wait
        ├── EgressFailed            egress          the egress callback raised
        ├── BackendFailed           backend-unavailable  the backend failed while routing it
        │   └── FrameCorrupted      backend-corrupted    ... because it lost part of a frame
        ├── Duplicate               duplicate       a retry of an accepted message (no Huh)
        ├── Abandoned               shutdown        still queued when the pump stopped
        └── NoReply                 no-reply        the conversation ended without a reply (no Huh)

Foreign exceptions (lxml, pydantic, yaml) are translated at the boundary and
chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "Abandoned",
    "BackendCorrupted",
    "BackendError",
    "BackendFailed",
    "NoReply",
    "PumpClosed",
    "PumpError",
    "RequestTooLarge",
    "Duplicate",
    "EgressFailed",
    "Overloaded",
    "BackendUnavailable",
    "ConfigError",
    "DepthExceeded",
    "EnvelopeError",
    "FrameCorrupted",
    "HandlerFailed",
    "HandlerTimeout",
    "InvalidReturn",
    "MalformedMessage",
    "MessageError",
    "MessageTooLarge",
    "NoRoute",
    "PayloadInvalid",
    "PeerDenied",
    "WorkerCrashed",
    "XmlPipelineError",
    "error_for_code",
]


class XmlPipelineError(Exception):
    """Root of every exception raised by xml_pipeline."""


class ConfigError(XmlPipelineError, ValueError):
    """The organism configuration is invalid or names something that cannot be imported.

    The message is one line naming the file, the key and, where known, the line.
    """


class PumpError(XmlPipelineError, RuntimeError):
    """The pump was used outside its lifetime (entered twice, say)."""


class PumpClosed(PumpError):
    """The pump is not running: it was not entered yet, or it is stopping or stopped."""


class BackendError(XmlPipelineError):
    """A history/registry backend failed."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (bad URL scheme, server down, wrong credentials)."""


class BackendCorrupted(BackendError):
    """The backend holds only part of something it keeps together: a frame's history
    without its index, or one half of a registry entry (Redis lost keys: eviction, an
    expiry, a partial restore, a key deleted by hand).

    Nothing was written by the call that found it; it fails the same way until the
    damaged keys, which the message names, are deleted. Retrying does not help.
    """


class RequestTooLarge(BackendError):
    """One call is larger than the backend accepts in a request (the manager's
    ``max_request_bytes``): it was not sent, and the connection is still usable.

    The message names the sizes and the setting to raise.
    """


class MessageError(XmlPipelineError):
    """One message was rejected. ``code`` is the machine-readable ``Huh`` code."""

    code = "error"

    def __init__(self, message: str, *, listener: str | None = None) -> None:
        super().__init__(message)
        self.reason = message
        self.listener = listener


class MalformedMessage(MessageError):
    """Not well-formed XML, or XML using a forbidden feature (DTD, entities, XInclude)."""

    code = "malformed"


class MessageTooLarge(MessageError):
    """Over a parse limit: bytes, nesting depth, element count or attribute count."""

    code = "too-large"


class EnvelopeError(MessageError):
    """Well-formed XML that is not a valid ``<message>`` envelope."""

    code = "envelope"


class NoRoute(MessageError):
    """No listener accepts the payload, or ``<to>`` names no listener accepting it."""

    code = "no-route"


class PayloadInvalid(MessageError):
    """The payload does not validate against the listener's payload class."""

    code = "validation"


class PeerDenied(MessageError):
    """A listener forwarded to a listener that is not among its ``peers``."""

    code = "peer-denied"


class DepthExceeded(MessageError):
    """A forward would go deeper than the pump's ``max_depth``."""

    code = "depth-exceeded"


class HandlerFailed(MessageError):
    """The handler raised an exception."""

    code = "handler-error"


class InvalidReturn(MessageError):
    """The handler returned something other than HandlerResponse, a list of them, or None."""

    code = "invalid-return"


class HandlerTimeout(MessageError):
    """The handler did not finish within its listener's ``timeout_s``."""

    code = "timeout"


class WorkerCrashed(MessageError):
    """A ``cpu_bound`` handler's worker process died on this message ``max_crashes`` times."""

    code = "worker-crashed"


class Abandoned(MessageError):
    """The message was still queued or running when the pump stopped (dead-lettered)."""

    code = "shutdown"


class Overloaded(MessageError):
    """A handler forwarded while ``max_in_pump`` messages were already inside the pump."""

    code = "overloaded"


class EgressFailed(MessageError):
    """The egress callback raised while taking a reply (the reply is dead-lettered)."""

    code = "egress"


class Duplicate(MessageError):
    """A retry of a message already accepted (same sender and ``<id>``).

    It is ignored, not answered; :meth:`StreamPump.request` raises it.
    """

    code = "duplicate"


class BackendFailed(MessageError):
    """The backend failed while the pump recorded or routed this message.

    When it fails while routing what a handler returned, none of those outputs was
    delivered: the pump writes every output's history and frames first, and
    enqueues them only once all of that succeeded.
    """

    code = "backend-unavailable"


class FrameCorrupted(BackendFailed):
    """The backend lost part of a frame this message was recorded or routed on (see
    :class:`BackendCorrupted`): the message failed, and will fail again on that frame
    until the damaged keys are deleted. A new conversation is not affected."""

    code = "backend-corrupted"


class NoReply(MessageError):
    """The conversation ended (nothing left in flight) without a reply to the caller.

    Raised by :meth:`StreamPump.request`; nothing is dead-lettered for it.
    """

    code = "no-reply"


def error_for_code(code: str, reason: str, *, listener: str | None = None) -> MessageError:
    """The :class:`MessageError` a ``Huh`` code stands for (``MessageError`` if unknown)."""
    cls = _BY_CODE.get(code, MessageError)
    error = cls(reason, listener=listener)
    if cls is MessageError:
        error.code = code
    return error


_BY_CODE: dict[str, type[MessageError]] = {
    cls.code: cls
    for cls in (
        MalformedMessage, MessageTooLarge, EnvelopeError, NoRoute, PayloadInvalid, PeerDenied,
        DepthExceeded, HandlerFailed, InvalidReturn, HandlerTimeout, WorkerCrashed, Overloaded,
        EgressFailed, BackendFailed, FrameCorrupted, Duplicate, Abandoned, NoReply,
    )
}  # fmt: skip
