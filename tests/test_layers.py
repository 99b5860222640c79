"""The package's imports follow ARCHITECTURE.md: no module imports a higher layer than its own,
and no import cycle. Every import counts, those inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moee_fast"

# ARCHITECTURE.md's layers, lowest first: a module may import its own layer and those below.
LAYERS = [
    ("base", ["moee_fast.checks", "moee_fast.files", "moee_fast.openmp", "moee_fast.extension", "moee_fast._C", "moee_fast.kernels"]),
    ("ops and formats", ["moee_fast.ops", "moee_fast.packing", "moee_fast.prompts", "moee_fast.adapters"]),
    ("embeddings and fast path", ["moee_fast.embeddings", "moee_fast.similarity", "moee_fast.fastpath"]),
    ("loading", ["moee_fast.loading"]),
    ("encoder", ["moee_fast.encoder"]),
    ("applications and public API", ["moee_fast", "moee_fast.corpus", "moee_fast.serve", "moee_fast.mteb",
                                     "moee_fast.ray", "moee_fast.demo", "moee_fast.vllm"]),
    ("command line", ["moee_fast.cli"]),
]
# Kernels depend on nothing of the package that wraps them.
SELF_CONTAINED = {"moee_fast.kernels"}


def layer_of(module: str) -> int:
    best = max((prefix for _, prefixes in LAYERS for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if best in prefixes)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def compiled() -> set[str]:
    """Extension modules built into the package (moee_fast._C)."""
    return {"moee_fast." + path.name.split(".")[0] for path in PACKAGE.glob("*.so")} | {"moee_fast._C"}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "moee_fast" or t.startswith("moee_fast."))
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found) | compiled()
    return {name: imports(name, path, known) for name, path in found.items()}


def test_no_module_imports_a_higher_layer_and_kernels_import_nothing_of_the_package():
    violations = []
    for name, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                violations.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
            if any(name.startswith(k) for k in SELF_CONTAINED) and not any(target.startswith(k) for k in SELF_CONTAINED):
                violations.append(f"{name} imports {target}: kernels import nothing from moee_fast")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycle():
    edges = graph()
    visiting, done, cycles = [], set(), []

    def visit(name):
        if name in visiting:
            cycles.append(" -> ".join(visiting[visiting.index(name):] + [name]))
            return
        if name in done:
            return
        visiting.append(name)
        for target in sorted(edges.get(name, ())):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(edges):
        visit(name)
    assert not cycles, "\n".join(cycles)


def test_every_module_has_a_layer():
    assert all(layer_of(name) >= 0 for name in modules())


TESTS = Path(__file__).resolve().parent
SHARED_BY_IMPORT: set[tuple[str, str]] = set()  # (test file, test file it may import): none


def test_tests_import_neither_the_benchmarks_nor_another_test_file():
    """Tests import the package and their shared helpers (conftest, the reference modules); only
    test_benchmarks, which tests the benchmark scripts, imports them."""
    violations = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "benchmarks" and path.stem != "test_benchmarks":
                    violations.append(f"{path.name} imports {target}")
                elif top.startswith("test_") and (path.stem, top) not in SHARED_BY_IMPORT:
                    violations.append(f"{path.name} imports the test file {top}")
    assert not violations, "\n".join(violations)
