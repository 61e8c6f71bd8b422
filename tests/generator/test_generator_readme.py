"""The README's examples ("Using relaxkv in your attention module", "Use with diffusers", "Generation modes") run as
written: their python blocks are taken from README.md (not copied here) and run in a fresh interpreter, as a user
pasting them would."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Using relaxkv in your attention module"


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


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_section_helpers():
    doc = "# T\n## A\n```python\nx = 1\n```\n### sub\n```python\n# c\ny = 2\n```\n## B\n```python\nz = 3\n```\n"
    assert python_blocks(section(doc, "## A")) == ["x = 1\n", "# c\ny = 2\n"]
    assert section(doc, "## C") is None


@pytest.mark.parametrize("heading, printed, writes", [
    (HEADING, r"torch\.Size\(\[1, \d+, \d+\]\)", []),
    ("### Run it on a tiny model", r"\(1, 45, 64, 64, 3\)\n\(1, 13, 64, 64, 3\)\n\(1, 16, 64, 64, 3\)\n"
                                   r"torch\.Size\(\[1, 16, 3, 8, 8\]\)", ["relax.mp4"]),
    ("### Image-to-video and video extension", r"torch\.Size\(\[1, 16, 9, 8, 8\]\) True", []),
], ids=["attention-module", "diffusers", "image-to-video"])
def test_readme_example_runs(tmp_path, heading, printed, writes):
    text = section((ROOT / "README.md").read_text(), heading)
    assert text is not None, f"README.md has no {heading!r} section"
    blocks = python_blocks(text)
    assert blocks, f"README.md: no ```python block under {heading!r}"
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(printed, proc.stdout), proc.stdout
    assert all((tmp_path / name).stat().st_size > 0 for name in writes)
