"""The layout rules of the package, read from the source (ast), not from what happens to be imported.

- Every op folder ``relaxkv_kernels/ops/<op>/`` has ``op.py`` (registration, checks, backends) and
  ``reference.py`` (the pure-PyTorch semantics).
- ``relaxkv_kernels.ops.<op>.reference`` is imported only by its own ``ops.<op>.op`` (the reference
  backend) and by other ``reference`` modules (references build on references): everything else goes
  through the public op, so a reference is never a second, unchecked entry point.
- The package imports without triton: only the ``triton.py`` kernel files, ``ops/triton_common.py`` and
  ``ops/triton_attention.py`` import it (or import those files) at module level; everything else loads them lazily.
- No import loop, between modules or between op folders and subpackages, lazy imports included.
- relaxkv_gen (python/) imports relaxkv_kernels through its public API only (``PUBLIC_MODULES``).
- The repository passes ``ruff check`` (the rules in pyproject.toml's ``[tool.ruff]``); skipped where ruff is
  not installed (the ``test`` extra brings it).
"""
from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "relaxkv_kernels"
OPS = PACKAGE / "ops"
TRITON_FILES = {"relaxkv_kernels.ops.triton_common", "relaxkv_kernels.ops.triton_attention"}  # plus every
# relaxkv_kernels.ops.<op>.triton
PUBLIC_MODULES = {  # what a codebase outside the package (relaxkv_gen) may import
    "relaxkv_kernels": PACKAGE / "__init__.py",
    "relaxkv_kernels.distributed": PACKAGE / "distributed.py",
    "relaxkv_kernels.integrations.diffusers": PACKAGE / "integrations" / "diffusers.py",
}


def _module_name(path: Path) -> str:
    """Dotted name of a source file under ROOT (relaxkv_kernels/...) or ROOT/python (relaxkv_gen/...)."""
    base = ROOT / "python" if path.is_relative_to(ROOT / "python") else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "python").rglob("*.py"))


def _read(paths) -> dict[Path, str]:
    return {path: path.read_text() for path in paths}


def _imports(path: Path, source: str, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (the text of ``path``), relative imports resolved.
    ``from a import b`` yields a and a.b (b may be a submodule). ``module_level_only``: skip imports inside
    functions (run lazily)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((child.lineno, base))
                found.extend((child.lineno, f"{base}.{alias.name}") for alias in child.names if alias.name != "*")
            visit(child)

    visit(ast.parse(source, filename=str(path)))
    return found


def public_names(module: str) -> set[str] | None:
    """The public names of a public module of the package (``__all__`` where it has one, else its names without a
    leading underscore); None for a module outside the public API."""
    path = PUBLIC_MODULES.get(module)
    if path is None:
        return None
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}


def private_api_violations(files: dict[Path, str]) -> list[str]:
    """'file:line: ...' for every import of relaxkv_kernels that reaches past its public API: a module outside
    ``PUBLIC_MODULES`` or a name the module does not export."""
    bad = []
    for path, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                uses = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                uses = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in uses:
                if module.split(".")[0] != "relaxkv_kernels":
                    continue
                names = public_names(module)
                if names is None or (name is not None and name not in names):
                    what = module if name is None else f"{module}.{name}"
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {what}, not public API")
    return sorted(bad)


def _op_folders() -> list[Path]:
    return sorted(p for p in OPS.iterdir() if (p / "__init__.py").is_file())


def _is_reference(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 4 and parts[:2] == ["relaxkv_kernels", "ops"] and parts[3] == "reference"


def reference_import_violations(files: dict[Path, str]) -> list[str]:
    """'file:line: importer imports reference' for every import of an op's reference from a module that is
    neither that op's op.py nor a reference module."""
    bad = []
    for path, source in files.items():
        importer = _module_name(path)
        for line, module in _imports(path, source):
            if not _is_reference(module) or _is_reference(importer):
                continue
            if importer == module.rpartition(".")[0] + ".op":
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {importer} imports {module}")
    return sorted(set(bad))


def triton_import_violations(files: dict[Path, str]) -> list[str]:
    """'file:line: ...' for every module-level import of triton (or of a module that imports it at module
    level: a Triton kernel file, triton_common) outside the Triton kernel files."""
    bad = []
    for path, source in files.items():
        importer = _module_name(path)
        if importer in TRITON_FILES or importer.endswith(".triton"):
            continue
        for line, module in _imports(path, source, module_level_only=True):
            imports_triton = module == "triton" or module.startswith("triton.")
            kernel_file = module.startswith("relaxkv_kernels.") and module.endswith(".triton")
            if imports_triton or kernel_file or module in TRITON_FILES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {importer} imports {module} at module level")
    return sorted(set(bad))


def op_unit(module: str) -> str:
    """The unit of the package ``module`` belongs to: its op folder (``relaxkv_kernels.ops.<op>``) or other
    subpackage (``relaxkv_kernels.<sub>``), else itself (a top-level module, a shared ``ops`` helper)."""
    parts = module.split(".")
    return ".".join(parts[:3] if parts[:2] == ["relaxkv_kernels", "ops"] else parts[:2])


def import_graph(files: dict[Path, str], unit=lambda module: module) -> dict[str, set[str]]:
    """``unit(module)`` -> the ``unit``s of the package modules it imports, at module level or inside a function
    (a lazy import closes a loop as surely: it only delays it). ``from a import b``: a.b where b is a module, else a.
    Imports within one unit are left out."""
    modules = {_module_name(path) for path in files}
    graph = {unit(name): set() for name in modules}
    for path, source in files.items():
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                            for alias in node.names}
        graph[unit(name)] |= {unit(target) for target in targets & modules} - {unit(name)}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``, each as the modules along it (first repeated last)."""
    cycles, done, path = [], set(), []

    def visit(name):
        if name in path:
            cycles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    return cycles


@pytest.mark.parametrize("unit", [None, op_unit], ids=["modules", "op-folders"])
def test_the_package_has_no_import_cycle(unit):
    """No loop between modules, nor between op folders and subpackages (``ops.a`` importing ``ops.b`` while
    ``ops.b`` imports ``ops.a``: a sideways link), lazy imports included."""
    graph = import_graph(_read(sorted(PACKAGE.rglob("*.py"))), *([unit] if unit else []))
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in relaxkv_kernels:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("planted, unit, cycle", [
    pytest.param("from .op import resolve_engine\n", None,
                 ["relaxkv_kernels.ops.dense_attention.op", "relaxkv_kernels.ops.dense_attention.tuning"],
                 id="module-level"),
    pytest.param("def load():\n    from .op import resolve_engine\n", None,
                 ["relaxkv_kernels.ops.dense_attention.op", "relaxkv_kernels.ops.dense_attention.tuning"],
                 id="lazy"),
    pytest.param("def load():\n    from ..sparse_kv_attention.op import sparse_kv_attention\n", op_unit,
                 ["relaxkv_kernels.ops.dense_attention", "relaxkv_kernels.ops.sparse_kv_attention"],
                 id="lazy-between-op-folders"),
])
def test_the_cycle_rule_catches_a_loop(planted, unit, cycle):
    """A loop planted in dense_attention's tuning.py: back to its own op.py (which imports tuning), at module level or
    inside a function, or into sparse_kv_attention's op.py (which imports dense_attention) inside a function."""
    files = _read(sorted(PACKAGE.rglob("*.py")))
    tuning = PACKAGE / "ops" / "dense_attention" / "tuning.py"
    files[tuning] = planted + files[tuning]
    assert [*cycle, cycle[0]] in import_cycles(import_graph(files, *([unit] if unit else [])))


def test_the_package_has_op_folders():
    names = {p.name for p in _op_folders()}
    assert {"rope_append", "sparse_kv_attention", "relax_select", "mid_select", "compress_kv", "gather_kv_rope",
            "dense_attention"} <= names


@pytest.mark.parametrize("folder", _op_folders(), ids=lambda p: p.name)
def test_op_folder_has_op_and_reference(folder):
    missing = [f for f in ("op.py", "reference.py") if not (folder / f).is_file()]
    assert not missing, f"relaxkv_kernels/ops/{folder.name}/ lacks {', '.join(missing)}"


def test_references_are_imported_only_by_their_op_and_other_references():
    bad = reference_import_violations(_read(_sources()))
    assert not bad, "an op's reference imported outside its op.py / other references:\n" + "\n".join(bad)


def test_triton_is_imported_only_by_the_triton_kernel_files():
    bad = triton_import_violations(_read(sorted(PACKAGE.rglob("*.py"))))
    assert not bad, "module-level triton imports (the package must import without triton):\n" + "\n".join(bad)


def test_package_imports_without_triton():
    """The rule above, observed: with triton unimportable, the package and every op.py import."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import relaxkv_kernels, relaxkv_kernels.cache, relaxkv_kernels.ops.dense_attention.tuning\n"
            "from relaxkv_kernels.ops import " + ", ".join(p.name for p in _op_folders()) + "\n"
            "assert 'triton' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_generator_uses_only_the_public_api():
    bad = private_api_violations(_read(sorted((ROOT / "python").rglob("*.py"))))
    assert not bad, "relaxkv_gen reaches past relaxkv_kernels' public API:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, ok", [
    pytest.param("import relaxkv_kernels as rk\nfrom relaxkv_kernels import RankGroup\n", True, id="public"),
    pytest.param("from relaxkv_kernels.integrations.diffusers import attach\n", True, id="integration"),
    pytest.param("from relaxkv_kernels.memory.heads import RankGroup\n", False, id="private-module"),
    pytest.param("from relaxkv_kernels.integrations.diffusers import _Attachment\n", False, id="private-name"),
    pytest.param("def load():\n    import relaxkv_kernels.ops.dispatch\n", False, id="lazy-private-module"),
])
def test_the_public_api_rule_catches_a_private_import(source, ok):
    bad = private_api_violations({ROOT / "python" / "relaxkv_gen" / "cli.py": source})
    assert (bad == []) == ok, bad


@pytest.mark.parametrize("source, rule, expected", [
    pytest.param("from ..mid_select.reference import mid_affinity_ref\n", reference_import_violations,
                 "relaxkv_kernels.ops.rope_append.cuda imports relaxkv_kernels.ops.mid_select.reference",
                 id="reference-relative"),
    pytest.param("from relaxkv_kernels.ops.mid_select import reference\n", reference_import_violations,
                 "imports relaxkv_kernels.ops.mid_select.reference", id="reference-as-name"),
    pytest.param("from .reference import rope_append_ref\n", reference_import_violations,
                 "relaxkv_kernels.ops.rope_append.cuda imports relaxkv_kernels.ops.rope_append.reference",
                 id="own-reference-outside-op"),
    pytest.param("import triton.language as tl\n", triton_import_violations,
                 "relaxkv_kernels.ops.rope_append.cuda imports triton.language at module level", id="triton"),
    pytest.param("if True: from .triton import rope_append_triton\n", triton_import_violations,
                 "imports relaxkv_kernels.ops.rope_append.triton at module level", id="kernel-file"),
])
def test_rules_catch_a_bad_import(source, rule, expected):
    """The rules fail on a bad import planted in an op's cuda.py (file and line named). Done lazily (inside a
    function) it still breaks the reference rule, and no longer the triton one."""
    path = OPS / "rope_append" / "cuda.py"  # the path gives the module name; the text is planted
    bad = rule({path: "import torch\n\n" + source})
    assert len(bad) == 1 and expected in bad[0], bad
    assert bad[0].startswith("relaxkv_kernels/ops/rope_append/cuda.py:3: "), bad
    lazy = rule({path: "def load():\n" + "".join(f"    {line}\n" for line in source.splitlines())})
    assert lazy == ([] if rule is triton_import_violations else [bad[0].replace(":3: ", ":2: ")])


def _ruff() -> list[str]:
    """The command that runs ruff: the module beside this interpreter, else a ``ruff`` on PATH."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    return [exe]


def test_ruff_check_passes():
    """``ruff check .`` from the repository root reports nothing (what .ci/run also runs)."""
    cmd = [*_ruff(), "check", "--no-cache", "--output-format", "concise", "."]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"ruff check failed (exit {res.returncode}):\n{res.stdout[-8000:]}{res.stderr[-2000:]}",
                    pytrace=False)
