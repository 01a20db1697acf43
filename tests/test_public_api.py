"""The package's front door: __all__ is complete and importable."""

from __future__ import annotations

import subprocess
import sys

import xml_pipeline


def test_all_names_exist_and_are_sorted_uniquely() -> None:
    for name in xml_pipeline.__all__:
        assert hasattr(xml_pipeline, name), name
    assert len(set(xml_pipeline.__all__)) == len(xml_pipeline.__all__)


def test_public_objects_are_exported() -> None:
    exported = set(xml_pipeline.__all__)
    for name, value in vars(xml_pipeline).items():
        if name.startswith("_") or name == "annotations" or isinstance(value, type(sys)):
            continue
        assert name in exported, f"{name} is public in xml_pipeline but not in __all__"


def test_importing_does_not_import_redis() -> None:
    code = "import sys, xml_pipeline; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "False"


def test_every_exception_is_exported() -> None:
    from xml_pipeline import exceptions

    assert set(exceptions.__all__) <= set(xml_pipeline.__all__)
