"""Every relative link and image in the README and docs/ points to a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(document: Path) -> list[str]:
    """The link targets of `[text](target)` / `![alt](target)` that are repository paths."""
    targets = [match.group(1).split("#")[0] for match in LINK.finditer(document.read_text())]
    return [target for target in targets if target and not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(document):
    missing = [target for target in relative_links(document) if not (document.parent / target).exists()]
    assert not missing, f"{document.name} links to missing files: {missing}"


def test_the_link_pattern_finds_images_and_links():
    assert "docs/images/app_screenshot.jpg" in relative_links(ROOT / "README.md")
    assert "docs/APP.md" in relative_links(ROOT / "README.md")
