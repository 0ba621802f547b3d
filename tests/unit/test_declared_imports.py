"""Every third-party module the product, its plugins and its tests import comes with
``pip install -e '.[test]'``: its distribution is among what ``pacsp2p[test]`` requires,
directly or through its requirements. A test importing a module of the bench extras
(``psutil``) passed in a developer's venv and failed to import on the fresh clone CI
makes (fifteenth session)."""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
TREES = ("pacsp2p", "twisted", "plugins", "tests")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()       # PEP 503


def closure(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """The distributions *name* (with *extras*) requires, itself included, normalised."""
    seen: set[str] = set()
    todo = [(name, extras)]
    while todo:
        dist, wanted = todo.pop()
        key = norm(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        if key in seen and not wanted:
            continue
        seen.add(key)
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in (*wanted, "")):
                todo.append((req.name, tuple(req.extras)))
    return seen


def imported() -> dict[str, list[str]]:
    """{top-level module: [files importing it]} of absolute imports outside the stdlib."""
    local = {p.stem for p in ROOT.joinpath("tests").rglob("*.py")} | {"tests", "pacsp2p"}
    found: dict[str, list[str]] = {}
    for tree in TREES:
        for path in ROOT.joinpath(tree).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 \
                    and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local and \
                            top != "__future__":
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_installed_by_the_test_extra():
    allowed = closure("pacsp2p", ("test",))
    assert "pytest" in allowed and "pynetdicom" in allowed, sorted(allowed)
    owners = metadata.packages_distributions()
    missing = {}
    for module, files in imported().items():
        dists = {norm(d) for d in owners.get(module, [])}
        if not dists & allowed:
            missing[module] = (sorted(dists), files[:3])
    assert not missing, f"imported but not installed by pip install -e '.[test]': {missing}"
