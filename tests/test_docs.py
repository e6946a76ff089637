"""The README and docs/: every relative link resolves (file and heading), and the README stays a short guide."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_the_readme_is_a_guide_of_at_most_15000_bytes():
    assert len((ROOT / "README.md").read_bytes()) <= 15_000


def test_configs_and_code_comments_carry_no_measured_figures():
    # a machine's name beside a duration or a count is a measurement: it belongs in docs/, which say when and how
    machine = re.compile(r"EPYC|Sapphire Rapids|H100|H200|AVX-?512|AVX2", re.I)
    duration = re.compile(r"\d+(\.\d+)? ?(minutes|min|seconds|s|hours)\b")
    files = [*sorted((ROOT / "conf").rglob("*.yaml")), *sorted((ROOT / "lm").rglob("*.py"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "#" in line and machine.search(line.split("#", 1)[1]) and duration.search(line.split("#", 1)[1])
    ]
    assert not found, found
