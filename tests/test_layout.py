"""The layout's rules, checked on the sources: imports run one way (the HTTP side may use the engine's
messages, the engine never imports the HTTP side), no module imports itself back through others,
and the HTTP process starts without torch or the engine."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTTP_SIDE = ("app", "batch_processor", "server")  # the HTTP process's modules (server.*)
ENGINE_SIDE = ("engine", "medusa_model", "load_medusa_from_hf")
PACKAGES = ("config", "engine", "server", "training", "bench")
TOP = ("app", "batch_processor", "medusa_model", "load_medusa_from_hf", "benchmark")


def project_modules() -> dict[str, Path]:
    modules = {name: ROOT / f"{name}.py" for name in TOP}
    for package in PACKAGES:
        modules |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at any depth (lazy imports in functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def side(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_engine_never_imports_the_http_side():
    wrong = {m: sorted(i for i in deps if side(i, HTTP_SIDE))
             for m, deps in graph().items() if side(m, ENGINE_SIDE)}
    assert not {m: d for m, d in wrong.items() if d}


def test_the_http_side_uses_only_the_engines_messages():
    lazy = {"batch_processor": {"engine.process"}, "app": {"engine.process"}}  # started in the engine process only
    wrong = {m: sorted(i for i in deps - lazy.get(m, set()) if side(i, ENGINE_SIDE) and i != "engine.messages")
             for m, deps in graph().items() if side(m, HTTP_SIDE)}
    assert not {m: d for m, d in wrong.items() if d}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path[path.index(n):] + [n]) if n in path else n}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_messages_and_the_settings_do_not_import_torch():
    """At module level (Settings.resolved_device imports torch when it is called: in the engine process)."""
    for name in ("engine.messages", "config.settings"):
        body = ast.parse(project_modules()[name].read_text()).body
        imported = {a.name for n in body if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {i for i in imported if i.split(".")[0] in ("torch", "transformers", "engine") and i != name}


def test_the_http_process_starts_without_torch_or_the_engine():
    script = ("import sys, app; print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'deepspeed', 'engine', 'training', 'bench')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['engine', 'engine.messages']"


def test_every_module_says_what_it_is():
    for name, path in project_modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{name} has no docstring"
    for package in PACKAGES:
        assert ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())), package
