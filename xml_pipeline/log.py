"""Log records as JSON lines, with the delivery they concern.

The library never configures logging: the command line does (``--log-format json``
installs :class:`JsonFormatter` on its stderr handler), and an application does what
it likes::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    async with StreamPump(organism, log_context=True) as pump: ...

Each record is one line holding one JSON object: ``time``, ``level``, ``logger``,
``message``, then, when known, ``conversation`` (the conversation's id: its root
frame's uuid), ``frame`` (the thread id a handler sees), ``listener`` and
``message_id``, and ``exception`` / ``stack`` (the traceback, as one string).

Where the delivery fields come from:

- every record logged while a delivery runs (the pump's about its handler: raised,
  timed out, returned something invalid; the handler's own, in async handlers and in
  sync handlers' threads) carries it when the pump was made with ``log_context=True``
  (``run --log-format json`` does): the pump then sets a context variable around each
  delivery, which :func:`delivery_fields` reads. It costs a little on every hop, so it
  is off unless asked for. Handlers of ``cpu_bound`` listeners run in worker
  processes, whose logging is their own;
- the pump's records between deliveries (a backend failed delivering, an internal
  error, a retry ignored or a message refused at ingress) pass the fields with
  ``extra=``, whatever the option.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any

from ._delivery import CURRENT_DELIVERY, log_fields

__all__ = ["DELIVERY_FIELDS", "JsonFormatter", "delivery_fields"]

DELIVERY_FIELDS = ("conversation", "frame", "listener", "message_id")
"""The fields of a log record that name the delivery it concerns."""

# A lone surrogate (from bytes decoded with surrogateescape, or sliced out of a pair)
# cannot be encoded in UTF-8, and its JSON escape is refused by strict parsers.
_SURROGATE = re.compile("[\ud800-\udfff]")


def delivery_fields() -> dict[str, str]:
    """The delivery fields of the handler running in this context, or ``{}``.

    Empty outside a handler, and everywhere unless the pump was made with
    ``log_context=True``.
    """
    delivery = CURRENT_DELIVERY.get()
    return {} if delivery is None else log_fields(delivery)


def _clean(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module's docstring for the keys).

    The line is ASCII (``json.dumps`` escapes the rest), so a newline, a control
    character or text the stream cannot encode in a message or a traceback never
    splits or breaks a line; lone surrogates become U+FFFD so that every line is
    valid JSON for strict parsers too.
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string or arguments: say what was logged
            message = f"{record.msg!r} % {record.args!r} (cannot be formatted: {exc})"
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        fields: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        context = None
        for name in DELIVERY_FIELDS:
            value = getattr(record, name, None)  # given with extra=
            if value is None:
                if context is None:
                    context = delivery_fields()
                value = context.get(name)
            if value is not None:
                fields[name] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return json.dumps({key: _clean(value) for key, value in fields.items()})
