"""The code in README.md and docs/ runs: each page's ``python`` blocks, in order, in one
namespace, so an example cannot rot."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


def python_blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_the_examples_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.name}, block {index + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_links_of_a_page_lead_somewhere(page):
    missing = [link for link in LINK.findall(page.read_text())
               if not link.startswith("http") and not (page.parent / link).exists()]
    assert missing == []


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_bytes()) <= 6000
