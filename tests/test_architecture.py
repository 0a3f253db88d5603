"""The package's structure, checked from its source: no import cycles, core below applications.

Imports are read with ``ast`` (function-local ones included), so a cycle hidden behind an
import inside a function is still a cycle here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eslmatch"
CORE = (
    "config",
    "errors",
    "utils",
    "text",
    "model",
    "scoring",
    "losses",
    "data",
    "training",
    "evaluate",
    "truth",
    "annotations",
    "compat",
    "distributed",
    "factory",
)
APPLICATIONS = ("extract", "export", "retrieval", "serve", "demo", "commands", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """eslmatch modules imported by ``name`` (``from . import x`` resolved to ``pkg.x`` when a module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "eslmatch"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "eslmatch":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _ignoring_package_inits(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its modules is not a dependency of those modules
    on each other, so edges into a package ``__init__`` from its own sub-modules are dropped."""
    out = {}
    for name, deps in g.items():
        out[name] = {d for d in deps if not name.startswith(d + ".")}
    return out


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return parts[1]


def test_no_import_cycles():
    cycles = strongly_connected(_ignoring_package_inits(graph()))
    assert cycles == [], f"import cycles among eslmatch modules: {cycles}"


def _module_level_imports(path: Path) -> ast.Module:
    """The package root as run at import: without its module ``__getattr__`` (the lazy doorway to
    applications) and its ``if TYPE_CHECKING:`` block (read by type checkers only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tree.body = [
        n
        for n in tree.body
        if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")
        and not (isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    ]
    return tree


def test_core_never_imports_applications():
    bad = []
    for name, deps in graph().items():
        if layer_of(name) in CORE:
            bad += [f"{name} -> {d}" for d in deps if layer_of(d) in APPLICATIONS]
    assert bad == [], "core modules import applications: " + ", ".join(bad)


def test_the_package_root_reaches_applications_only_lazily():
    """``eslmatch.open_gallery`` is an application's entry point: the root imports it inside its
    module ``__getattr__`` (on first use), never when ``eslmatch`` is imported."""
    root = PACKAGE / "__init__.py"
    tree = _module_level_imports(root)
    eager = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and (node.module or "").split(".")[0] in APPLICATIONS
    ]
    assert eager == [], f"eslmatch/__init__.py imports applications at import time: {eager}"
    import eslmatch

    assert callable(eslmatch.open_gallery) and callable(eslmatch.build_gallery)


def test_every_top_level_module_has_a_layer():
    tops = {layer_of(n) for n in modules()} - {None}
    assert tops <= set(CORE) | set(APPLICATIONS), (
        f"modules outside the layering: {sorted(tops - set(CORE) - set(APPLICATIONS))}"
    )


def test_only_the_factory_names_concrete_families():
    """Outside the model families themselves, only ``eslmatch.factory`` imports their classes."""
    family_modules = {
        "eslmatch.model.esl",
        "eslmatch.model.vse",
        "eslmatch.model.esl_clip",
        "eslmatch.model.esl_clip.model",
    }
    allowed_prefixes = ("eslmatch.model", "eslmatch.factory", "eslmatch.compat")
    bad = [
        f"{name} -> {d}"
        for name, deps in graph().items()
        for d in deps
        if d in family_modules and not name.startswith(allowed_prefixes)
    ]
    assert bad == [], "modules naming concrete model classes outside the factory: " + ", ".join(bad)


def test_retrieval_stays_readable():
    """The gallery package: no module over 600 lines, no function over 80; its model is typed
    as the MatchingModel protocol (never ``Any``) and told apart by its attributes, never by
    ``hasattr``; and no store subclasses another to undo it."""
    long_modules, long_functions, untyped, probes = [], [], [], []
    for path in sorted((PACKAGE / "retrieval").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 600:
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{path.name}:{node.name}")
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    if arg.arg == "model" and (arg.annotation is None or ast.unparse(arg.annotation) == "Any"):
                        untyped.append(f"{path.name}:{node.name}")
        probes += [f"{path.name}: {line.strip()}" for line in text.splitlines() if "hasattr(model" in line]
    assert long_modules == [] and long_functions == [], (long_modules, long_functions)
    assert untyped == [] and probes == [], (untyped, probes)


def test_no_module_probes_the_model_protocol():
    """Issue 32: the trainer, the loss, the ONNX export and the galleries asked a model
    ``getattr(model, "logit_scale", None)`` / ``hasattr(model, "set_gradient_checkpointing")``
    for what :class:`MatchingModel` defines. Every member of the protocol is called, never
    probed: no ``getattr`` / ``hasattr`` anywhere names one (whatever the object's variable is
    called). Argument namespaces (``args``) are exempt: their attributes are option names."""
    import torch.nn as nn

    from eslmatch.model.base import MatchingModel

    members = {n for n in dir(MatchingModel) if not n.startswith("_")} - set(dir(nn.Module))
    members |= set(MatchingModel.__annotations__) | {"preprocess", "text_encoder", "image_encoder"}
    assert {"logit_scale", "set_gradient_checkpointing", "pretrained_backbone", "vocab_size"} <= members
    probes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2):
                continue
            if node.func.id not in ("getattr", "hasattr") or ast.unparse(node.args[0]) == "args":
                continue
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in members:
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert probes == [], "probes of the model protocol: " + "; ".join(probes)


def test_the_wheel_ships_its_types(tmp_path):
    """Issue 32: the wheel had no ``py.typed`` (PEP 561), so a user's mypy treated eslmatch as
    untyped. Built here from the checkout, without network or build isolation."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(root),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("eslmatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "eslmatch/py.typed" in names and "eslmatch/serve/static/index.html" in names
