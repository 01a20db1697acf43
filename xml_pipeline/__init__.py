"""xml_pipeline: an asyncio stream pump routing typed XML messages to handlers.

Users import what they need from here::

    from xml_pipeline import Handler, HandlerMetadata, HandlerResponse, Huh, Payload
"""

from __future__ import annotations

from ._version import __version__
from .backends import (
    Backend,
    BackendScheme,
    DeadLetter,
    HistoryLimits,
    Slot,
    backend_scheme,
    client_url,
    open_backend,
    serves,
)
from .client import Client
from .config import (
    BootMessage,
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpSettings,
    load_organism,
)
from .envelope import ENVELOPE_NAMESPACE, Envelope, build_envelope, parse_envelope
from .exceptions import (
    Abandoned,
    BackendCorrupted,
    BackendError,
    BackendFailed,
    BackendUnavailable,
    ConfigError,
    DepthExceeded,
    Duplicate,
    EgressFailed,
    EnvelopeError,
    FrameCorrupted,
    HandlerFailed,
    HandlerTimeout,
    InvalidReturn,
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    NoReply,
    NoRoute,
    Overloaded,
    PayloadInvalid,
    PeerDenied,
    PumpClosed,
    PumpError,
    RequestTooLarge,
    WorkerCrashed,
    XmlPipelineError,
    error_for_code,
)
from .frame import Frame
from .handler import Handler, HandlerMetadata, HandlerResponse
from .offload import PoolStatistics
from .parser import ParseLimits
from .payload import CORE_NAMESPACE, Huh, Payload, codec_for, payload_from_xml
from .pump import StreamPump
from .reply import ListenerStatistics, PumpStatistics, Reply, Unanswered

__all__ = [
    "CORE_NAMESPACE",
    "Client",
    "Abandoned",
    "ENVELOPE_NAMESPACE",
    "Backend",
    "BackendCorrupted",
    "BackendError",
    "BackendFailed",
    "BackendScheme",
    "BackendUnavailable",
    "BootMessage",
    "ConfigError",
    "DeadLetter",
    "DepthExceeded",
    "Duplicate",
    "EgressFailed",
    "Envelope",
    "EnvelopeError",
    "Frame",
    "FrameCorrupted",
    "Handler",
    "HandlerFailed",
    "HandlerMetadata",
    "HandlerResponse",
    "HandlerTimeout",
    "HistoryLimits",
    "Huh",
    "InvalidReturn",
    "Listener",
    "ListenerStatistics",
    "MalformedMessage",
    "MessageError",
    "MessageTooLarge",
    "NoReply",
    "NoRoute",
    "Organism",
    "Overloaded",
    "ParseLimits",
    "PayloadInvalid",
    "Payload",
    "PeerDenied",
    "PoolStatistics",
    "ProcessPoolSettings",
    "PumpClosed",
    "PumpError",
    "PumpSettings",
    "PumpStatistics",
    "Reply",
    "RequestTooLarge",
    "Slot",
    "StreamPump",
    "Unanswered",
    "WorkerCrashed",
    "XmlPipelineError",
    "__version__",
    "backend_scheme",
    "build_envelope",
    "client_url",
    "codec_for",
    "error_for_code",
    "load_organism",
    "open_backend",
    "parse_envelope",
    "payload_from_xml",
    "serves",
]
