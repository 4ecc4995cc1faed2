"""The package's shape (README "Layout"): layers that import only the layers below them, no
import circles between modules (function-level imports included), the model code free of
DeepSpeed and torch.distributed, and one module that calls ``deepspeed.initialize``."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vla_ds"
# Bottom to top; a layer may import its own modules and those of the layers before it.
LAYERS = ["ground", "data", "models", "training", "policy_tools", "planning", "serving", "sim"]
GROUND = {"__init__", "batch", "errors", "log", "dataclass_io", "user_cache"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The vla_ds modules ``path`` imports, anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vla_ds":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "vla_ds")
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in GROUND:
        return "ground"
    return parts[1]


def test_the_ground_floor_and_the_layers_are_what_the_readme_says():
    top_level = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_level == GROUND
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS[1:])


def test_every_layer_imports_only_the_layers_below_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        here = LAYERS.index(_layer(name))
        for target in _imports(path, modules):
            if LAYERS.index(_layer(target)) > here:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = {name: {t for t in _imports(path, modules) if t in modules and t != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_model_code_never_starts_deepspeed_and_one_module_initializes_it():
    uses = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(PACKAGE.parent))
        if "deepspeed.initialize(" in text:
            uses["initialize"].append(rel)
        if rel.startswith("vla_ds/models/"):
            tree = ast.parse(text)
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                uses["models"] += [f"{rel}: {n}" for n in names
                                   if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed")]
    assert uses["initialize"] == ["vla_ds/training/engine.py"]
    assert uses["models"] == []
