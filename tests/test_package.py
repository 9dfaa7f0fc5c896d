"""The package's shape: no private API of torch or the other libraries it builds on, imports in one
direction, and nothing run at import time."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "patchcore_lightning"
LIBRARIES = ("torch", "torchvision", "lightning", "torchmetrics", "faiss", "jsonargparse", "numpy", "PIL")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def test_no_private_api_of_the_libraries():
    found = []
    for name, tree in _modules().items():
        library_names = set()  # local names bound to a library's modules or objects
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in LIBRARIES:
                        library_names.add((alias.asname or alias.name).split(".")[0])
                        if _private(alias.name):
                            found.append(f"{name}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in LIBRARIES:
                for alias in node.names:
                    if _private(f"{node.module}.{alias.name}"):
                        found.append(f"{name}: from {node.module} import {alias.name}")
                    library_names.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in library_names:
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_imports_inside_the_package_form_no_circle():
    graph: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        package = name if name.count(".") == 0 or (PACKAGE.parent / name.replace(".", "/")).is_dir() else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                deps.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("patchcore_lightning"):
                deps.add(node.module)
        graph[name] = deps & set(_modules())
    assert "patchcore_lightning.data.images" in graph["patchcore_lightning.data.mvtec"]  # the walk sees imports
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import circle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_computation_does_not_import_lightning():
    code = (
        "import sys\n"
        "import patchcore_lightning.model, patchcore_lightning.metrics, patchcore_lightning.embedding\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_global_state_is_set_by_the_cli_only():
    """Warning filters, TF32 flags, seeds and environment reads like PL_GLOBAL_SEED appear in cli.py
    alone: the model, the module, the data and the metrics take what they need as arguments."""
    found = []
    for name, tree in _modules().items():
        if name == "patchcore_lightning.cli":
            continue
        for node in ast.walk(tree):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign, ast.Subscript)) else ""
            setter = r"warnings\.(filterwarnings|simplefilter|resetwarnings)\b"
            if isinstance(node, ast.Call) and re.match(setter, text):
                if not _inside(tree, node, "catch_warnings"):  # a with block restores the filters after it
                    found.append(f"{name}:{node.lineno}: {text}")
            elif isinstance(node, ast.Assign) and "allow_tf32" in text.split("=")[0]:
                if not _restored(tree, node):
                    found.append(f"{name}:{node.lineno}: {text}")
            elif isinstance(node, ast.Call) and re.match(r"(torch\.manual_seed|seed_everything)\(", text):
                if not _inside(tree, node, "fork_rng"):
                    found.append(f"{name}:{node.lineno}: {text}")
            elif "PL_GLOBAL_SEED" in text:
                found.append(f"{name}:{node.lineno}: {text}")
    assert found == []


def _restored(tree: ast.Module, assign: ast.Assign) -> bool:
    """Whether ``assign`` sets flags inside a ``@contextmanager`` whose ``finally`` sets each of them back
    (precision.full_float32): the flags are the caller's again when the block ends."""
    flags = [ast.unparse(target) for target in assign.targets]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("contextmanager" in ast.unparse(d) for d in node.decorator_list):
            if any(inner is assign for inner in ast.walk(node)):
                restored = " ".join(
                    ast.unparse(f.targets[0])
                    for t in ast.walk(node) if isinstance(t, ast.Try)
                    for f in t.finalbody if isinstance(f, ast.Assign)
                )
                return all(flag in restored for flag in flags)
    return False


def _inside(tree: ast.Module, call: ast.Call, context: str) -> bool:
    """Whether ``call`` runs inside ``with ...<context>(...)``: ``torch.random.fork_rng`` restores the RNG
    after it, ``warnings.catch_warnings`` the warning filters."""
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(context in ast.unparse(item.context_expr) for item in node.items):
            if any(inner is call for inner in ast.walk(node)):
                return True
    return False
