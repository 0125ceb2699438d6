"""The docs hold together: every page is reachable from the README, every relative link and
anchor leads somewhere, and the benchmark results block is what `make bench` writes."""

from __future__ import annotations

import json
import re
import sys

import pytest

from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "k8s" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks skipped)."""
    found, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return found


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#", 1)[0] for target in LINK.findall(readme)}
    missing = [f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")
               if f"docs/{page.name}" not in linked]
    assert not missing, f"the README's Documentation index lacks {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(
                linked.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_benchmark_results_block_is_what_make_bench_writes() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import run_all

    results = json.loads((run_all.RESULTS / "results.json").read_text())
    page = run_all.BENCHMARKS_DOC.read_text(encoding="utf-8")
    assert run_all.results_block(results) in page, (
        "docs/benchmarks.md's results block differs from what bench/run_all.py writes from "
        "bench/results/results.json")
