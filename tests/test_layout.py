"""The project's shape: imports go one way (no cycles, the package never imports the scripts, the base imports only
the base), and every relative link in the documentation resolves inside a clone."""

import ast
import re
from pathlib import Path

import pytest

import pretrain

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_loop", "data_utils", "bench", "tests", "conftest"}
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (functions and TYPE_CHECKING blocks included), as
    'pretrain.x' or a script's name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"pretrain.{a.name}" for a in node.names] if node.module == "pretrain" else [])
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "pretrain" and name != "pretrain":
                found.add(".".join(name.split(".")[:2]))
            elif top in SCRIPTS:
                found.add(top)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {f"pretrain.{p.stem}": project_imports(p) for p in (ROOT / "pretrain").glob("*.py") if p.stem != "__init__"}
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
    assert "pretrain.errors" in graph and "train_loop" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_package_never_imports_the_scripts():
    upward = {module: sorted(targets & SCRIPTS) for module, targets in import_graph().items()
              if module.startswith("pretrain.") and targets & SCRIPTS}
    assert not upward, f"package modules importing top-level scripts: {upward}"


def test_the_base_imports_only_the_base_before_it():
    graph = import_graph()
    for index, name in enumerate(pretrain.BASE):
        allowed = {f"pretrain.{before}" for before in pretrain.BASE[:index]}
        assert graph[f"pretrain.{name}"] <= allowed, f"pretrain.{name} imports {graph[f'pretrain.{name}'] - allowed}"


def test_every_package_module_is_listed_in_the_package_docstring():
    listed = set(re.findall(r"^(\w+)\s{2,}", pretrain.__doc__, re.M))
    modules = {p.stem for p in (ROOT / "pretrain").glob("*.py") if p.stem != "__init__"}
    assert listed == modules


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
