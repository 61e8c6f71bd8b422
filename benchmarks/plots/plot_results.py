"""Plots and the README table from benchmark results (JSON written by bench_chunk.py / bench_scaling.py).

    python -m benchmarks plot_results benchmarks/results/chunk_wan_*.json benchmarks/results/scaling_wan_*.json

For each JSON: a PNG beside it (chunk: ms per chunk per row, one panel per config; scaling: ms per
chunk and KV memory vs seconds of video), and a Markdown section in ``--table`` (default
``benchmarks/results/TABLE.md``) headed by the device and date of the run. CPU results are labelled
"CPU time, not a GPU measurement" in both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import common
from benchmarks.plots.figure import pyplot
from benchmarks.plots.figure import save
from benchmarks.plots.figure import title


def plot_chunk(data: dict, png: str | Path) -> Path:
    """Horizontal bars of ms per chunk for every measured row, one panel per config, the cuDNN bound as a line."""
    plt = pyplot()
    configs = list(dict.fromkeys(r["config"] for r in data["rows"]))
    timed = [r for r in data["rows"] if r.get("ms_per_chunk") is not None]
    fig, axes = plt.subplots(len(configs), 1, figsize=(8, 1.2 + 0.3 * len(timed)), squeeze=False)
    colors = {"bound": "tab:gray", "official": "tab:red", "step": "tab:blue", "part": "tab:green"}
    for ax, config in zip(axes[:, 0], configs):
        rows = [r for r in timed if r["config"] == config]
        ax.barh([r["row"] for r in rows], [r["ms_per_chunk"] for r in rows],
                color=[colors.get(r["kind"], "tab:blue") for r in rows])
        bound = [r["ms_per_chunk"] for r in rows if r["row"] == "bound[cudnn]"]
        if bound:
            ax.axvline(bound[0], color="k", ls="--", lw=0.8, label="cuDNN attention-only bound")
            ax.legend(fontsize=7, loc="lower right")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(config, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("ms per chunk (log); gray: bounds, red: official-style, blue: complete KVCache steps, "
                           "green: parts", fontsize=8)
    return save(fig, title(data, f"per-chunk attention, {data['shape']['name']} shapes"), png)


def plot_scaling(data: dict, png: str | Path) -> Path:
    """Two panels vs seconds of video: ms per chunk, and KV memory (this run, and 30-layer Wan computed)."""
    plt = pyplot()
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    shape = data["shape"]
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
        pr = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["seconds"])
        sec = [r["seconds"] for r in pr]
        color = f"C{i}"
        ax_t.plot(sec, [r["ms_per_chunk"] for r in pr], "o-", color=color, label=policy)
        ax_m.plot(sec, [r["kv_gib"] for r in pr], "o-", color=color, label=f"{policy} (this run)")
        ax_m.plot(sec, [r["wan30_kv_gib_computed"] for r in pr], "--", color=color, alpha=0.6,
                  label=f"{policy} (Wan 30 layers bf16, computed)")
    ax_t.set_xlabel("video length (s, 16 fps)")
    ax_t.set_ylabel(f"ms per chunk ({shape['layers']} layers x {shape['passes']} passes)")
    ax_m.set_xlabel("video length (s, 16 fps)")
    ax_m.set_ylabel("KV memory (GiB)")
    ax_m.set_yscale("log")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=7)
    return save(fig, title(data, f"scaling, {shape['name']} shapes"), png)


def _heading(data: dict, what: str) -> list[str]:
    env = data["env"]
    lines = [f"### {what}: {env['device']}, {env['date'][:10]}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit `{env['commit'][:12]}`."]
    if env.get("cpu_timing"):
        lines.append(f"**{common.CPU_LABEL}**: this run only shows that the harness works; no GPU figure here.")
    return lines + [""]


def chunk_table(data: dict) -> str:
    s, peak = data["shape"], data["peak_bf16"]
    lines = _heading(data, f"Per-chunk attention ({s['name']} shapes, {s['layers']} layers x {s['passes']} passes, "
                           f"{s['dtype']})")
    peak_note = f" ({peak['label']})" if peak.get("label") else ""
    lines += [f"bf16 matmul peak measured in the same run: {common.fmt(peak['tflops'])} TFLOP/s{peak_note}.", "",
              "| config | row | Nq x Nk | ms / chunk | TFLOP/s | % of peak | GiB (cache) |",
              "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['row']} | | {r['status']} | | | |")
            continue
        frac = None if r.get("frac_peak") is None else 100 * r["frac_peak"]
        gib = None if r.get("kv_bytes") is None else r["kv_bytes"] / 2**30
        lines.append(f"| {r['config']} | {r['label']} | {r['nq']} x {r['nk']} | {common.fmt(r['ms_per_chunk'])} | "
                     f"{common.fmt(r.get('tflops'))} | {common.fmt(frac, 2)} | {common.fmt(gib)} |")
    lines += ["", "| config | best complete step (ms) | cuDNN bound (ms) | step / bound (target) | vs official-style |",
              "|---|---|---|---|---|"]
    for g in data.get("targets", []):
        if "ratio" in g:
            lines.append(f"| dense / relax | whole-chunk ratio {common.fmt(g['ratio'])} (target >= {g['target']}) "
                         "| | | |")
        else:
            lines.append(f"| {g['config']} | {common.fmt(g['best_step_ms'])} | {common.fmt(g['cudnn_bound_ms'])} | "
                         f"{common.fmt(g['step_over_bound'])} (<= {g['target_over_bound']}) | "
                         f"{common.fmt(g['speedup_vs_official'])}x faster |")
    return "\n".join(lines) + "\n"


def scaling_table(data: dict) -> str:
    s = data["shape"]
    lines = _heading(data, f"Scaling with video length ({s['name']} shapes, {s['layers']} layers x "
                           f"{s['passes']} passes)")
    lines += ["| policy | seconds | chunks | ms / chunk | KV GiB (this run) | KV GiB (Wan 30 layers bf16, computed) |",
              "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['policy']} | {common.fmt(r['seconds'])} | | {r['status']} | | |")
            continue
        lines.append(f"| {r['policy']} | {common.fmt(r['seconds'])} | {r['chunks']} | "
                     f"{common.fmt(r['ms_per_chunk'])} | {common.fmt(r['kv_gib'])} | "
                     f"{common.fmt(r['wan30_kv_gib_computed'])} |")
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def update_readme(readme: str | Path, sections: list[str]) -> Path:
    """Replace the README's results section (between README_BEGIN and README_END) with ``sections``."""
    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"plot_results: {readme}: no {README_BEGIN} ... {README_END} section to fill")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    body = "\n".join(sections).replace("### ", "#### ")  # under the README's own heading
    readme.write_text(f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}")
    return readme


def render(paths: list[str | Path], table: str | Path, plot: bool = True,
           readme: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Plot every results JSON in ``paths`` and write their tables to ``table`` (and the README's results
    section, GPU results only); returns (table, PNGs)."""
    sections = ["# Benchmark results", "",
                "Generated by `python -m benchmarks plot_results` from the JSON files beside this table.", ""]
    gpu_sections = []
    pngs = []
    for path in paths:
        path = Path(path)
        data = json.loads(path.read_text())
        kinds = {"chunk": (chunk_table, plot_chunk), "scaling": (scaling_table, plot_scaling)}
        if data.get("kind") not in kinds:
            raise ValueError(f"plot_results: {path}: expected a {' or '.join(kinds)} results JSON, got kind "
                             f"{data.get('kind')!r}")
        make_table, make_plot = kinds[data["kind"]]
        sections.append(make_table(data))
        if not data["env"].get("cpu_timing"):
            gpu_sections.append(sections[-1])
        if plot:
            pngs.append(make_plot(data, path.with_suffix(".png")))
    table = Path(table)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(sections))
    if readme is not None and gpu_sections:
        update_readme(readme, gpu_sections)
    return table, pngs


def main(argv=None) -> tuple[Path, list[Path]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*",
                   help="results JSON files (default: chunk_*.json, scaling_*.json in benchmarks/results)")
    p.add_argument("--table", default=str(common.RESULTS_DIR / "TABLE.md"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--readme", help="also fill this README's results section (GPU results only)")
    args = p.parse_args(argv)
    paths = args.results or sorted(str(x) for pattern in ("chunk_*.json", "scaling_*.json")
                                   for x in common.RESULTS_DIR.glob(pattern))
    if not paths:
        p.error(f"no results JSON given and none in {common.RESULTS_DIR}")
    table, pngs = render(paths, args.table, plot=not args.no_plot, readme=args.readme)
    print(table.read_text())
    print(f"wrote {table}" + "".join(f", {x}" for x in pngs))
    return table, pngs


if __name__ == "__main__":
    main()
