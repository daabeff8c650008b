"""The documentation runs: every code block of README.md and docs/*.md is executed on a tiny model, in document
order, or is marked as not runnable with a reason (tests/docs_runner.py says how blocks are marked and what is
substituted); and no page cites a document outside the repository."""

import re

import pytest
from conftest import save_tiny
from docs_runner import DOCS, ROOT, Workspace, blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield Workspace(root, save_tiny(root / "tiny"), monkeypatch)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_block_runs_or_says_why_not(doc, workspace):
    for block in blocks(doc):
        workspace.run_block(block)



def test_no_citation_of_documents_outside_the_repository():
    """docs/methods.md is the method reference; nothing cites the specification the project was written from."""
    cited = re.compile(r"\b" + "SP" + r"EC\b")  # the word (written in two so that this file does not cite it), not TORCH_SPEC
    paths = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "reprpo_trl").rglob("*.py"),
             *(ROOT / "recipes").rglob("*.yaml"), *(ROOT / "tests").glob("*.py")]  # fmt: skip
    for path in paths:
        name = path.relative_to(ROOT).as_posix()
        assert not cited.search(path.read_text()), f"{name} cites the specification; cite docs/methods.md"
