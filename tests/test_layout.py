"""The code's layout rules (CONTRIBUTING): dependencies point one way, and no module grows past 500 lines.

``bench -> mp_model.recipe -> mp_model -> mp_kernels``: the kernels import neither the model nor the benchmarks,
the model library (``mp_model`` outside ``mp_model/recipe/``) imports neither the application nor the benchmarks,
and the application (``mp_model/recipe/``) does not import the benchmarks. Every import statement counts, those
inside functions included (type-only ones too). Inside the library no import circle: the engines and the reference
forward take the model's parts (``mp_model.engine.ModelParts``), never the model class. Modules stay under
``MAX_LINES`` lines: one concept a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500
# Modules allowed to be longer, with the reason; keep this empty unless a file cannot be split sensibly.
LONGER: dict[str, str] = {}
# Per layer (a folder relative to the repository root): the packages it must not import.
FORBIDDEN = {
    "mp_kernels": ("mp_model", "bench"),
    "mp_model": ("mp_model.recipe", "bench"),
    "mp_model/recipe": ("bench",),
}


# Modules that run the model's forward from its parts: none may import the model class (``mp_model.modeling``).
ENGINES = (
    "engine",
    "fused_weights",
    "graph_engine",
    "knobs",
    "lone_sequence",
    "masked_training",
    "ort_graph",
    "ort_layers",
    "packed_inference",
    "reference",
)


def modules(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    return "mp_model/recipe" if relative.startswith("mp_model/recipe/") else relative.split("/")[0]


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in forbidden)


@pytest.mark.parametrize("path", modules("mp_kernels", "mp_model"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dependencies_point_one_way(path: Path) -> None:
    forbidden = FORBIDDEN[layer(path)]
    wrong = sorted(name for name in imported(path) if breaks(name, forbidden))
    assert not wrong, f"{path.relative_to(ROOT)} ({layer(path)}) imports {wrong}"


def test_the_layer_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bench.e2e import main\n    import mp_model.recipe.cli\n")
    names = imported(module)
    assert breaks("bench.e2e", FORBIDDEN["mp_model/recipe"]) and "bench.e2e" in names
    assert any(breaks(name, FORBIDDEN["mp_model"]) for name in names)


@pytest.mark.parametrize(
    "path", modules("mp_kernels", "mp_model", "bench"), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_no_module_is_longer_than_the_limit(path: Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text().splitlines())
    assert relative in LONGER or lines <= MAX_LINES, f"{relative} has {lines} lines (limit {MAX_LINES}): split it"


def library_modules() -> dict[str, Path]:
    """The model library's modules (``mp_model`` outside ``mp_model/recipe/``) by dotted name."""
    found = {}
    for path in modules("mp_model"):
        if layer(path) == "mp_model":
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` (module -> modules it imports) as a path ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return []


def test_no_import_circle_inside_the_library() -> None:
    library = library_modules()
    graph = {
        name: {target for target in imported(path) if target in library} - {name} for name, path in library.items()
    }
    assert import_circle(graph) == []


def test_the_circle_check_sees_a_circle() -> None:
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", ENGINES)
def test_no_engine_imports_the_model_class(name: str) -> None:
    names = imported(ROOT / "mp_model" / f"{name}.py")
    assert not {"mp_model.modeling", "mp_model.MagicPyramidForSequenceClassification"} & names
