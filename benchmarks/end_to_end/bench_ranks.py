"""Head-parallel ranks against the single-process cache: ms per chunk of relaxkv_gen's DiT on P ranks, in one run.

    python -m benchmarks ranks                          # GPUs: wan-1.3b, bf16, NCCL, P = the GPUs here
    python -m benchmarks ranks --ranks 2                # two GPUs (NCCL, rank i on cuda:i)
    python -m benchmarks ranks --preset tiny --ranks 2  # CPU: gloo, toy sizes (CPU time, not a GPU figure)

The script spawns its P ranks itself (``torch.multiprocessing``, spawn; they meet through a file in a temporary
folder): rank i on cuda:i with NCCL, or on the CPU with gloo. P = 1 on one GPU still runs every collective (the
all-to-alls, the head gather, Relax's all_reduce, Pack's all_gather) on a group of one. Random weights (seeded,
broadcast from rank 0 so every rank holds the same), batch 1. Per policy (dense, relax, pack), on every rank:

- ``plain``: the single-process cache, ``make_cache(model, policy, 1, backend)``, each pass
  ``model(x, t, context, cache)``: with P > 1 every rank runs the whole model alone (the baseline a rank would
  be without its peers);
- ``parallel``: the head-parallel path, ``make_cache(..., process_group=group)`` (H / P heads per rank), each pass
  ``model(x, t, context, cache, parallel=SequenceParallel(group))`` (U*F / P tokens per rank, two all-to-alls
  per layer, the head's gather);
- both warmed up to the steady state (``common.steady_chunk``; each warm-up chunk one refresh pass) on the same
  noise, then one pass of one input from both states: ``max_abs_diff`` of the two flows, the largest over the
  ranks (fp32: rounding of the token-sharded matmuls, ~1e-6; bf16: bf16 rounding), beside ``max_abs_flow``;
- CUDA only, ``graph``: the parallel path's passes captured as CUDA graphs (``bench_generator.GraphForward``: the
  chunk's first pass and a later one, NCCL collectives inside), replayed for one chunk beside an eager run of the
  same chunk (``graph_replay_equals_eager``: ``torch.equal`` of the flows); a capture that fails on any rank is
  recorded as ``graph_error`` and the other numbers stand. On a CPU: ``"graph": "not on CPU"``;
- whole chunks (4 denoising passes + the refresh pass, sampler included) timed in ``--rounds`` rounds that
  alternate the order (plain, parallel[, graph]; then reversed), a barrier before every measurement.
  ``plain_ms`` / ``parallel_ms`` / ``graph_ms``: rank 0's median of the rounds' medians (``*_ranks_ms``: every
  rank's); ``ratio`` = parallel / plain, target <= 1.05 (P = 1: what the collectives and the head split cost).

Timer: :func:`measure_ranks`, ``common.measure``'s chunk path (CUDA events or ``perf_counter``, median of ``--reps``
after an untimed call) with one change: ``common.measure`` picks its number of calls per process (do_bench under
20 ms, the budget cap after the first call), so ranks could call a collective a different number of times and
hang; here the ranks agree on the count (the slowest first call sets the budget cap) before timing.

Rank 0 writes JSON (device, torch / triton versions, commit, date, ``cpu_timing``, ``ranks``) + CSV at ``--out``
(default ``benchmarks/results/ranks_<preset>_<device>.json``, rewritten after every policy so a cut-short run
keeps what it measured); the launching process prints a short table last.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.end_to_end.bench_generator import GraphForward  # noqa: E402
from relaxkv_gen import SequenceParallel  # noqa: E402
from relaxkv_gen import build_model  # noqa: E402
from relaxkv_gen import random_text  # noqa: E402
from relaxkv_gen.parallel import check_ranks  # noqa: E402
from relaxkv_gen.rollout import make_cache  # noqa: E402
from relaxkv_gen.rollout import make_policy  # noqa: E402

POLICIES = ("dense", "relax", "pack")
TARGET_RATIO = 1.05  # the head-parallel path on P = 1 costs at most 5 % over the single-process cache
GROUP_TIMEOUT = datetime.timedelta(minutes=5)  # a collective waiting on a rank that stopped fails after this
NOT_ON_CPU = "not on CPU"


# ----------------------------------------------------------------------------------------------------
# ranks


class Ranks:
    """This process's place in the group: rank, size P, device, and the small collectives the harness needs."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.group = dist.group.WORLD

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(self.group, device_ids=[self.device.index])
        else:
            dist.barrier(self.group)
        common.synchronize(self.device)

    def reduce(self, value: float, op) -> float:
        """``value`` reduced over the ranks with ``op`` (``dist.ReduceOp``), on every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.item()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` in rank order, on every rank."""
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def measure_ranks(fn, ranks: Ranks, warmup: int = 1, reps: int = 3, budget_s: float = 10.0) -> common.Timing:
    """Median ms of ``fn()`` (a whole chunk), every rank calling it the same number of times.

    A barrier, one untimed call, the ranks agree on ``reps`` (capped by ``budget_s`` over the slowest rank's first
    call), ``warmup - 1`` more untimed calls, then ``reps`` timed calls: CUDA events on a GPU (as
    ``common.measure`` times calls over 20 ms), ``perf_counter`` on a CPU (flagged ``cpu_timing``).
    """
    device = ranks.device
    ranks.barrier()
    t0 = time.perf_counter()
    fn()
    common.synchronize(device)
    first_ms = ranks.reduce((time.perf_counter() - t0) * 1e3, dist.ReduceOp.MAX)
    reps = max(1, min(reps, int(budget_s * 1e3 / max(first_ms, 1e-3))))
    for _ in range(max(0, warmup - 1)):
        fn()
    times = common.timed_calls(fn, device, reps)
    if device.type == "cuda":
        return common.Timing(statistics.median(times), reps, "cuda events median, same calls on every rank", False)
    return common.Timing(statistics.median(times), reps, f"perf_counter median ({common.CPU_LABEL})", True)


# ----------------------------------------------------------------------------------------------------
# the two paths


def make_runs(name: str, model, context: torch.Tensor, ranks: Ranks, backend: str, seed: int):
    """(plain, parallel, parallel's model call) for policy ``name``; the call takes ``model``'s arguments and adds
    ``parallel=``, for :class:`GraphForward`."""
    cfg = model.cfg
    param = next(model.parameters())
    policy = make_policy(name)
    shape = (context.shape[0], cfg.in_dim, int(policy.chunk_frames), cfg.latent_height, cfg.latent_width)
    plain_cache = make_cache(model, policy, context.shape[0], backend)
    shard_cache = make_cache(model, make_policy(name), context.shape[0], backend, process_group=ranks.group)
    parallel = SequenceParallel(ranks.group)

    def sharded_model(x, t, ctx, cache, timer=None):
        return model(x, t, ctx, cache, timer, parallel=parallel)

    plain = common.ChunkRun(lambda x, t, _i: model(x, t, context, plain_cache), plain_cache, shape, param.device,
                            param.dtype, seed)
    sharded = common.ChunkRun(lambda x, t, _i: sharded_model(x, t, context, shard_cache), shard_cache, shape,
                              param.device, param.dtype, seed)
    return plain, sharded, sharded_model


def flow_diff(plain: common.ChunkRun, sharded: common.ChunkRun, ranks: Ranks, seed: int) -> dict:
    """Both paths' flows for one input (``common.first_pass_flows``): the largest difference over the ranks and the
    largest flow."""
    flat, split = common.first_pass_flows([plain, sharded], seed)
    diff = (flat - split).abs().max().item()
    return {"max_abs_diff": ranks.reduce(diff, dist.ReduceOp.MAX), "max_abs_flow": flat.abs().max().item()}


def capture_graph(sharded: common.ChunkRun, sharded_model, context: torch.Tensor,
                  ranks: Ranks) -> tuple[GraphForward | None, dict]:
    """The parallel path's passes as CUDA graphs, checked against eager over one chunk: (graph, record), graph
    None when capture failed on any rank (every rank agrees, so none replays alone)."""
    graph, record, error = None, {"graph": "cuda_graph"}, None
    try:
        x, t = sharded.noise(), torch.zeros(sharded.batch, sharded.frames, device=sharded.device)
        graph = GraphForward(sharded_model, context, sharded.cache, x, t)
        eager_flows, graph_flows = sharded.flows_of_chunk([sharded.forward, graph])
        pairs = list(zip(eager_flows, graph_flows))
        record["graph_replay_equals_eager"] = all(torch.equal(a, b) for a, b in pairs)
        record["graph_max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    except Exception as exc:  # recorded: the eager numbers stand without it
        graph, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    errors = ranks.gather(error)
    if any(errors):
        graph = None
        record = {"graph": "failed", "graph_error": "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)}
    return graph, record


# ----------------------------------------------------------------------------------------------------
# one policy


def bench_policy(name: str, model, context: torch.Tensor, ranks: Ranks, args) -> dict:
    t0 = time.perf_counter()
    cfg = model.cfg
    plain, sharded, sharded_model = make_runs(name, model, context, ranks, args.backend, args.seed)
    warmup = common.steady_chunk(plain.cache.policy, cfg.grid_height, cfg.grid_width)
    progress = not args.no_progress and ranks.rank == 0
    plain.warm_up(warmup, f"{name} warm-up (plain)", progress)
    sharded.warm_up(warmup, f"{name} warm-up (parallel, P = {ranks.size})", progress)
    out = {"ranks": ranks.size, "chunk_frames": plain.frames, "warmup_chunks": warmup,
           "passes_per_chunk": plain.sampler.num_steps + 1, "attention": plain.cache.attention,
           "kv_bytes_plain": plain.cache.memory_bytes(), "kv_bytes_parallel_rank": sharded.cache.memory_bytes(),
           **flow_diff(plain, sharded, ranks, args.seed)}
    contestants = {"plain": plain.chunk, "parallel": sharded.chunk}
    graph = None
    if ranks.device.type == "cuda":
        graph, record = capture_graph(sharded, sharded_model, context, ranks)
        out.update(record)
        if graph is not None:
            contestants["graph"] = lambda: sharded.chunk(graph)
    else:
        out["graph"] = NOT_ON_CPU
    first = plain.cache.chunk
    timings = {label: [] for label in contestants}
    for r in range(args.rounds):
        for label in (list(contestants) if r % 2 == 0 else list(contestants)[::-1]):
            timings[label].append(measure_ranks(contestants[label], ranks, warmup=1, reps=args.reps,
                                                budget_s=args.budget_s))
    out["chunks"] = [first, plain.cache.chunk - 1]
    every_rank = ranks.gather({label: statistics.median(t.ms for t in runs) for label, runs in timings.items()})
    for label, runs in timings.items():
        out[f"{label}_ms"] = statistics.median(t.ms for t in runs)
        out[f"{label}_reps"] = sum(t.reps for t in runs)
        out[f"{label}_method"] = f"{runs[0].method}, median of {len(runs)} interleaved rounds"
        out[f"{label}_rounds_ms"] = [t.ms for t in runs]
        out[f"{label}_ranks_ms"] = [r[label] for r in every_rank]
    out["ratio"] = out["parallel_ms"] / out["plain_ms"]
    out["round_ratios"] = [s.ms / p.ms for p, s in zip(timings["plain"], timings["parallel"])]
    if graph is not None:
        out["graph_ratio"] = out["graph_ms"] / out["plain_ms"]
    out["seconds"] = time.perf_counter() - t0
    return out  # its caches and graphs go with this frame: the caller frees the memory


# ----------------------------------------------------------------------------------------------------
# results


def rows_of(policies: dict) -> list[dict]:
    """One CSV row per policy: its scalars."""
    return [{"policy": name, **{k: v for k, v in pol.items() if not isinstance(v, (dict, list))}}
            for name, pol in policies.items()]


def targets(policies: dict, cpu_timing: bool) -> list[dict]:
    """head-parallel / single-process cache <= 1.05 per chunk, per policy (None on a CPU: not a GPU figure)."""
    return [{"target": f"head-parallel / single-process cache <= {TARGET_RATIO:g} ms per chunk (P = 1: the "
                       f"collectives and the head split cost at most {TARGET_RATIO - 1:.0%})", "policy": name,
             "ranks": pol["ranks"], "mode": "eager", "kind": "eager", "value": pol["ratio"], "goal": TARGET_RATIO,
             "met": None if cpu_timing else pol["ratio"] <= TARGET_RATIO}
            for name, pol in policies.items()]


def table(data: dict) -> str:
    env = data["env"]
    label = common.CPU_LABEL if env["cpu_timing"] else "CUDA events"
    lines = [f"ranks {data['preset']} ({data['dtype']}, batch {data['batch']}, backend {data['backend']}, "
             f"{data['dist_backend']}, P = {data['ranks']}) on {env['device']}: ms per chunk, {data['rounds']} "
             f"interleaved rounds ({label})"]
    head = ["policy", "frames/chunk", "P", "plain ms", "parallel ms", "ratio", "graph ms", "graph = eager",
            "max |diff|"]
    rows = []
    for name, pol in data["policies"].items():
        same = pol.get("graph_replay_equals_eager")
        rows.append([name, str(pol["chunk_frames"]), str(pol["ranks"]), common.fmt(pol["plain_ms"]),
                     common.fmt(pol["parallel_ms"]), f"{common.fmt(pol['ratio'])}x",
                     common.fmt(pol.get("graph_ms")) if "graph_ms" in pol else pol["graph"],
                     "-" if same is None else str(same), common.fmt(pol["max_abs_diff"])])
    lines += common.text_table(head, rows)
    lines += [f"{name}: graph capture failed: {pol['graph_error']}" for name, pol in data["policies"].items()
              if pol.get("graph_error")]
    lines += common.target_lines(data["targets"], lambda g: f"{g['policy']}, P = {g['ranks']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# launch


def parse_args(argv=None):
    p = common.comparison_parser(__doc__, POLICIES, "path")
    p.add_argument("--ranks", type=int, help="P processes (default: the GPUs here, the largest count the model's "
                                             "heads and chunks allow; 1 on a CPU)")
    args = common.parse_comparison_args(p, argv)
    if args.ranks is not None and args.ranks < 1:
        p.error(f"--ranks: expected >= 1, got {args.ranks}")
    return args


def choose_ranks(requested: int | None, cfg, policies: list[str], device: torch.device) -> int:
    """P: ``requested``, or the GPUs here (1 on a CPU) lowered to the largest count that divides the model's heads
    and every policy's chunk tokens. ValueError when ``requested`` does not fit."""
    def fits(p: int) -> bool:
        try:
            for name in policies:
                check_ranks(cfg, int(make_policy(name).chunk_frames), p)
        except ValueError:
            return False
        return True

    gpus = torch.cuda.device_count() if device.type == "cuda" else None
    if requested is None:
        return max(p for p in range(1, (gpus or 1) + 1) if fits(p))
    for name in policies:
        check_ranks(cfg, int(make_policy(name).chunk_frames), requested)
    if gpus is not None and requested > gpus:
        raise ValueError(f"--ranks {requested}: only {gpus} GPU(s) here (rank i runs on cuda:i)")
    return requested


@torch.no_grad()
def _worker(rank: int, size: int, store: str, args, out: str) -> None:
    """Rank ``rank`` of ``size``: every policy on both paths; rank 0 writes the results after every policy."""
    device, cfg, dtype = common.generator_setup(args)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=size,
                                timeout=GROUP_TIMEOUT, device_id=device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # P ranks share the cores
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                timeout=GROUP_TIMEOUT)
    try:
        ranks = Ranks(rank, size, device)
        t0 = time.perf_counter()
        model = build_model(cfg, seed=args.seed, device=device, dtype=dtype, init_on_device=True)  # seconds
        for tensor in model.state_dict().values():  # the device RNG's init could differ between ranks' devices
            dist.broadcast(tensor, 0, group=ranks.group)
        context = model.embed_text(random_text(cfg, 1, args.seed))
        data = {"benchmark": "ranks", "env": common.env_info(device), "preset": cfg.name, "model": cfg.to_dict(),
                "dtype": str(dtype).replace("torch.", ""), "batch": 1, "backend": args.backend, "ranks": size,
                "dist_backend": dist.get_backend(ranks.group), "rounds": args.rounds, "reps": args.reps,
                "complete": False, "policies": {}, "targets": []}
        data["cpu_timing"] = data["env"]["cpu_timing"]
        if data["cpu_timing"]:
            data["label"] = common.CPU_LABEL
        for name in args.policies:
            pol = data["policies"][name] = bench_policy(name, model, context, ranks, args)
            common.free_memory(device)
            data["targets"] = targets(data["policies"], data["cpu_timing"])
            if rank == 0:
                graph = f", graph {pol['graph_ms']:.4g}" if "graph_ms" in pol else ""
                print(f"{name}: plain {pol['plain_ms']:.4g} ms/chunk, parallel (P = {size}) {pol['parallel_ms']:.4g}"
                      f"{graph}, ratio {pol['ratio']:.4g}, max |diff| {pol['max_abs_diff']:.3g} "
                      f"[{pol['seconds']:.0f} s]", flush=True)
                common.write_results(out, data, rows_of(data["policies"]))  # after every policy: a cut-short run
        data["complete"], data["seconds"] = True, time.perf_counter() - t0
        if rank == 0:
            common.write_results(out, data, rows_of(data["policies"]))
        ranks.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, cfg, _ = common.generator_setup(args)
    try:
        size = choose_ranks(args.ranks, cfg, args.policies, device)
    except ValueError as exc:
        sys.exit(f"bench_ranks: error: {exc}")
    out = Path(args.out or common.default_out("ranks", cfg.name, device))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as tmp:  # the ranks meet through a file here
        mp.spawn(_worker, args=(size, os.path.join(tmp, "store"), args, str(out)), nprocs=size, join=True)
    data = json.loads(out.read_text())
    data.pop("rows")
    print(f"wrote {out}, {out.with_suffix('.csv')} with {size} rank(s) in {time.perf_counter() - t0:.0f} s")
    print(table(data))
    return data


if __name__ == "__main__":
    main()
