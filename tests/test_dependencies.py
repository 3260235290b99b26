"""Every third-party import is declared in pyproject.toml, in the core or in the extra of the code that imports it.

The imports are read from the source (ast), so the test sees what a fresh `pip install ipadapter[...]` must bring,
not what happens to be installed here. Which extra each place may use is data below; README "Install" explains it.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ipadapter import extras

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Besides the core, the extra that the code in each place may use (the longest matching prefix wins).
PLACES = {
    "src/ipadapter/": None,
    "src/ipadapter/train/": "train",
    "src/ipadapter/batch/accelerated.py": "train",
    "src/ipadapter/evaluate/": "eval",
    "src/ipadapter/evaluate/judges.py": None,  # CLIP judges on the core's torch + transformers (the miniature's judge)
    "src/ipadapter/miniature/quality.py": "eval",
    "src/ipadapter/miniature/report.py": "eval",
    "src/ipadapter/miniature/protocol.py": "eval",
    "src/ipadapter/app/": "app",
    "tests/": "test",
    "benchmarks/": "test",  # imported by tests/test_benchmarks.py
    "scripts/": "test",
}
# Used where needed, never imported at module level outside `try: ... except ImportError`: the code says what to
# install when they are missing (face: the `face` extra; lpips: `pip install lpips`, docs/evaluation.md).
OPTIONAL = {"insightface", "lpips", "bitsandbytes"}
# Loaded by a library by name rather than imported: accelerate's TensorBoard tracker (`log_with="tensorboard"`).
LOADED_BY_NAME = {"train": {"tensorboard"}}
FIRST_PARTY = {"ipadapter", "tests", "benchmarks"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> dict[str | None, list[Requirement]]:
    """pyproject's requirements per extra (None: the core)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = {None: project["dependencies"], **project.get("optional-dependencies", {})}
    return {extra: [Requirement(text) for text in texts] for extra, texts in raw.items()}


def declared() -> dict[str | None, set[str]]:
    """Distribution names per extra (None: the core), an extra's own `ipadapter[...]` references expanded."""
    reqs = requirements()

    def names(extra: str | None) -> set[str]:
        out = set()
        for req in reqs[extra]:
            if normalize(req.name) == "ipadapter":
                out |= set().union(*(names(e) for e in req.extras))
            else:
                out.add(normalize(req.name))
        return out

    return {extra: names(extra) for extra in reqs}


@functools.cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()


def distribution(module: str) -> str:
    """The distribution that installs `module`; a module not installed here is assumed to share its name."""
    found = installed().get(module, [module])
    return normalize(found[0])


def place_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT).as_posix()
    prefix = max((p for p in PLACES if rel.startswith(p)), key=len)
    return PLACES[prefix]


def deferred(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether the import `node` runs only when a function is called, sits in a `try` that catches ImportError, or
    never runs (`if TYPE_CHECKING:`, for annotations)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
        if isinstance(node, ast.If) and child in node.body and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return True
        if isinstance(node, ast.Try) and child in node.body:
            caught = [h.type for h in node.handlers if h.type is not None]
            names = {n.id for t in caught for n in ast.walk(t) if isinstance(n, ast.Name)}
            if names & {"ImportError", "ModuleNotFoundError"}:
                return True
    return False


def imported_names(path: Path, members: bool = False) -> list[tuple[str, bool]]:
    """(dotted name, whether the import is deferred) for each absolute import in `path`; `members` adds
    `module.member` for every `from module import member`."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *((f"{node.module}.{a.name}" for a in node.names) if members else ())]
        else:
            continue
        found += [(name, deferred(node, parents)) for name in names]
    return found


def third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, whether the import is deferred) for each import of a third-party module."""
    tops = [(name.split(".")[0], lazy) for name, lazy in imported_names(path)]
    return [(top, lazy) for top, lazy in tops if top not in sys.stdlib_module_names and top not in FIRST_PARTY]


def first_party_imports(path: Path) -> list[tuple[Path, bool]]:
    """(source file, whether the import is deferred) for each import of an ipadapter module."""
    found = []
    for name, lazy in imported_names(path, members=True):
        base = ROOT / "src" / name.replace(".", "/")
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if name.startswith("ipadapter") and file.is_file():
                found.append((file, lazy))
    return found


def sources() -> list[Path]:
    return sorted(p for folder in ("src", "tests", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py"))


def undeclared(deps: dict[str | None, set[str]]) -> list[str]:
    problems = []
    for path in sources():
        extra = place_of(path)
        allowed = deps[None] | deps.get(extra, set())
        for module, is_deferred in third_party_imports(path):
            if module in OPTIONAL:
                if not is_deferred:
                    problems.append(f"{path.relative_to(ROOT)}: optional {module} imported at module level")
            elif distribution(module) not in allowed:
                where = f"the core or {extra}" if extra else "the core"
                problems.append(f"{path.relative_to(ROOT)}: {module} ({distribution(module)}) not in {where}")
    for extra, modules in LOADED_BY_NAME.items():
        problems += [f"{m} (loaded by name) not in {extra}" for m in modules if distribution(m) not in deps.get(extra, set())]
    return sorted(set(problems))


def test_every_import_is_declared_in_core_or_its_extra() -> None:
    assert undeclared(declared()) == []


def test_core_modules_load_no_extra_code_when_imported() -> None:
    """Code that needs an extra is imported inside the functions that use it (behind the CLI's extra check), so
    importing a core module, as `ipadapter generate` does, never reaches it."""
    problems = [
        f"{path.relative_to(ROOT)} imports {target.relative_to(ROOT)}"
        for path in sources() if place_of(path) is None and path.is_relative_to(ROOT / "src")
        for target, is_deferred in first_party_imports(path) if not is_deferred and place_of(target) is not None
    ]
    assert problems == []


def test_the_check_finds_an_undeclared_import() -> None:
    """Without scipy in the eval extra, evaluate/metrics.py (which imports it) is reported."""
    deps = declared()
    deps["eval"] = deps["eval"] - {"scipy"}
    assert any("evaluate/metrics.py: scipy" in p for p in undeclared(deps))


def test_the_cli_checks_what_each_extra_installs() -> None:
    """`ipadapter.extras.MODULES[x]` (what the CLI looks for before a command of extra x) is exactly the non-core
    modules the extra's code imports, and each of them is declared in that extra."""
    deps = declared()
    for extra, modules in extras.MODULES.items():
        # A requirement for other Pythons only (tomli) is not looked for on this one.
        here = {normalize(r.name) for r in requirements().get(extra, []) if r.marker is None or r.marker.evaluate()}
        wanted = set(LOADED_BY_NAME.get(extra, ()))
        for path in sources():
            if place_of(path) == extra:
                wanted |= {m for m, _ in third_party_imports(path) if m not in OPTIONAL and distribution(m) in here}
        assert set(modules) == wanted, extra
        assert {distribution(m) for m in modules} <= deps.get(extra, set()), extra


@pytest.mark.parametrize("extra", ["train", "eval", "app", "e2e"])
def test_the_test_extra_installs_everything_the_suite_needs(extra: str) -> None:
    deps = declared()
    assert deps.get(extra, {extra}) <= deps["test"]


# The first torch release with each API the package's code calls (torch's release notes), and the torch floor the
# core's other requirements set themselves (transformers 5 disables PyTorch below 2.6: its utils/import_utils.py).
# The floor in pyproject.toml must be at least each of these: it is only tested at the pinned torch, so it must not
# claim an older one.
TORCH_SINCE = {
    "nn.RMSNorm": "2.4",
    "torch.compiler.is_compiling": "2.3",
    "torch.compiler.disable": "2.1",
    "mmap=True": "2.1",
}
TORCH_FOR_REQUIREMENTS = "2.6"


def torch_floor_needed(paths: list[Path]) -> tuple[str, list[str]]:
    from packaging.version import Version

    used = sorted({api for path in paths for api in TORCH_SINCE if api in path.read_text()})
    return str(max([Version(TORCH_FOR_REQUIREMENTS), *(Version(TORCH_SINCE[api]) for api in used)])), used


def test_the_torch_floor_is_at_least_what_the_code_and_the_requirements_need() -> None:
    from packaging.version import Version

    torch_req = next(r for r in requirements()[None] if r.name == "torch")
    floor = min(Version(spec.version) for spec in torch_req.specifier if spec.operator == ">=")
    needed, used = torch_floor_needed(sorted((ROOT / "src").rglob("*.py")))
    assert used, "the scan finds the APIs in the source (else it shows nothing)"
    assert floor >= Version(needed), f"pyproject allows torch {floor}, the code needs {needed} ({', '.join(used)})"
