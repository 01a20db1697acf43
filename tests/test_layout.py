"""The package's layout: the public API is pinned, modules import each other without
cycles, and no module hides an import of another inside a function."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import xml_pipeline

PACKAGE = Path(xml_pipeline.__file__).parent

# Changing this list changes the public API: say so in CHANGELOG.md.
PUBLIC_API = [
    "Abandoned", "Backend", "BackendCorrupted", "BackendError", "BackendFailed",
    "BackendScheme", "BackendUnavailable", "BootMessage", "CORE_NAMESPACE", "Client",
    "ConfigError", "DeadLetter", "DepthExceeded", "Duplicate", "ENVELOPE_NAMESPACE",
    "EgressFailed", "Envelope", "EnvelopeError", "Frame", "FrameCorrupted", "Handler",
    "HandlerFailed", "HandlerMetadata",
    "HandlerResponse", "HandlerTimeout", "HistoryLimits", "Huh", "InvalidReturn", "Listener",
    "ListenerStatistics", "MalformedMessage", "MessageError", "MessageTooLarge", "NoReply",
    "NoRoute", "Organism", "Overloaded", "ParseLimits", "Payload", "PayloadInvalid",
    "PeerDenied", "PoolStatistics", "ProcessPoolSettings", "PumpClosed", "PumpError",
    "PumpSettings", "PumpStatistics", "Reply", "RequestTooLarge", "Slot", "StreamPump",
    "Unanswered", "WorkerCrashed",
    "XmlPipelineError", "__version__", "backend_scheme", "build_envelope", "client_url",
    "codec_for", "error_for_code", "load_organism", "open_backend", "parse_envelope",
    "payload_from_xml", "serves",
]  # fmt: skip


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    found = {"xml_pipeline": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], "xml_pipeline."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None:
            raise LookupError(f"no source for {info.name}")
        found[info.name] = Path(spec.origin)
    return found


def _target(module: str, path: Path, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    """The package modules a ``from ... import ...`` statement imports."""
    if node.level == 0:
        base = node.module or ""
    else:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        if node.module:
            base = f"{base}.{node.module}"
    targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    if len(targets) < len(node.names) and base in modules:
        targets.append(base)  # names from the module itself, not submodules
    return targets


def _top_level_imports(module: str, path: Path, modules: set[str]) -> set[str]:
    imports: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only: not an import at run time
        if isinstance(node, ast.If | ast.Try):
            body[:0] = [*node.body, *getattr(node, "orelse", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            body[:0] = node.body
        elif isinstance(node, ast.ImportFrom):
            imports.update(_target(module, path, node, modules))
        elif isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names if alias.name in modules)
    imports.discard(module)
    return imports


def test_the_public_api_is_pinned() -> None:
    assert sorted(xml_pipeline.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert hasattr(xml_pipeline, name), name


def test_every_public_module_says_what_it_exports() -> None:
    for name, path in _modules().items():
        if any(part.startswith("_") for part in name.split(".")[1:]) or path.stem == "__main__":
            continue
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        for attr in exported:
            assert hasattr(module, attr), f"{name}.__all__ names {attr}, which it lacks"


def test_no_import_cycles() -> None:
    modules = _modules()
    names = set(modules)
    graph = {name: _top_level_imports(name, path, names) for name, path in modules.items()}
    # A module importing its own package (or a parent) is how Python loads submodules,
    # not a cycle: those edges are left out.
    graph = {
        name: {dep for dep in deps if not name.startswith(f"{dep}.")}
        for name, deps in graph.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_no_module_imports_another_inside_a_function() -> None:
    modules = _modules()
    hidden = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (
                    inner.level or (inner.module or "").startswith("xml_pipeline")
                ):
                    hidden.append(f"{name}:{inner.lineno} ({node.name})")
    assert hidden == []
