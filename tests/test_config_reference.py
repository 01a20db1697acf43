"""One source of configuration: the doc's key tables and the JSON Schema come from the models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from xml_pipeline.config import (
    OrganismConfig,
    _item,
    _reference_markdown,
    _reference_tables,
    organism_json_schema,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "organisms.md"
ORGANISMS = sorted((ROOT / "organisms").glob("*.yaml"))
REGENERATE = "scripts/gen_reference"


def sections() -> dict[str, type[BaseModel]]:
    """Every section model of the organism file, by key."""
    out: dict[str, type[BaseModel]] = {}
    for name, info in OrganismConfig.model_fields.items():
        model = _item(info.annotation)
        if model is not None:
            out[name] = model
    return out


# -- docs/organisms.md ----------------------------------------------------------------


def test_the_docs_tables_are_the_models() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert _reference_markdown(text) == text, (
        f"docs/organisms.md and the models in xml_pipeline/config.py disagree: run {REGENERATE}"
    )


def test_every_key_of_the_config_module_has_a_description() -> None:
    # The backends' option models (manager, redis) may still take their meanings from
    # their docstrings; the models of this module carry a description on every field.
    models = [OrganismConfig, *sections().values()]
    for model in models:
        if model.__module__ != "xml_pipeline.config":
            continue
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_a_table_shows_the_models_default_bounds_and_meaning() -> None:
    tables = _reference_tables()
    assert set(tables) == {"", *sections()}
    pump = sections()["pump"]
    info = pump.model_fields["queue_size"]
    row = f"| `queue_size` | int | `{info.default}` | \u2265 1 | {info.description} |"
    assert row in tables["pump"].splitlines()
    assert "| `workers` | int or null | null | 1\u20131024 |" in tables["process_pool"]
    assert '| `from` | string | `"boot"` | not empty |' in tables["boot"]
    assert "| `listeners` | list of mappings | required | at least one |" in tables[""]
    # A model without descriptions (the backends' options) takes its docstring's meanings.
    assert "| `retries` | int | `5` | \u2265 0 | how many times" in tables["redis"]


def test_a_block_for_an_unknown_section_or_a_missing_block_is_an_error() -> None:
    text = DOC.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="no section 'nope'"):
        _reference_markdown(
            text + "\n<!-- generated: organism keys: nope -->\n<!-- end generated -->\n"
        )
    without_pump = text.replace("<!-- generated: organism keys: pump -->", "")
    with pytest.raises(ValueError, match="no generated block for: pump"):
        _reference_markdown(without_pump)


def test_regenerating_replaces_only_the_tables() -> None:
    stale = "intro\n<!-- generated: organism keys -->\nSTALE TABLE\n<!-- end generated -->\nprose\n"
    tail = "".join(
        f"<!-- generated: organism keys: {name} -->\n<!-- end generated -->\n"
        for name in sections()
    )
    out = _reference_markdown(stale + tail)
    assert out.startswith("intro\n<!-- generated: organism keys -->\n\n| key | type |")
    assert "STALE TABLE" not in out
    assert "\n<!-- end generated -->\nprose\n" in out
    assert _reference_markdown(out) == out


# -- schema --organism -------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "schema", "--organism"],
        capture_output=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    printed: dict[str, Any] = json.loads(result.stdout)
    return printed


def examples() -> list[tuple[Path, Any]]:
    return [(path, yaml.safe_load(path.read_text(encoding="utf-8"))) for path in ORGANISMS]


def test_the_schema_is_draft_2020_12_with_a_title(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "xml_pipeline organism file"
    assert schema == json.loads(json.dumps(organism_json_schema()))
    assert set(schema["required"]) == {"organism", "listeners"}


def test_the_schema_documents_defaults_and_meanings(schema: dict[str, Any]) -> None:
    pump = resolve(schema, schema["properties"]["pump"])
    queue_size = pump["properties"]["queue_size"]
    assert queue_size["default"] == sections()["pump"].model_fields["queue_size"].default
    assert queue_size["minimum"] == 1
    assert "inside the pump" in queue_size["description"]
    boot = resolve(schema, schema["properties"]["boot"]["items"])
    assert boot["properties"]["from"]["default"] == "boot"
    redis = resolve(schema, schema["properties"]["redis"])
    assert redis["properties"]["prefix"]["description"]


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rpartition("/")[2]]
    return node


def branch(schema: dict[str, Any], node: dict[str, Any], value: Any) -> dict[str, Any] | None:
    """The part of ``node`` that describes ``value``'s shape (an ``anyOf`` member)."""
    node = resolve(schema, node)
    wanted = {dict: "object", list: "array"}.get(type(value))
    if "anyOf" in node:
        for member in node["anyOf"]:
            member = resolve(schema, member)
            if member.get("type") == wanted:
                return member
        return None
    return node


def check_keys(schema: dict[str, Any], node: dict[str, Any], value: Any, where: str) -> int:
    """Every key in ``value`` is a property of its object (which allows no other); the
    number of keys checked."""
    part = branch(schema, node, value)
    checked = 0
    if isinstance(value, dict):
        assert part is not None and part["type"] == "object", where
        assert part["additionalProperties"] is False, where
        assert set(part.get("required", ())) <= set(value), where
        for key, item in value.items():
            assert key in part["properties"], f"{where}.{key} is not in the schema"
            checked += 1 + check_keys(schema, part["properties"][key], item, f"{where}.{key}")
    elif isinstance(value, list) and part is not None and part.get("type") == "array":
        for i, item in enumerate(value):
            checked += check_keys(schema, part["items"], item, f"{where}[{i}]")
    return checked


def test_every_key_of_every_example_is_in_the_schema(schema: dict[str, Any]) -> None:
    assert ORGANISMS
    for path, data in examples():
        assert check_keys(schema, schema, data, path.name) > 5


def test_every_object_of_the_schema_refuses_unknown_keys(schema: dict[str, Any]) -> None:
    objects = [schema, *schema["$defs"].values()]
    assert len(objects) == 1 + len(sections())
    for node in objects:
        assert node["additionalProperties"] is False, node["title"]
        assert all("description" in p for p in node["properties"].values()), node["title"]


def test_the_schema_validates_the_examples_and_refuses_a_typo(schema: dict[str, Any]) -> None:
    import jsonschema  # a test dependency: never skipped

    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path, data in examples():
        errors = [error.message for error in validator.iter_errors(data)]
        assert not errors, (path.name, errors)
    _, hello = examples()[0]
    typo = {**hello, "pump": {"queue_sise": 8}}
    assert not validator.is_valid(typo)
    assert not validator.is_valid({**hello, "pump": {"queue_size": 0}})


def test_schema_organism_to_a_closed_stdout_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "schema", "--organism"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, cwd=ROOT, check=False,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == b"xml_pipeline: error: standard output is closed\n"
