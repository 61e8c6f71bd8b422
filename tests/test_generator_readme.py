"""The README's "Using relaxkv in your attention module" example runs as written: its python blocks are taken
from README.md (not copied here) and run in a fresh interpreter, as a user pasting them would."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Using relaxkv in your attention module"


def section(markdown: str, heading: str) -> str | None:
    """The text under ``heading`` (a whole line) up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    if heading not in lines:
        return None
    start = lines.index(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_section_helpers():
    doc = "# T\n## A\n```python\nx = 1\n```\n### sub\n```python\ny = 2\n```\n## B\n```python\nz = 3\n```\n"
    assert python_blocks(section(doc, "## A")) == ["x = 1\n", "y = 2\n"]
    assert section(doc, "## C") is None


def test_readme_attention_module_example_runs(tmp_path):
    text = section((ROOT / "README.md").read_text(), HEADING)
    if text is None:
        pytest.skip(f"README.md has no {HEADING!r} section")
    blocks = python_blocks(text)
    assert blocks, f"README.md: no ```python block under {HEADING!r}"
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"torch\.Size\(\[1, \d+, \d+\]\)", proc.stdout), proc.stdout
