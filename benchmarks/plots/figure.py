"""What every plot of the benchmarks shares: matplotlib without a display, the title naming the run, the PNG."""
from __future__ import annotations

from pathlib import Path

from benchmarks import common


def pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def title(data: dict, what: str) -> str:
    env = data["env"]
    note = f"\n{common.CPU_LABEL}" if env.get("cpu_timing") else ""
    return f"{what} -- {env['device']}, {env['date'][:10]}, commit {env['commit'][:10]}{note}"


def save(fig, title: str, png: str | Path) -> Path:
    """Title, layout, write ``png`` (120 dpi), close."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=120)
    pyplot().close(fig)
    return png
