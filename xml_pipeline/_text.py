"""XML text content written by hand, byte for byte as lxml writes it (used by the
payload codecs' fast path and the envelope builder)."""

from __future__ import annotations

import re

__all__ = ["NOT_XML", "escape"]

# Text lxml would refuse (it raises ValueError): such payloads take the lxml path.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape(text: str) -> bytes:
    """Text content serialized as ``etree.tostring`` does (ASCII, character references)."""
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:
        text = text.replace("\r", "&#13;")
    return text.encode("ascii", "xmlcharrefreplace")
