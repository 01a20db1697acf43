"""Organism configuration: backend options, defaults, errors, handler signatures."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import Ping, pong

from xml_pipeline import (
    BackendUnavailable,
    BootMessage,
    ConfigError,
    HistoryLimits,
    Listener,
    Organism,
    ParseLimits,
    ProcessPoolSettings,
    PumpSettings,
    load_organism,
    open_backend,
)
from xml_pipeline.backends import RedisOptions

TESTS = Path(__file__).resolve().parent

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


def test_rediss_urls_take_the_redis_section(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(YAML))
    organism = load_organism(path, backend="rediss://127.0.0.1:6380/0")
    assert organism.backend_options == {**RedisOptions().model_dump(), "prefix": "p"}


def test_an_unknown_scheme_has_no_options_and_fails_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(YAML))
    organism = load_organism(path, backend="pigeon://x")
    assert organism.backend_options == {}
    with pytest.raises(BackendUnavailable, match="schemes available are memory://"):
        open_backend(organism.backend)


# -- defaults are written once ---------------------------------------------------------


MINIMAL = """
    organism: {name: t}
    listeners: [{name: a, payload: support:Ping, handler: support:pong}]
    boot: [{payload: '<Ping xmlns="https://example.org/test"><n>1</n></Ping>'}]
"""


def test_the_records_defaults_are_the_files(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(MINIMAL))
    organism = load_organism(path)
    assert organism.settings == PumpSettings()
    assert organism.process_pool == ProcessPoolSettings()
    assert organism.history == HistoryLimits()
    assert organism.settings.limits == ParseLimits()
    [listener] = organism.listeners
    plain = Listener(name="a", payloads=listener.payloads, handler=listener.handler)
    assert listener == plain
    assert organism.boot[0] == BootMessage(organism.boot[0].payload)
    assert Organism(name="t", listeners=(plain,)).backend == organism.backend == "memory://"


# -- every problem, one line each ------------------------------------------------------


def load_text(tmp_path: Path, text: str, **files: str) -> Any:
    for name, source in files.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    path = tmp_path / "o.yaml"
    path.write_text(textwrap.dedent(text))
    return load_organism(path)


def problems(tmp_path: Path, text: str, **files: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, **files)
    path = str(tmp_path / "o.yaml")
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        pump: {queue_size: 0, max_depth: x}
        listeners:
          - name: a
            payload: support:Ping
            handler: support:pong
            concurrency: 0
        boot: [{payload: ''}]
        """,
    ) == [
        "pump.queue_size (line 3): Input should be greater than or equal to 1",
        "pump.max_depth (line 3): Input should be a valid integer, unable to parse string "
        "as an integer",
        "listeners[0].concurrency (line 8): Input should be greater than or equal to 1",
        "boot[0].payload (line 9): String should have at least 1 character",
    ]


def test_ordered_is_a_listener_option_checked_like_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xml_pipeline.cli.check import check

    organism = load_text(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - {name: a, payload: support:Ping, handler: support:pong, ordered: false}
          - {name: b, payload: support:Ping, handler: support:pong}
        """,
    )
    assert [listener.ordered for listener in organism.listeners] == [False, True]
    assert check(organism) == 0
    listed = capsys.readouterr().out
    assert "a: async, concurrency 16 (unordered), timeout none" in listed
    assert "b: async, concurrency 16, timeout none" in listed
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - name: a
            payload: support:Ping
            handler: support:pong
            ordered: sometimes
        """,
    ) == [
        "listeners[0].ordered (line 7): Input should be a valid boolean, unable to interpret input"
    ]
    with pytest.raises(ConfigError, match="listener 'a': ordered must be true or false, not 'no'"):
        Listener("a", (Ping,), pong, ordered="no")  # type: ignore[arg-type]


def test_an_unknown_key_names_the_key_it_probably_meant(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        pump: {queue_sise: 3}
        listeners:
          - name: a
            payload: support:Ping
            handlr: support:pong
            colour: blue
        boot: [{frm: x, payload: p}]
        """,
    ) == [
        "pump.queue_sise (line 3): unknown key \u2014 did you mean 'queue_size'?",
        "listeners[0].handlr (line 7): unknown key \u2014 did you mean 'handler'? (missing)",
        "listeners[0].colour (line 8): unknown key",
        "boot[0].frm (line 9): unknown key \u2014 did you mean 'from'?",
    ]


def test_a_missing_key_without_a_likely_typo_is_reported(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - name: a
            handler: support:pong
            zzz: 1
        """,
    ) == [
        "listeners[0].payload (line 4): Field required",
        "listeners[0].zzz (line 6): unknown key",
    ]


def test_a_payload_of_neither_form_is_one_problem(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - {name: a, payload: 5, handler: support:pong}
          - {name: b, payload: [support:Ping, 7], handler: support:pong}
        """,
    ) == [
        "listeners[0].payload (line 4): Input should be a valid string or a valid list",
        "listeners[1].payload[1] (line 5): Input should be a valid string",
    ]


def test_every_import_problem_is_reported(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - {name: a, payload: support:Nope, handler: support:nope}
          - {name: b, payload: support:Ping, handler: support:pong}
          - {name: c, payload: support:pong, handler: support:pong}
        """,
    ) == [
        "listeners[0].payload (line 4): cannot import 'support:Nope': AttributeError: "
        "module 'support' has no attribute 'Nope'",
        "listeners[0].handler (line 4): cannot import 'support:nope': AttributeError: "
        "module 'support' has no attribute 'nope'",
        "listeners[2].payload (line 6): 'support:pong' is not a pydantic model class",
    ]


def test_every_problem_between_listeners_is_reported(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - {name: a, payload: support:Ping, handler: support:pong, peers: [ghost]}
          - {name: a, payload: support:Ping, handler: support:pong}
        boot: [{to: nobody, payload: p}]
        """,
    ) == [
        "duplicate listener name(s): a",
        "listener 'a': unknown peer 'ghost'",
        "boot message to unknown listener 'nobody'",
    ]


# -- handlers take (payload, meta) -------------------------------------------------------

HANDLERS = """
    from support import Ping

    async def one(payload):
        return None

    def three(payload, meta, extra):
        return None

    def flexible(payload, meta=None, *rest, **options):
        return None

    class Callable:
        def __call__(self, payload, meta):
            return None

    class OneArgument:
        async def __call__(self, payload):
            return None

    callable_object = Callable()
    one_argument = OneArgument()
"""


def test_a_handler_must_accept_payload_and_meta(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        organism: {name: t}
        listeners:
          - {name: a, payload: support:Ping, handler: sig:one}
          - {name: b, payload: support:Ping, handler: sig:three}
          - {name: c, payload: support:Ping, handler: sig:one_argument}
          - {name: d, payload: support:Ping, handler: sig:flexible}
          - {name: e, payload: support:Ping, handler: sig:callable_object}
        """,
        **{"sig.py": HANDLERS},
    ) == [
        "listeners[0] (line 4): listener 'a': the handler must accept (payload, meta), "
        "and one(payload) does not",
        "listeners[1] (line 5): listener 'b': the handler must accept (payload, meta), "
        "and three(payload, meta, extra) does not",
        "listeners[2] (line 6): listener 'c': the handler must accept (payload, meta), "
        "and OneArgument(payload) does not",
    ]


def test_a_listener_built_in_python_checks_its_handler_too() -> None:
    async def lonely(payload: Ping) -> None:
        return None

    with pytest.raises(
        ConfigError, match=r"listener 'x': .*, and lonely\(payload: 'Ping'\) -> 'None' does not$"
    ):
        Listener(name="x", payloads=(Ping,), handler=lonely)
    Listener(name="x", payloads=(Ping,), handler=print)  # no signature to read: trusted


def test_check_reports_a_handler_with_the_wrong_signature(tmp_path: Path) -> None:
    (tmp_path / "sig.py").write_text(textwrap.dedent(HANDLERS))
    path = tmp_path / "o.yaml"
    path.write_text(
        "organism: {name: t}\nlisteners: [{name: a, payload: sig:Ping, handler: sig:one}]\n"
    )
    for command in ("check", "run"):
        result = subprocess.run(
            [sys.executable, "-m", "xml_pipeline", command, str(path)],
            capture_output=True, timeout=60, check=False, cwd=TESTS, input=b"",
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert (
            result.stderr
            == (
                f"xml_pipeline: error: {path}: listeners[0] (line 2): listener 'a': the handler "
                "must accept (payload, meta), and one(payload) does not\n"
            ).encode()
        )


# -- no process-wide side effects --------------------------------------------------------


def test_the_folder_is_appended_to_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    load_text(tmp_path, MINIMAL)
    assert sys.path == [*before, str(tmp_path.resolve())]
    load_text(tmp_path, MINIMAL)
    assert sys.path == [*before, str(tmp_path.resolve())], "once"


SHADOW = """
import sys
from xml_pipeline import load_organism
try:
    load_organism(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
import colorsys
print(colorsys.__file__)
"""


def write_shadowing(tmp_path: Path, handler: str) -> Path:
    (tmp_path / "colorsys.py").write_text("from support import Ping, pong\n")
    (tmp_path / "mine.py").write_text("from support import Ping, pong\n")
    path = tmp_path / "o.yaml"
    path.write_text(
        f"organism: {{name: t}}\nlisteners: [{{name: a, payload: mine:Ping, handler: {handler}}}]\n"
    )
    return path


def run_shadow(path: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SHADOW, str(path)], capture_output=True,
                         text=True, timeout=60, check=True, cwd=TESTS)  # fmt: skip
    return out.stdout.splitlines()


def test_a_module_next_to_the_file_does_not_shadow_an_installed_one(tmp_path: Path) -> None:
    path = write_shadowing(tmp_path, "mine:pong")
    [where] = run_shadow(path)
    assert where != str(tmp_path / "colorsys.py") and where.endswith("colorsys.py")


def test_a_shadowed_handler_module_is_a_clear_error(tmp_path: Path) -> None:
    path = write_shadowing(tmp_path, "colorsys:pong")
    error, where = run_shadow(path)
    assert error == (
        f"ConfigError {path}: listeners[0].handler (line 2): cannot import 'colorsys:pong': "
        f"module 'colorsys' is {where}, not the colorsys.py next to the organism file (a "
        "module of that name is imported already or comes earlier on sys.path): rename yours"
    )


def test_a_module_imported_from_another_folder_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"twin_{tmp_path.name.replace('-', '_')}"
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.py").write_text("from support import Ping, pong\n")
        (tmp_path / folder / "o.yaml").write_text(
            f"organism: {{name: t}}\nlisteners: [{{name: a, payload: {name}:Ping, "
            f"handler: {name}:pong}}]\n"
        )
    try:
        load_organism(tmp_path / "one" / "o.yaml")
        assert not caplog.records
        with caplog.at_level("WARNING", logger="xml_pipeline.config"):
            load_organism(tmp_path / "two" / "o.yaml")
        first = str(tmp_path / "one" / f"{name}.py")
        assert [r.getMessage() for r in caplog.records] == [
            f"{tmp_path / 'two' / 'o.yaml'}: listeners[0].{key} (line 2): '{name}:{attr}' comes "
            f"from elsewhere: module {name!r} is {first}, not the {name}.py next to the "
            "organism file (a module of that name is imported already or comes earlier on "
            "sys.path): rename yours"
            for key, attr in (("payload", "Ping"), ("handler", "pong"))
        ]
    finally:
        sys.modules.pop(name, None)
        for folder in ("one", "two"):
            with contextlib.suppress(ValueError):
                sys.path.remove(str((tmp_path / folder).resolve()))
