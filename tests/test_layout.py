"""The package's shape, checked from its source (ast, no imports): module sizes, the import layers, no import
cycles, no private names imported across modules, and each shared concept defined once. A change that breaks
one of these fails here with the module and the line to look at."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "dist_dejpeg"
MAX_LINES = 400
MAX_LINES_OF = {"dist_dejpeg.train.trainer": 350}

# Layers: a LOWER folder never imports an UPPER one (the lower ones import each other: models.generator_file
# imports data.shards, metrics imports models.lpips); TORCH_FREE ones import no torch and no folder but
# each other; and no cycles.
LOWER = ("dist_dejpeg.train", "dist_dejpeg.data", "dist_dejpeg.models", "dist_dejpeg.metrics", "dist_dejpeg.run",
         "dist_dejpeg.jpeg", "dist_dejpeg.config")
UPPER = ("dist_dejpeg.restore", "dist_dejpeg.evaluation", "dist_dejpeg.bench", "dist_dejpeg.cli", "dist_dejpeg.cli_args",
         "dist_dejpeg.cli_use", "dist_dejpeg.cli_output")
TORCH_FREE = ("dist_dejpeg.run", "dist_dejpeg.jpeg")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports(name: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import in the module, at any depth (lazy imports count)."""
    found = []
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def own_targets(name: str) -> set[str]:
    """The package's modules this one imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    targets = set()
    for _, module, names in imports(name):
        if not module.startswith("dist_dejpeg"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        targets.update(subs or [module])
    targets.discard(name)
    return {t for t in targets if t in MODULES}


def too_long(modules: dict[str, Path]) -> str:
    """What to do about the modules over their line limit, or "" when none is."""
    long = {name: n for name, path in modules.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES_OF.get(name, MAX_LINES)}
    if not long:
        return ""
    return (f"modules over their line limit ({MAX_LINES} lines; the per-module caps are MAX_LINES_OF in "
            f"tests/test_layout.py: {MAX_LINES_OF}): {long}. Move a coherent part of the module (a class, a group "
            f"of helpers) into a sibling module and import it from there")


def test_no_module_is_too_long(tmp_path):
    assert not (message := too_long(MODULES)), message
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_LINES + 1))
    message = too_long({"dist_dejpeg.big": big})
    assert f"{{'dist_dejpeg.big': {MAX_LINES + 1}}}" in message and "sibling module" in message and "MAX_LINES_OF" in message


def test_lower_layers_never_import_upper_ones():
    bad = [f"{name}:{line} imports {module}" for name in MODULES if within(name, LOWER)
           for line, module, _ in imports(name) if within(module, UPPER)]
    assert not bad, "\n".join(bad)


def test_restore_and_evaluation_start_from_the_generator_file_not_the_trainer():
    bad = [f"{name}:{line} imports {module}" for name in MODULES
           if within(name, ("dist_dejpeg.restore", "dist_dejpeg.evaluation"))
           for line, module, _ in imports(name) if within(module, ("dist_dejpeg.train",))]
    assert not bad, "\n".join(bad)


def test_run_and_jpeg_are_torch_free_and_import_nothing_above_them():
    bad = []
    for name in MODULES:
        if not within(name, TORCH_FREE):
            continue
        for line, module, _ in imports(name):
            if module.split(".")[0] in ("torch", "torchvision", "accelerate", "timm", "lpips"):
                bad.append(f"{name}:{line} imports {module}")
            elif module.startswith("dist_dejpeg") and not within(module, TORCH_FREE):
                bad.append(f"{name}:{line} imports {module} (above the torch-free layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: own_targets(name) for name in MODULES}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a submodule importing its own package's __init__
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{name}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {module}"
           for name in MODULES for line, module, names in imports(name)
           if module.startswith("dist_dejpeg") and any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not bad, "\n".join(bad)


def definitions(pattern: str) -> list[str]:
    """Where a module-level (or class-level) assignment's source matches ``pattern``."""
    rx, found = re.compile(pattern), []
    for name, tree in TREES.items():
        source = MODULES[name].read_text()
        top = tree.body + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for node in top:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                text = ast.get_source_segment(source, node) or ""
                if rx.search(text):
                    found.append(f"{name}:{node.lineno}")
    return found


@pytest.mark.parametrize("what, pattern, home", [
    ("the checkpoint folder name", r"step-\(\\d\{8\}\)", "dist_dejpeg.run.layout"),
    ("the image suffixes", r"\"\.png\".*\"\.jpe?g\"|\"\.jpe?g\".*\"\.png\"", "dist_dejpeg.jpeg.formats"),
    ("the shard image extensions", r"\(\"png\", \"raw\"", "dist_dejpeg.jpeg.formats"),
    ("the JFIF colour transform", r"0\.168736", "dist_dejpeg.jpeg.formats"),
    ("the run folder's file names", r"= \"(progress|metrics)\.json\"|= \"generator\.safetensors\"",
     "dist_dejpeg.run.layout"),
])
def test_each_shared_table_is_defined_once(what, pattern, home):
    found = definitions(pattern)
    assert found and all(f.startswith(home + ":") for f in found), (
        f"{what} must be defined in {home} only, found at: {found}")


def test_the_checks_see_the_whole_package():
    """The checks above parse every module: a sanity check that the walk found the layout's folders."""
    folders = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert {"run", "jpeg", "data", "models", "metrics", "train", "restore", "evaluation", "bench"} <= folders
    assert own_targets("dist_dejpeg.train.checkpoint") >= {"dist_dejpeg.run.layout"}
