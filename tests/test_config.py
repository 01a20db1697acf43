"""Organism configuration: backend options."""

from __future__ import annotations

import textwrap
from pathlib import Path

from xml_pipeline import load_organism

YAML = """
    organism: {name: t}
    backend: manager://127.0.0.1:0
    manager: {serve: true, connect_timeout_s: 2}
    redis: {prefix: p}
    listeners: [{name: a, payload: support:Ping, handler: support:pong}]
"""


def test_backend_options_follow_the_scheme(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(YAML))
    organism = load_organism(path)
    assert organism.backend_options["serve"] is True
    assert organism.backend_options["connect_timeout_s"] == 2
    redis = load_organism(path, backend="redis://127.0.0.1:1/0")
    assert redis.backend_options["prefix"] == "p" and "serve" not in redis.backend_options
    assert load_organism(path, backend="memory://").backend_options == {}


def test_an_overriding_manager_url_joins_instead_of_serving(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(YAML))
    joined = load_organism(path, backend="manager://127.0.0.1:50555")
    assert joined.backend_options["serve"] is False
