"""Every "docs/apisix-behaviour.md §N" a module, test or page cites is in the repo.

The code cites APISIX's behaviour by section (``§5.3``, ``§5.2-5.4``,
``§3, §4.1, §5.1``); a reader must be able to follow each citation to a
heading of docs/apisix-behaviour.md.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "apisix-behaviour.md"
CITATION = re.compile(r"apisix-behaviour\.md((?:[ ,]*(?:and )?§[\d.]+(?:-[\d.]+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?")


def sections():
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", SPEC.read_text(), re.M))


def citations():
    found = []
    for path in sorted(p for part in ("gproxy", "admin_ui", "tests", "docs", "bench", "scripts")
                       for p in (ROOT / part).rglob("*") if p.suffix in (".py", ".md", ".js")):
        for match in CITATION.finditer(path.read_text(errors="replace")):
            for first, last in SECTION.findall(match.group(1)):
                found.extend((path.relative_to(ROOT), number) for number in (first, last) if number)
    return found


def test_the_spec_has_the_sections_the_code_builds_on():
    assert {"1", "1.1", "2", "3", "4.1", "4.2", "5.1", "5.2", "5.3", "5.4", "6", "7"} <= sections()


def test_every_citation_names_a_section_that_exists():
    cited = citations()
    assert len(cited) >= 20, "the citation pattern no longer finds the code's references"
    missing = [(str(path), number) for path, number in cited if number not in sections()]
    assert not missing, missing
