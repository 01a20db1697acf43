"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from lxml import etree

from xml_pipeline import build_envelope

NS = "https://example.org/relay"


def hop_envelope(seq: int, last: int) -> bytes:
    payload = etree.Element(f"{{{NS}}}Hop", nsmap={None: NS})  # type: ignore[dict-item]
    etree.SubElement(payload, f"{{{NS}}}seq").text = str(seq)
    etree.SubElement(payload, f"{{{NS}}}last").text = str(last)
    return build_envelope(sender="bench", to="relay.1", payload=payload)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]
