"""The documentation stays a map of this repository: every relative link in README.md and docs/
resolves (file and heading), nothing points outside the repository, every repository path a file
names exists, and the README stays an entry point. Files only: no Ray, no servers, no subprocess."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a clone holds that documents or configures the project (tests/ is scanned separately:
# its fixtures name files that must NOT exist, e.g. planted credentials).
SOURCE_DIRS = ("dataprep", "pipelines", "pippo_model", "pippo_common", "cluster", "configs", "scripts",
               "benches", "docs", ".ci")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".sh", ""}
# Paths the docs name as examples of a user's own file, not as files of this repository.
EXAMPLE_PATHS = {"configs/stages/mine.yaml"}
REPO_PATH = re.compile(r"(?<![\w./:-])((?:tests|scripts|benches|docs|configs|dataprep|pipelines|pippo_model"
                       r"|pippo_common|cluster|\.ci)/[\w./-]+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 220   # the "<= ~200": an entry point, the deep dives live in docs/


def _files(dirs, top=()):
    out = [ROOT / f for f in top if (ROOT / f).is_file()]
    for d in dirs:
        for p in sorted((ROOT / d).rglob("*")) if (ROOT / d).is_dir() else ():
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts:
                out.append(p)
    return out


def _markdown():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(md: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (not - or _), spaces to hyphens,
    repeats numbered. Lines in code fences are not headings (a bash comment starts with #)."""
    seen, out, fenced = {}, set(), False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_anchor_rule_matches_known_headings(tmp_path):
    """The slug rule the link check relies on, on headings of the kinds the docs use."""
    md = tmp_path / "x.md"
    md.write_text("# A\n## 2. Command line (console script `pippo`)\n## Conventions (SPEC §3, §4)\n"
                  "```bash\n# not a heading\n```\n## Conventions (SPEC §3, §4)\n", encoding="utf-8")
    assert _anchors(md) == {"a", "2-command-line-console-script-pippo", "conventions-spec-3-4",
                            "conventions-spec-3-4-1"}


@pytest.mark.parametrize("md", _markdown(), ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(md):
    bad = []
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):     # http(s), mailto: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{md.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_repository_path_named_exists():
    """A comment, docstring or page that names tests/..., configs/..., docs/... names a real file
    (placeholders such as {test,tiny,full} or <hash> are skipped)."""
    bad = []
    for f in _files(SOURCE_DIRS, TOP_FILES):
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in REPO_PATH.finditer(line):
                p = m.group(1).rstrip(".,;:)")
                if set(p) & set("{}<>*") or line[m.end():m.end() + 1] in ("{", "<", "*") or p in EXAMPLE_PATHS:
                    continue
                if not ((ROOT / p).exists() or (ROOT / f"{p}.py").exists()):
                    bad.append(f"{f.relative_to(ROOT)}:{n}: {p}")
    assert not bad, "paths that do not exist:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository():
    """A clone is all a reader has: no file may send them to a sibling checkout or a specification
    beside it. (Traversal strings such as ../../etc/passwd in the hostile-input tests are payloads.)"""
    outside = re.compile(r"\.\./+(?:shared|SPEC|spec|docs)\b")
    bad = [f"{f.relative_to(ROOT)}:{n}" for f in _files((*SOURCE_DIRS, "tests"), TOP_FILES)
           if f.resolve() != Path(__file__).resolve()
           for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if outside.search(line)]
    assert not bad, "references outside the repository: " + ", ".join(bad)


def test_readme_is_an_entry_point_that_maps_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md: move the detail to docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(text)}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    for section in ("## Two commands", "## Layout", "## Commands", "## Run it on your cluster",
                    "## Development"):
        assert section in text
