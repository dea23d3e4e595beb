"""Every `docs/reference.md section N` that code, templates, the catalog, the committed bridges or
the README cite exists, and the architecture note names every package folder."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CITING = ("qwen35_bridge", "qwen35_codegen", "tests", "benchmarks")
CITATION = re.compile(r"docs/reference\.md,? sections? (\d+)(?: (?:to|and) (\d+))?")
SUFFIXES = {".py", ".j2", ".json", ".md", ".toml"}


def cited_sections() -> dict[int, list[str]]:
    cited: dict[int, list[str]] = {}
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in CITING:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    for path in files:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            first = int(match.group(1))
            last = int(match.group(2) or first)
            for number in range(first, last + 1):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    return cited


def reference_sections() -> set[int]:
    return {
        int(m.group(1))
        for m in re.finditer(r"^## (\d+)\. \S", REFERENCE.read_text(encoding="utf-8"), re.M)
    }


def test_every_cited_section_of_the_reference_exists() -> None:
    cited = cited_sections()
    assert len(cited) >= 8, "the scan must find the citations the code makes"
    missing = {n: files[:3] for n, files in cited.items() if n not in reference_sections()}
    assert missing == {}


def test_no_citation_points_outside_the_repository() -> None:
    """The spec the project started from is not in the repository: citing it leaves a reader of
    a generated bridge with nothing to follow."""
    offenders = []
    for folder in ("qwen35_bridge", "qwen35_codegen"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in SUFFIXES and "FACTS" in path.read_text(encoding="utf-8"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_architecture_note_names_every_package_folder() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    folders = [
        p.relative_to(ROOT).as_posix()
        for package in ("qwen35_bridge", "qwen35_codegen")
        for p in [ROOT / package, *(ROOT / package).rglob("*")]
        if p.is_dir() and (p / "__init__.py").is_file()
    ]
    missing = [f for f in folders if f"{f}/" not in text and f"`{f}`" not in text]
    assert missing == []
