"""The generator end to end: DiT time per chunk of the Wan2.1 causal DiT with each KV memory policy.

    python -m benchmarks generator               # GPU: wan-1.3b, bf16, every policy (~1.5 min on an H100)
    python -m benchmarks generator --quick       # GPU: one timed rep per mode (~1 min)
    python -m benchmarks generator --preset tiny # CPU: the harness at toy sizes (CPU time, not a GPU measurement)

Random weights (no downloads), batch 1. Per policy (dense, sink, relax, pack):

- warm-up to the steady state: the first chunk from which the policy's plans keep their shapes (the dense
  window is full, Relax past its warm-up, Pack's mid archive full; found by running the policy's host
  planner), each warm-up chunk one forward pass (the refresh pass that writes its K/V);
- then complete chunks: 4 denoising passes + the refresh pass = 5 forward passes, sampler included, in two
  modes: ``eager``, and ``graph``: one forward pass captured as a CUDA graph over static input buffers
  (two captures: the chunk's first pass, which runs the window staging and Pack's per-layer selection, and a
  later pass; Relax selects at ``begin_chunk``, outside the graphs),
  replayed across chunks (``begin_chunk`` refreshes the cache's index buffers in place). Before timing, the
  graphs replay one chunk next to an eager run of the same chunk and the flows are compared with
  ``torch.equal`` (``replay_equals_eager`` in the JSON). If capture fails, ``torch.compile`` of the model
  replaces it (``kind`` says which). On a CPU there are no CUDA graphs: each "replay" runs the pass again,
  which checks this harness, not graph speed (``kind``: "emulated (CPU)");
- ``ms_per_chunk``: ``common.measure`` of whole chunks (median; CUDA events / do_bench on a GPU);
  ``breakdown_ms``: chunks timed section by section (CUDA events, recorded inside the graphs too), mean
  per chunk, parts in ``plot_generator.BREAKDOWN`` that add up to that run's chunk time (``rest`` is what no
  section covers: modulation, norms, residuals, embeddings, head, sampler);
- ``video_fps`` = 4 * frames per chunk / seconds per chunk (DiT only: no VAE, no text encoder), and the
  dense/relax speed ratio (paper: 1.26x end to end on an H100; targets below).

Writes JSON (device, torch / triton versions, commit, date, ``cpu_timing``) + CSV at ``--out`` (default
``benchmarks/results/generator_<preset>_<device>.json``, rewritten after every policy so a cut-short run
keeps what it measured), a PNG beside them (``plot_generator.py``) and prints a short table last.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402

from benchmarks.plots import plot_generator  # noqa: E402
from benchmarks.plots.plot_generator import BREAKDOWN  # noqa: E402
from benchmarks.plots.plot_generator import VIDEO_FRAMES_PER_LATENT  # noqa: E402
from relaxkv_gen import build_model  # noqa: E402
from relaxkv_gen import random_text  # noqa: E402
from relaxkv_gen.rollout import NESTED_SECTIONS  # noqa: E402
from relaxkv_gen.rollout import POLICY_NAMES  # noqa: E402
from relaxkv_gen.rollout import SECTIONS  # noqa: E402
from relaxkv_gen.rollout import SectionTimer  # noqa: E402
from relaxkv_gen.rollout import make_cache  # noqa: E402
from relaxkv_gen.rollout import make_policy  # noqa: E402

TARGET_RELAX_MS = 250.0  # per 3-frame chunk: 4 * 3 / 0.25 s = 48 video FPS
TARGET_RATIO = 1.6  # relax at least this much faster than dense
PAPER_RATIO = 1.26  # Relax Forcing, end to end on an H100


# ----------------------------------------------------------------------------------------------------
# steady state


# ----------------------------------------------------------------------------------------------------
# captured passes


def capture(fn, cuda: bool):
    """(replay, output) of ``fn()`` captured as a CUDA graph; without CUDA, ``fn`` runs again at every replay."""
    if not cuda:
        out = fn()
        return (lambda: out.copy_(fn())), out
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphForward:
    """``forward(x, t, i)`` of one cache replayed from captured passes over static inputs.

    Two captures of one forward pass: the chunk's first pass (``i == 0``: the window staging and a per-layer
    selection run there) and a later pass. ``begin_chunk`` refreshes the cache's index buffers in
    place, so in steady state the captures replay chunk after chunk. With ``profile``, every capture has its
    own :class:`SectionTimer` whose CUDA events are recorded inside the graph ("external" events) and read
    after each replay; :meth:`take_sections` returns the sums since the last call.

    Args:
        model, context, cache: the DiT, its embedded text [B, text_len, dim] and the policy's KVCache.
        x, t: example inputs, latents [B, 16, U, H, W] and timesteps [B, U] (shapes, dtypes, device).
    """

    def __init__(self, model, context, cache, x: torch.Tensor, t: torch.Tensor, profile: bool = False):
        self.cuda = x.device.type == "cuda"
        self.x, self.t = x.clone(), t.clone()
        self.sections: dict[str, float] = defaultdict(float)
        cache.begin_chunk()  # pending selection and staging restored: the first capture includes them
        if self.cuda:  # warm-up outside the capture: autotuning, cuDNN plans, workspaces
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(self.x, self.t, context, cache)
            torch.cuda.current_stream().wait_stream(side)
            cache.begin_chunk()
        self.captures = []
        with cache.capture():  # both graphs are this cache's chunk step
            for _ in ("first pass", "later pass"):
                timer = SectionTimer(x.device, external=True) if profile else None

                def forward(timer=timer):
                    outside = cache.profiler  # the timer of begin_chunk's selection, outside the graphs
                    cache.profiler = timer.section if timer else None  # the cache's own sections
                    try:
                        return model(self.x, self.t, context, cache, timer)
                    finally:
                        cache.profiler = outside

                replay, out = capture(forward, self.cuda)
                if timer is not None and not self.cuda:
                    timer.reset()  # the CPU stand-in ran the pass once while "capturing"
                self.captures.append((replay, out, timer))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        replay, out, timer = self.captures[0 if i == 0 else 1]
        replay()
        if timer is not None:  # CUDA: the graph re-recorded its events; keep them for the next replay
            for name, ms in timer.collect(reset=not self.cuda).items():
                self.sections[name] += ms
        return out

    def take_sections(self) -> dict[str, float]:
        out, self.sections = dict(self.sections), defaultdict(float)
        return out


# ----------------------------------------------------------------------------------------------------
# one policy


class PolicyRun(common.ChunkRun):
    """One policy's cache, warmed up to its steady state, and whole chunks through a given forward."""

    def __init__(self, name: str, model, context, backend: str, seed: int, progress: bool):
        cfg = model.cfg
        param = next(model.parameters())
        self.name, self.model, self.context = name, model, context
        self.policy = make_policy(name)
        batch = context.shape[0]
        shape = (batch, cfg.in_dim, int(self.policy.chunk_frames), cfg.latent_height, cfg.latent_width)
        super().__init__(self.eager(), make_cache(model, self.policy, batch, backend), shape, param.device,
                         param.dtype, seed)
        self.warmup_chunks = common.steady_chunk(self.policy, cfg.grid_height, cfg.grid_width)
        self.warm_up(self.warmup_chunks, f"{name} warm-up", progress)

    def eager(self, timer: SectionTimer | None = None):
        return lambda x, t, i: self.model(x, t, self.context, self.cache, timer)


def breakdown(sections: dict[str, float], total_ms: float) -> dict[str, float]:
    """Sections of a chunk as :data:`BREAKDOWN` parts; ``rest`` = ``total_ms`` - the timed sections."""
    parts = {name: sections.get(name, 0.0) for name in SECTIONS}
    parts["rest"] = total_ms - sum(parts.values())
    return {name: parts[name] for name in BREAKDOWN}


def time_mode(run: PolicyRun, kind: str, forward, profiled, reps: int, profile_chunks: int, budget_s: float) -> dict:
    """Headline chunk time (``common.measure``) and the mean section breakdown of ``profile_chunks`` chunks.

    ``profiled()`` returns ``(forward, take_sections)`` for timing sections, or None when a mode has none.
    """
    first = run.cache.chunk
    t = common.measure(lambda: run.chunk(forward), run.device, warmup=1, reps=reps, budget_s=budget_s)
    res = {"kind": kind, "ms_per_chunk": t.ms, "reps": t.reps, "method": t.method}
    prof = profiled()
    if prof is not None:
        fwd, take = prof
        clock = SectionTimer(run.device)
        sums, totals = defaultdict(float), []
        for _ in range(profile_chunks):
            with clock.section("chunk"):
                run.chunk(fwd)
            totals.append(clock.collect()["chunk"])
            for name, ms in take().items():
                sums[name] += ms
        total = sum(totals) / len(totals)
        res["profiled_ms_per_chunk"] = total
        res["breakdown_ms"] = breakdown({k: v / len(totals) for k, v in sums.items()}, total)
        res["stage_ms"] = sums[NESTED_SECTIONS[0]] / len(totals)  # inside "attention"
    res["chunks"] = [first, run.cache.chunk - 1]
    res["ms_per_video_frame"] = res["ms_per_chunk"] / (run.frames * VIDEO_FRAMES_PER_LATENT)
    res["video_fps"] = 1e3 / res["ms_per_video_frame"]
    return res


def eager_mode(run: PolicyRun, args) -> dict:
    def profiled():
        timer = SectionTimer(run.device)
        run.cache.profiler = timer.section
        return run.eager(timer), timer.collect

    try:
        return time_mode(run, "eager", run.eager(), profiled, args.reps, args.profile_chunks, args.budget_s)
    finally:
        run.cache.profiler = None


def captured_mode(run: PolicyRun, args) -> dict:
    """CUDA graphs of the passes (checked against eager), or torch.compile when capture fails."""
    x, t = run.noise(), torch.zeros(run.batch, run.frames, device=run.device)
    try:
        graph = GraphForward(run.model, run.context, run.cache, x, t)
        eager_flows, graph_flows = run.flows_of_chunk([run.eager(), graph])
        same = all(torch.equal(a, b) for a, b in zip(eager_flows, graph_flows))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager_flows, graph_flows))
        check = {"replay_equals_eager": same, "max_abs_diff": diff}
        kind = "cuda_graph" if run.device.type == "cuda" else "emulated (CPU)"

        def profiled():
            prof = GraphForward(run.model, run.context, run.cache, x, t, profile=True)
            host = SectionTimer(run.device)
            run.cache.profiler = host.section  # a chunk-level selection runs in begin_chunk, outside the graphs

            def take() -> dict[str, float]:
                sections = prof.take_sections()
                for name, ms in host.collect().items():
                    sections[name] = sections.get(name, 0.0) + ms
                return sections

            return prof, take

        try:
            res = time_mode(run, kind, graph, profiled, args.reps, args.profile_chunks, args.budget_s)
        finally:
            run.cache.profiler = None
        return {**res, **check}
    except Exception as exc:  # capture is not possible here: compile instead
        if run.device.type != "cuda":
            raise
        run.cache.profiler = None
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"{run.name}: CUDA graph capture failed ({error}); timing torch.compile instead", file=sys.stderr)
    compiled = torch.compile(run.model)

    def forward(x, t, i):
        return compiled(x, t, run.context, run.cache)

    eager_flows, compiled_flows = run.flows_of_chunk([run.eager(), forward])
    res = time_mode(run, "torch.compile", forward, lambda: None, args.reps, args.profile_chunks, args.budget_s)
    pairs = list(zip(eager_flows, compiled_flows))
    return {**res, "graph_error": error, "replay_equals_eager": all(torch.equal(a, b) for a, b in pairs),
            "max_abs_diff": max((a.float() - b.float()).abs().max().item() for a, b in pairs)}


def bench_policy(name: str, model, context, args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    run = PolicyRun(name, model, context, args.backend, args.seed, not args.no_progress)
    warm_s = time.perf_counter() - t0
    modes = {"eager": eager_mode(run, args)}
    if "graph" in args.modes:
        modes["graph"] = captured_mode(run, args)
    out = {"chunk_frames": run.frames, "warmup_chunks": run.warmup_chunks, "warmup_s": warm_s,
           "attention": run.cache.attention, "kv_bytes": run.cache.memory_bytes(), "modes": modes,
           "seconds": time.perf_counter() - t0}
    del run
    common.free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------
# results


def rows_of(policies: dict) -> list[dict]:
    rows = []
    for name, pol in policies.items():
        for mode, res in pol["modes"].items():
            row = {"policy": name, "mode": mode, "chunk_frames": pol["chunk_frames"]}
            row.update({k: v for k, v in res.items() if not isinstance(v, (dict, list))})
            row.update({f"{part}_ms": ms for part, ms in (res.get("breakdown_ms") or {}).items()})
            rows.append(row)
    return rows


def targets(policies: dict, cpu_timing: bool) -> list[dict]:
    """Relax <= 250 ms per 3-frame chunk and >= 1.6x faster than dense, per mode (None on a CPU: not a GPU figure)."""
    out = []
    relax, dense = policies.get("relax"), policies.get("dense")
    for mode in ("eager", "graph"):
        r = relax and relax["modes"].get(mode)
        if not r:
            continue
        ms = r["ms_per_chunk"] * 3 / relax["chunk_frames"]
        out.append({"target": f"relax <= {TARGET_RELAX_MS:g} ms per 3-frame chunk ({4 * 3 / TARGET_RELAX_MS * 1e3:g} "
                              "video FPS)", "mode": mode, "kind": r["kind"], "value": ms, "goal": TARGET_RELAX_MS,
                    "per_video_frame_ms": TARGET_RELAX_MS / (3 * VIDEO_FRAMES_PER_LATENT),
                    "met": None if cpu_timing else ms <= TARGET_RELAX_MS})
        d = dense and dense["modes"].get(mode)
        if d:
            ratio = d["ms_per_video_frame"] / r["ms_per_video_frame"]
            out.append({"target": f"dense/relax speed ratio >= {TARGET_RATIO:g} (paper {PAPER_RATIO:g} end to end)",
                        "mode": mode, "kind": r["kind"], "value": ratio, "goal": TARGET_RATIO,
                        "met": None if cpu_timing else ratio >= TARGET_RATIO})
    return out


def table(data: dict) -> str:
    env = data["env"]
    label = common.CPU_LABEL if env["cpu_timing"] else "CUDA events"
    lines = [f"generator {data['preset']} ({data['dtype']}, batch {data['batch']}, backend {data['backend']}) on "
             f"{env['device']}: DiT time, 5 passes per chunk ({label})"]
    head = ["policy", "mode", "kind", "frames/chunk", "ms/chunk", "ms/video frame", "video FPS", "vs dense"]
    rows = []
    for name, pol in data["policies"].items():
        for mode, res in pol["modes"].items():
            dense = data["policies"].get("dense", {}).get("modes", {}).get(mode)
            ratio = dense["ms_per_video_frame"] / res["ms_per_video_frame"] if dense else None
            rows.append([name, mode, res["kind"], str(pol["chunk_frames"]), common.fmt(res["ms_per_chunk"]),
                         common.fmt(res["ms_per_video_frame"]), common.fmt(res["video_fps"]),
                         f"{common.fmt(ratio)}x" if ratio else "-"])
    lines += common.text_table(head, rows)
    lines += common.target_lines(data["targets"], lambda g: f"{g['mode']}: {g['kind']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "wan-1.3b"], help="default: wan-1.3b on CUDA, tiny on a CPU")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated (default: all)")
    p.add_argument("--modes", default="eager,graph", help="eager and/or graph (default: both)")
    p.add_argument("--backend", choices=["reference", "fused"], help="KV memory backend (default: fused on CUDA)")
    p.add_argument("--reps", type=int, help="timed chunks per mode for common.measure (default 3, --quick 1)")
    p.add_argument("--profile-chunks", type=int, help="chunks timed section by section (default 2, --quick 1)")
    p.add_argument("--budget-s", type=float, default=10.0, help="cap on the timed reps of one mode (seconds)")
    p.add_argument("--quick", action="store_true", help="one timed rep and one profiled chunk per mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (CSV and PNG beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.policies = [s for s in args.policies.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    bad = [s for s in args.policies if s not in POLICY_NAMES] + [m for m in args.modes if m not in ("eager", "graph")]
    if bad or "eager" not in args.modes:
        p.error(f"unknown policies / modes {bad} (policies: {list(POLICY_NAMES)}; modes: eager[,graph])")
    args.reps = args.reps or (1 if args.quick else 3)
    args.profile_chunks = args.profile_chunks or (1 if args.quick else 2)
    return args


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device, cfg, dtype = common.generator_setup(args)
    model = build_model(cfg, seed=args.seed, device=device, dtype=dtype, init_on_device=True)  # seconds, not ~20 s
    context = model.embed_text(random_text(cfg, 1, args.seed))
    out = args.out or common.default_out("generator", cfg.name, device)
    data = {"benchmark": "generator", "env": common.env_info(device), "preset": cfg.name, "model": cfg.to_dict(),
            "dtype": str(dtype).replace("torch.", ""), "batch": 1, "backend": args.backend, "passes_per_chunk": 5,
            "quick": args.quick, "complete": False, "policies": {}, "targets": []}
    data["cpu_timing"] = data["env"]["cpu_timing"]
    if data["cpu_timing"]:
        data["label"] = common.CPU_LABEL
    for name in args.policies:
        pol = data["policies"][name] = bench_policy(name, model, context, args, device)
        print(f"{name}: " + "; ".join(f"{mode} ({r['kind']}) {r['ms_per_chunk']:.4g} ms/chunk"
                                      for mode, r in pol["modes"].items()) + f" [{pol['seconds']:.0f} s]", flush=True)
        data["targets"] = targets(data["policies"], data["cpu_timing"])
        common.write_results(out, data, rows_of(data["policies"]))  # after every policy: a cut-short run keeps it
    data["complete"], data["seconds"] = True, time.perf_counter() - t0
    json_path, csv_path = common.write_results(out, data, rows_of(data["policies"]))
    png = plot_generator.plot(data, json_path.with_suffix(".png"))
    print(f"wrote {json_path}, {csv_path}, {png} in {data['seconds']:.0f} s")
    print(table(data))
    return data


if __name__ == "__main__":
    main()
