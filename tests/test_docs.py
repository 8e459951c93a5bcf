"""The documentation's house rules: README.md is a short front door, every relative link resolves, and docs/ has an
index and a title on every page. Standard library only; reads Markdown, runs nothing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULT_PAGES = sorted((ROOT / "results").glob("*/README.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img\s[^>]*src=\"([^\"]+)\"")
# A figure: a number with a decimal point, a percentage, or a duration in minutes or seconds ("7 min 26 s", "52 s").
# A version ("Python 3.11") is not a figure.
FIGURE = re.compile(r"(?<!Python )\b\d[\d,]*(?:\.\d+)?(?:\s?%|\s?min(?:\s\d+\s?s)?\b|\s?s\b)|(?<!Python )\b\d+\.\d+")


def links(path: Path) -> list[str]:
    """The relative link and image targets of a Markdown file, without #anchors (http(s), mailto, anchors left out)."""
    targets = [a or b for a, b in LINK.findall(path.read_text())]
    return [t.split("#")[0] for t in targets if not re.match(r"(https?:|mailto:|#)", t)]


def test_readme_is_at_most_12_kib():
    assert len(README.read_bytes()) <= 12_288, f"README.md is {len(README.read_bytes())} bytes"


def test_readme_quotes_no_figure_beyond_the_demo_table():
    """README.md may quote figures only in the demo's table and its "What it shows" reading. Anywhere else a figure
    (see FIGURE) must be found verbatim in a page that the same paragraph links to, so that every other figure
    stays on the one page that holds it. Paragraphs are blocks between blank lines; the demo table is the first
    block made of table rows, the reading is the block that starts with "What it shows"; code (indented blocks,
    fenced blocks and `inline code`) and HTML tags (the plots' widths) are not prose and are left out."""
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    blocks = re.split(r"\n\s*\n", text)
    table = next(i for i, b in enumerate(blocks) if all(line.startswith("|") for line in b.strip().splitlines()))
    checked = [b for i, b in enumerate(blocks) if i != table and not b.startswith("What it shows")]
    assert len(checked) == len(blocks) - 2, "the demo table or its reading was not found"
    for block in checked:
        prose = re.sub(r"`[^`]*`|<[^>]*>", "", "\n".join(ln for ln in block.splitlines() if not ln.startswith("    ")))
        pages = [(README.parent / t).read_text() for t in links(README) if t.endswith(".md") and t in block]
        for figure in FIGURE.findall(prose):
            assert any(figure in page for page in pages), f"README.md quotes {figure!r} but no page it links has it"


def test_every_relative_link_points_to_a_file():
    broken = [f"{page.relative_to(ROOT)}: {t}" for page in [README, *DOCS, *RESULT_PAGES] for t in links(page)
              if t and not (page.parent / t).exists()]
    assert not broken, broken


def test_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    missing = [p.name for p in DOCS if p != index and p.name not in links(index)]
    assert not missing, f"docs/README.md does not link {missing}"


def test_every_docs_page_starts_with_a_title():
    untitled = [p.name for p in DOCS if not p.read_text().startswith("# ")]
    assert not untitled, f"these docs pages do not start with a level-1 title: {untitled}"
