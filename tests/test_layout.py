"""The project's shape: imports go one way (no cycles, the package never imports the scripts, no room imports a room
above it, the base imports only the base), every room says what it owns, and every relative link in the
documentation resolves inside a clone."""

import ast
import importlib
import re
from pathlib import Path

import pytest

import pretrain

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_loop", "data_utils", "bench", "tests", "conftest"}
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (functions and TYPE_CHECKING blocks included), as
    'pretrain.room.module', 'pretrain.module' for the package's top, or a script's name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module.startswith("pretrain"):  # `from pretrain.room import module` names a module too
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "pretrain" and module_name(name) in MODULES:
                found.add(module_name(name))
            elif name.split(".")[0] in SCRIPTS:
                found.add(name.split(".")[0])
    return found


def module_name(dotted: str) -> str:
    """The module that a dotted name is or lies in: 'pretrain.room.module', or 'pretrain.module' at the package's
    top."""
    parts = dotted.split(".")
    return ".".join(parts[:3] if len(parts) > 2 and parts[1] in pretrain.ROOMS else parts[:2])


MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "pretrain").rglob("*.py")
           if p.stem != "__init__"}


def floor(module: str) -> int:
    """A package module's floor: its room's place in pretrain.ROOMS, or one above them all at the package's top."""
    parts = module.split(".")
    return pretrain.ROOMS.index(parts[1]) if len(parts) == 3 else len(pretrain.ROOMS)


def import_graph() -> dict[str, set[str]]:
    graph = {module: project_imports(ROOT / (module.replace(".", "/") + ".py")) for module in MODULES}
    graph.update({p.stem: project_imports(p) for p in ROOT.glob("*.py")})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first node repeated at its end), or None."""
    visiting, done = [], set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_imports_have_no_cycle():
    graph = import_graph()
    assert "pretrain.base.errors" in graph and "train_loop" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_package_never_imports_the_scripts():
    upward = {module: sorted(targets & SCRIPTS) for module, targets in import_graph().items()
              if module.startswith("pretrain.") and targets & SCRIPTS}
    assert not upward, f"package modules importing top-level scripts: {upward}"


def test_the_base_imports_only_the_base_before_it():
    graph = import_graph()
    for index, name in enumerate(pretrain.BASE):
        allowed = {f"pretrain.base.{before}" for before in pretrain.BASE[:index]}
        module = f"pretrain.base.{name}"
        assert graph[module] <= allowed, f"{module} imports {graph[module] - allowed}"


def test_no_room_imports_a_room_above_it():
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                    if module.startswith("pretrain.") for target in targets
                    if target.startswith("pretrain.") and floor(target) > floor(module))
    assert not upward, f"imports from a lower room to a higher one: {upward}"


def test_the_floors_and_module_names_the_checks_rely_on():
    assert floor("pretrain.base.errors") < floor("pretrain.data.mixture") < floor("pretrain.preflight")
    assert module_name("pretrain.checkpointing.checkpoints.save_checkpoint") == "pretrain.checkpointing.checkpoints"
    assert module_name("pretrain.preflight.describe_run") == "pretrain.preflight"
    assert {"pretrain.base.errors", "pretrain.preflight"} <= MODULES


def test_every_room_names_its_concern_its_rules_and_its_modules():
    rooms = {p.parent.name for p in (ROOT / "pretrain").glob("*/__init__.py")}
    assert rooms == set(pretrain.ROOMS)
    tops = {module.split(".")[1] for module in MODULES if module.count(".") == 1}
    assert set(re.findall(r"^(\w+)\s{2,}", pretrain.__doc__, re.M)) == rooms | tops
    for room in pretrain.ROOMS:
        doc = importlib.import_module(f"pretrain.{room}").__doc__
        assert doc and "It may import" in doc and "must not" in doc, f"pretrain/{room}/__init__.py"
        modules = {module.split(".")[2] for module in MODULES if module.startswith(f"pretrain.{room}.")}
        assert set(re.findall(r"^(\w+)\s{2,}", doc, re.M)) == modules, f"pretrain/{room}/__init__.py"


def test_every_package_module_is_at_most_450_lines():
    long = {module: n for module in MODULES
            if (n := len((ROOT / (module.replace(".", "/") + ".py")).read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: the heading lower-cased, punctuation but '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_clone(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S))
    assert links or page.name != "README.md"
    for link in links:
        if re.match(r"[a-z]+://|mailto:", link):
            assert re.match(r"https?://(127\.0\.0\.1|localhost)", link), f"{page.name}: link outside the clone {link}"
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists() and ROOT in [path, *path.parents], f"{page.name}: {link} does not resolve in the clone"
        if anchor and path.suffix == ".md":
            assert anchor in heading_anchors(path.read_text()), f"{page.name}: no heading for #{anchor} in {target}"


def test_docs_speak_to_users():
    for page in DOCS:
        text = page.read_text()
        assert "../shared" not in text and not re.search(r"\b[Ii]ssue \d+|\bsessions?\b", text), page.name
