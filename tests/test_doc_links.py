"""Every relative link in the README, CONTRIBUTING, docs/ and the results' READMEs resolves: the file exists, and a
`#anchor` names a heading of the target page (GitHub's slugs). Moving text between pages cannot leave a dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *ROOT.glob("docs/*.md"), *ROOT.glob("results/*/README.md")]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            dead.append(f"{target} (no heading #{anchor} in {resolved.name})")
    return dead


def test_the_slugs_are_githubs():
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("SAM's start and its schedules") == "sams-start-and-its-schedules"
    assert slug("1. Where a rank is: `init_distributed`") == "1-where-a-rank-is-init_distributed"


def test_a_dead_link_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# B page\n")
    (tmp_path / "a.md").write_text(
        "# Title\n\n[ok](#title) [ok](b.md#b-page) [dead](c.md) [anchor](#nowhere) [other](b.md#x) `[code](x.md)`\n"
        "```\n[fenced](y.md)\n```\n![image](pic.png) [web](https://example.org/#x)\n"
    )
    assert dead_links(tmp_path / "a.md") == [
        "c.md (no such file)",
        "#nowhere (no heading #nowhere in a.md)",
        "b.md#x (no heading #x in b.md)",
        "pic.png (no such file)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert dead_links(page) == []
