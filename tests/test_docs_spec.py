"""docs/METHOD.md is the project's specification: the code's citations and the registries must
not drift away from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "METHOD.md"
SRC = ROOT / "src" / "genaf"

# "METHOD.md §6", "METHOD.md's §5", "METHOD.md §3–4", "METHOD.md §4.5"
CITATION = re.compile(r"METHOD\.md(?:'s)?\s+§\s*(\d+)(?:\.\d+)?(?:\s*[–-]\s*(\d+))?")
HEADING = re.compile(r"^##\s+§?(\d+)\.\s+\S", re.MULTILINE)


def spec_sections(text: str) -> set[int]:
    return {int(m.group(1)) for m in HEADING.finditer(text)}


def cited_sections(root: Path) -> dict[int, list[str]]:
    """Section number -> the places (file:line) in ``root`` that cite it."""
    out: dict[int, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) else lo
                for n in range(lo, hi + 1):
                    out.setdefault(n, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return out


def test_citation_pattern_reads_the_forms_the_code_uses():
    found = [(m.group(1), m.group(2)) for m in CITATION.finditer("METHOD.md §3–4, METHOD.md's §5, METHOD.md §4.5")]
    assert found == [("3", "4"), ("5", None), ("4", None)]
    assert spec_sections("## 3. Stage one\n## §7. Metrics\n### 4. not a section\n") == {3, 7}


def test_every_cited_section_exists():
    text = SPEC.read_text(encoding="utf-8")
    sections = spec_sections(text)
    cited = cited_sections(SRC)
    assert cited, "no METHOD.md citation found in src/: the pattern no longer matches the code"
    missing = {n: places for n, places in cited.items() if n not in sections}
    assert not missing, f"src/ cites METHOD.md sections that docs/METHOD.md lacks: {missing}"


def test_sections_are_numbered_in_order():
    text = SPEC.read_text(encoding="utf-8")
    numbers = [int(m.group(1)) for m in HEADING.finditer(text)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_citations_point_at_the_section_they_mean():
    """What each cited section is about (a word its heading must hold), so renumbering the
    spec without fixing the code fails."""
    text = SPEC.read_text(encoding="utf-8")
    headings = {int(m.group(1)): m.group(0) for m in re.finditer(r"^##\s+§?(\d+)\.\s+.*$", text, re.MULTILINE)}
    expected = {3: "stage 1", 4: "stage 2", 5: "Attacks", 6: "Baselines", 7: "Metrics"}
    for n, word in expected.items():
        assert word.lower() in headings.get(n, "").lower(), (n, headings.get(n))


def test_every_method_and_attack_is_specified():
    from genaf.attacks.base import attack_names
    from genaf.methods.base import method_names

    text = SPEC.read_text(encoding="utf-8")
    methods, attacks = method_names(), attack_names()
    assert "genaf" in methods and "l4a-base" in attacks
    missing = [n for n in methods + attacks if f"`{n}`" not in text]
    assert not missing, f"docs/METHOD.md does not describe: {missing}"
