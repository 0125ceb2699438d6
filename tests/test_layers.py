"""The import structure: no module imports a layer above its own, telemetry is a leaf, the
client never imports the server, and no import circle exists (`TYPE_CHECKING` imports
count: a circle they hide is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"
CLIENT = ROOT / "clients/python"

#: Lowest first: a module may import its own layer and those before it, never one after.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("agentloop.domain", "agentloop.errors", "agentloop.config", "agentloop.schema_limits",
     "agentloop.ranges", "agentloop.tenants", "agentloop.upstreams.spec",
     "agentloop.upstreams.config", "agentloop.tool_calls"),
    ("agentloop.backends",),
    # The routing layer: routes and pools above the backends, below the services.
    ("agentloop.upstreams",),
    # The run store: below the services that drive runs.
    ("agentloop.runs",),
    ("agentloop.services", "agentloop.health"),
    # The doors: the gRPC servicer and the OpenAI-compatible HTTP API.
    ("agentloop.rpc", "agentloop.v1", "agentloop.http"),
    ("agentloop.server", "agentloop.workers", "agentloop.cli", "agentloop.__main__",
     "agentloop.settings_doc"),
)
#: Importable from any layer; imports nothing of the layers but the first.
LEAF = "agentloop.telemetry"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, package: str) -> dict[str, Path]:
    found = {module_name(path, root): path for path in (root / package).rglob("*.py")}
    return {name: path for name, path in found.items() if not name.startswith("agentloop.v1")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `path` imports by absolute name (`from package import submodule`
    resolves to the submodule), including those under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return found


def layer(name: str) -> int | None:
    for rank, members in enumerate(LAYERS):
        if any(name == member or name.startswith(member + ".") for member in members):
            return rank
    return None


SERVER_MODULES = modules(SERVER, "agentloop")
GRAPH = {name: {target for target in imports(name, path, set(SERVER_MODULES))
                if target.split(".")[0] in ("agentloop", "agentloop_client")}
         for name, path in SERVER_MODULES.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in SERVER_MODULES
                if name != "agentloop" and layer(name) is None and not name.startswith(LEAF)]
    assert not unplaced, f"place these in LAYERS (tests/test_layers.py): {unplaced}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items() if layer(name) is not None
        for target in targets
        if (layer(target) or 0) > (layer(name) or 0)
    ]
    assert not upward, upward


def test_telemetry_is_a_leaf() -> None:
    above = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items() if name.startswith(LEAF)
        for target in targets
        if not target.startswith(LEAF) and layer(target) != 0
    ]
    assert not above, above


def test_no_import_circle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            pytest.fail("import circle: " + " -> ".join((*path[path.index(name):], name)))
        if name in done or name not in GRAPH:
            return
        for target in sorted(GRAPH[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, ())


def test_the_client_imports_nothing_of_the_server() -> None:
    client = modules(CLIENT, "agentloop_client")
    assert client
    offending = [
        f"{name} -> {target}"
        for name, path in client.items()
        for target in imports(name, path, set(client))
        if target == "agentloop" or target.startswith("agentloop.")
    ]
    assert not offending, offending
