"""The house rules, checked on the source: one dependency direction between packages, no import circle between
modules, nothing imports the recipe, no private name crosses a module boundary. Every import counts, at module
level or inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "ropescale", "data", "configs", "models", "eval", "training", "launch", "bench")
# What each package may import besides itself (docs/architecture.md). The command-line entry points (``train.py`` and
# the ``__main__.py`` modules) sit on top of everything and may import any library module; ``ropescale/__main__.py``
# only calls launch.rope_cli (test_ropescale_is_rope_only).
ALLOWED = {
    "utils": set(),
    "ropescale": {"utils"},
    "data": {"utils"},
    "configs": {"utils", "ropescale", "data", "eval"},  # eval: each task's settings section (eval/registry.py)
    "models": {"utils", "ropescale", "data"},
    "eval": {"utils", "ropescale", "data", "models"},
    "training": {"utils", "ropescale", "data", "configs", "models", "eval"},
    "launch": {"utils", "ropescale", "data", "configs", "models", "eval", "training"},
    "bench": {"utils", "ropescale", "data", "configs", "models", "eval", "training"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = [ROOT / "train.py", *(p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py"))]
    return {module_name(p): p for p in files}


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import statement of ``path``; the evaluation-task
    registry imports its task modules by name (``TASK_MODULES``), which count as imports too."""
    out = []
    if path == ROOT / "eval" / "registry.py":
        out += [(m, []) for m in registry_modules(path)]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in (*PACKAGES, "train", "tests")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in (*PACKAGES, "train", "tests"):
                continue
            names = [a.name for a in node.names]
            # ``from pkg import module`` imports a module; ``from module import name`` a name of it
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
            out += [(s, []) for s in subs] or [(node.module, names)]
    return out


def registry_modules(path: Path) -> list[str]:
    """The module names of eval/registry.py's ``TASK_MODULES`` tuple."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TASK_MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def external_imports(path: Path) -> set[str]:
    """The top-level names of every package ``path`` imports (project or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def is_entry_point(module: str) -> bool:
    return module == "train" or module.endswith("__main__")


def test_the_sources_are_found():
    modules = sources()
    assert {"train", "training.model", "utils.files", "models.load", "data.prompts"} <= modules.keys()


def entry_point_imports(modules: dict[str, Path]) -> list:
    """Imports of train.py or a ``__main__`` module (tests may run the CLIs' ``main``, never the recipe)."""
    return [(m, t) for m, p in modules.items() for t, _ in imports(p, modules)
            if is_entry_point(t) and not (m.startswith("tests") and t != "train")]


def private_imports(modules: dict[str, Path]) -> list:
    """Names starting with ``_`` taken from another module, and imports of modules named ``_x``."""
    bad = [(m, t, n) for m, p in modules.items() for t, names in imports(p, modules) for n in names
           if n.startswith("_") and t != m]
    return bad + [(m, t) for m, p in modules.items() for t, _ in imports(p, modules)
                  if any(part.startswith("_") and part != "__main__" for part in t.split("."))]


def upward_imports(modules: dict[str, Path]) -> list:
    """Imports against ``ALLOWED`` (entry points exempt)."""
    bad = []
    for m, p in modules.items():
        pkg = m.split(".")[0]
        if pkg not in ALLOWED or is_entry_point(m):
            continue
        bad += [f"{m} -> {t}" for t, _ in imports(p, modules)
                if t.split(".")[0] != pkg and t.split(".")[0] not in ALLOWED[pkg]]
    return bad


def circles(modules: dict[str, Path]) -> list:
    """Import circles between modules (depth-first search over the explicit edges)."""
    graph = {m: {t for t, _ in imports(p, modules) if t in modules and t != m} for m, p in modules.items()}
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_nothing_imports_the_recipe_or_an_entry_point():
    assert not entry_point_imports(sources())


def test_no_private_name_crosses_a_module_boundary():
    assert not private_imports(sources())


def test_packages_import_only_downward():
    assert not upward_imports(sources()), "imports against the layering (docs/architecture.md)"


def test_ropescale_is_rope_only():
    """ropescale computes (methods, apply, inspect's and the planner's numbers): no project package but utils, no
    matplotlib; its ``__main__`` is a shim over launch.rope_cli, the command that loads models and draws."""
    modules = sources()
    for m, p in modules.items():
        if m.split(".")[0] != "ropescale":
            continue
        used = external_imports(p)
        assert "matplotlib" not in used, m
        if m == "ropescale.__main__":
            assert {t for t, _ in imports(p, modules)} == {"launch.rope_cli", "utils.cli"}
        else:
            assert {t.split(".")[0] for t, _ in imports(p, modules)} <= {"ropescale", "utils"}, m


def test_the_registry_counts_as_importing_its_tasks():
    modules = sources()
    assert {"eval.perplexity", "eval.passkey", "eval.ruler"} <= {t for t, _ in imports(modules["eval.registry"],
                                                                                          modules)}


def test_no_import_circle_between_modules():
    assert not circles(sources())


def test_each_rule_reports_a_violation(tmp_path):
    """The checks can fail: a small tree that breaks each rule once is reported by each."""
    files = {
        "data/a.py": "from eval.common import _jsonable\n",       # data -> eval, and a private name
        "eval/common.py": "import train\nimport data.a\n",     # the recipe imported; a circle with data.a
        "train.py": "",
    }
    modules = {}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
        modules[rel.removesuffix(".py").replace("/", ".")] = tmp_path / rel
    assert upward_imports(modules) == ["data.a -> eval.common", "eval.common -> train"]
    assert private_imports(modules) == [("data.a", "eval.common", "_jsonable")]
    assert entry_point_imports(modules) == [("eval.common", "train")]
    assert circles(modules) == [["data.a", "eval.common", "data.a"]]
