"""Every example of README.md and of the docs (docs/pages/**/*.md) runs as written: the ```python blocks are taken
from the Markdown (not copied here) and run in a fresh interpreter, as a user pasting them would.

README.md runs one script per ``## `` section; a docs page runs one script per page (a page is one guide whose
examples continue each other). A page's ``--8<-- "README.md:NAME"`` lines include the README's text between its
``--8<-- [start:NAME]`` and ``--8<-- [end:NAME]`` markers, as mkdocs' snippets extension does for the site. A block
whose fence follows a ``<!-- fragment: WHY -->`` line is a piece of a larger program (a Wan-sized model on a GPU,
several processes): it is not run, and a section holding only such blocks is reported as skipped with the reason.
The docs site itself builds with ``mkdocs build --strict`` (the last test; skipped where mkdocs is not installed).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# what an example prints (a regex over its stdout) and the files it writes, where that is known
EXPECT = {
    "README.md::Using relaxkv in your attention module": (r"torch\.Size\(\[1, \d+, \d+\]\)", []),
    "docs/pages/guides/attention-module.md": (r"torch\.Size\(\[1, \d+, \d+\]\)\n(.*\n)*torch\.Size\(\[1, \d+, \d+\]\)",
                                              []),
    "docs/pages/guides/diffusers.md": (r"\(1, 45, 64, 64, 3\)\n\(1, 13, 64, 64, 3\)\n\(1, 16, 64, 64, 3\)\n"
                                       r"torch\.Size\(\[1, 16, 3, 8, 8\]\)", ["relax.mp4"]),
    "docs/pages/modes/image-to-video.md": (r"torch\.Size\(\[1, 16, 9, 8, 8\]\) True", []),
    "docs/pages/modes/streams.md": (r"0 \(1, 16, 4, 8, 8\) True\n1 \(1, 16, 4, 8, 8\) True\n2 \(1, 16, 4, 8, 8\) True",
                                    []),
    "docs/pages/modes/prompt-switches.md": (r"\[0, 0, 0, 3\] \[0, 1, 5, 6, 8\]", []),
}


def section(markdown: str, heading: str) -> str | None:
    """The text under ``heading`` (a whole line) up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    if heading not in lines:
        return None
    start = lines.index(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    fenced = False  # a "# comment" line inside a code block is not a heading
    for end in range(start, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def headings(markdown: str, level: int) -> list[str]:
    """The heading lines of exactly ``level`` outside code blocks, in order."""
    found, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{{level}}} ", line):
            found.append(line)
    return found


def include_snippets(markdown: str, base: Path = ROOT) -> str:
    """``markdown`` with every ``--8<-- "FILE:NAME"`` line replaced by FILE's section NAME (FILE relative to
    ``base``), as pymdownx.snippets includes it."""
    def part(match: re.Match) -> str:
        path, name = match.group(1), match.group(2)
        text = (base / path).read_text()
        marker = rf"^[^\n]*--8<-- \[{{}}:{re.escape(name)}\][^\n]*\n"
        found = re.search(marker.format("start") + "(.*?)" + marker.format("end"), text, flags=re.S | re.M)
        assert found, f"{path} has no --8<-- [start:{name}] ... [end:{name}] section"
        return found.group(1).rstrip("\n")

    return re.sub(r'^--8<-- "([^":]+):([^"]+)"$', part, markdown, flags=re.M)


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of ``markdown`` that are not marked as fragments."""
    return [code for mark, code in re.findall(r"^(<!-- fragment: .*? -->\n)?```python\n(.*?)^```", markdown,
                                              flags=re.S | re.M) if not mark]


def fragments(markdown: str) -> list[str]:
    """The reasons given for the ```python blocks marked as fragments."""
    return re.findall(r"^<!-- fragment: (.*?) -->\n```python\n", markdown, flags=re.M)


def examples() -> dict[str, str]:
    """Every README ``## `` section and docs page with a ```python block, by id (path, and ``::section``)."""
    found = {}
    readme = README.read_text()
    for heading in headings(readme, 2):
        found[f"README.md::{heading[3:]}"] = section(readme, heading)
    for page in sorted((DOCS / "pages").rglob("*.md")):
        found[page.relative_to(ROOT).as_posix()] = include_snippets(page.read_text())
    return {name: text for name, text in found.items() if "```python\n" in text}


EXAMPLES = examples()


def test_helpers():
    doc = "# T\n## A\n```python\nx = 1\n```\n### sub\n```python\n# c\ny = 2\n```\n## B\n<!-- fragment: GPU -->\n" \
          "```python\nz = 3\n```\n"
    assert python_blocks(section(doc, "## A")) == ["x = 1\n", "# c\ny = 2\n"]
    assert section(doc, "## C") is None
    assert headings(doc, 2) == ["## A", "## B"]
    assert python_blocks(section(doc, "## B")) == [] and fragments(doc) == ["GPU"]
    assert include_snippets('a\n--8<-- "README.md:intro"\nb').startswith("a\nFused Triton")


def test_every_expectation_names_an_example():
    """A moved or renamed section fails here instead of silently losing its output check."""
    assert set(EXPECT) <= set(EXAMPLES), sorted(set(EXPECT) - set(EXAMPLES))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(tmp_path, name):
    text = EXAMPLES[name]
    blocks = python_blocks(text)
    if not blocks:
        pytest.skip(f"{name}: only fragments ({'; '.join(fragments(text))})")
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed, writes = EXPECT.get(name, (None, []))
    assert printed is None or re.search(printed, proc.stdout), proc.stdout
    assert all((tmp_path / file).stat().st_size > 0 for file in writes)


def test_docs_site_builds(tmp_path):
    """``mkdocs build --strict``: every page in the nav, every link and anchor resolved, every snippet and API
    page (mkdocstrings, read statically) found."""
    for module in ("mkdocs", "mkdocstrings_handlers.python", "pymdownx"):
        pytest.importorskip(module, reason='the docs extra is not installed (pip install -e ".[docs]")')
    build = ["build", "--strict", "-f", str(DOCS / "mkdocs.yml"), "-d", str(tmp_path / "site")]
    proc = subprocess.run([sys.executable, "-m", "mkdocs", *build], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
