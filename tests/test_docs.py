"""The README and docs/: the configuration page is generated from the code, the README stays
short, and every link, file path and raytitan module they name exists. (The commands they show
are checked in tests/test_cluster_files.py.)"""

import ast
import glob
import os
import re

import pytest

from raytitan.config import docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
README_LIMIT = 10240

LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# A repository path (not part of a longer path such as /mnt/shared/raytitan or ~/.cache/raytitan).
PATH = re.compile(r"(?<![\w./~-])(?:raytitan|tests|benchmarks|configs|cluster|examples)/[\w./-]*")
MODULE = re.compile(r"(?<![\w./~:-])raytitan(?:\.[A-Za-z_]\w*)+")


def read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_\[\]]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: str) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", read(page)))}


def test_docs_exist():
    for page in ["architecture", "configuration", "parallelism", "data", "checkpoints", "elastic", "speed",
                 "performance", "clusters", "testing"]:
        assert os.path.isfile(os.path.join(REPO, "docs", f"{page}.md")), page


def test_configuration_page_is_generated_from_the_code():
    assert read("docs/configuration.md") == docs.render(), (
        "docs/configuration.md is out of date with raytitan/config/job.py: run `python -m raytitan.config.docs`")


def test_configuration_page_names_every_key():
    import dataclasses

    page = read("docs/configuration.md")
    for path, cls in docs.SECTIONS.items():
        assert f"## [{path}]" in page
        for f in dataclasses.fields(cls):
            assert f"`{path}.{f.name}`" in page


def test_readme_is_short():
    size = os.path.getsize(os.path.join(REPO, "README.md"))
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/"


def test_readme_shows_the_command_ci_runs():
    (ci,) = [line for line in read(".ci/run").splitlines() if line.startswith("pip install")]
    assert f"```bash\n{ci}\n```" in read("README.md"), "the README's test command must be exactly .ci/run's"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_existing_files(page):
    text = FENCE.sub("", read(page))
    folder = os.path.dirname(os.path.join(REPO, page))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(folder, path)) if path else os.path.join(REPO, page)
        assert os.path.exists(file), f"{page}: link to {target}: no such file"
        if anchor and file.endswith(".md"):
            linked = os.path.relpath(file, REPO)
            assert anchor in anchors(linked), f"{page}: link to {target}: no such heading in {linked}"


def module_file(name: str) -> str | None:
    base = os.path.join(REPO, *name.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def top_level_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def resolves(dotted: str) -> bool:
    """A module, or a name defined at the top of one (``raytitan.fit``), or a class member
    (``raytitan.trainer.loop.Trainer.fit``), read from the source without importing it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        file = module_file(".".join(parts[:cut]))
        if file is None:
            continue
        rest = parts[cut:]
        with open(file, encoding="utf-8") as f:
            body = ast.parse(f.read()).body
        for name in rest:
            node = top_level_names(body).get(name)
            if node is None:
                return False
            body = node.body if isinstance(node, ast.ClassDef) else []
        return True
    return False


def test_module_lookup_tells_real_names_from_missing_ones():
    assert resolves("raytitan.ray.launcher") and resolves("raytitan.fit") and resolves("raytitan.trainer.loop.Trainer.fit")
    assert not resolves("raytitan.launcher") and not resolves("raytitan.fit.nothing")
    assert module_file("raytitan.checkpoint") is None


@pytest.mark.parametrize("page", PAGES)
def test_named_paths_and_modules_exist(page):
    text = read(page)
    for path in PATH.findall(text):
        path = path.rstrip(".")
        if path.startswith("benchmarks/results/"):  # written by runs; some (GPU) not run yet
            continue
        assert os.path.exists(os.path.join(REPO, path)), f"{page} names {path}, which does not exist"
    for dotted in MODULE.findall(text):
        assert resolves(dotted), f"{page} names {dotted}, which is neither a module nor a name in one"
