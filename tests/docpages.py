"""The README and the pages in docs/, read by the tests that run what they show.

A page's section runs from its heading line to the next heading of the same or a higher
level; a block is the first fenced code block of a language in that section.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def pages() -> list[Path]:
    """The README and every docs page, the README first."""
    return [README, *sorted(DOCS.glob("*.md"))]


def text(page: str) -> str:
    """``page`` is "README.md" or a docs page's name, e.g. "cli.md"."""
    return (README if page == "README.md" else DOCS / page).read_text()


def section(page: str, heading: str) -> str:
    """The text under ``heading`` (the whole line, e.g. "## Start-up") up to the next
    heading of its level or above."""
    body = ("\n" + text(page)).split(f"\n{heading}\n", 1)[1]
    level = heading.split(" ", 1)[0]
    lines = []
    fenced = False
    for line in body.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        head = line.split(" ", 1)[0]
        if not fenced and head and set(head) == {"#"} and len(head) <= len(level):
            break
        lines.append(line)
    return "".join(lines)


def block(page: str, heading: str, lang: str) -> list[str]:
    """The lines of the first ``lang`` code block under ``heading``."""
    return section(page, heading).split(f"```{lang}\n", 1)[1].split("```", 1)[0].splitlines()
