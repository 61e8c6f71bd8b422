"""torch.compile of a model that calls ``KVCache.attend``: the graphs dynamo makes, and time per chunk against eager.

    python -m benchmarks compile                           # tiny preset on a CPU, every policy, inductor
    python -m benchmarks compile --backend aot_eager --policies relax --chunks 2

Per policy (``relaxkv_gen.make_policy``), two caches in the same attention mode (``--attention``, default window,
the mode ``auto`` picks on CUDA) serve relaxkv_gen's model run eagerly and the same model under
``torch.compile(model, backend=--backend)``, side by side on the same inputs: the warm-up chunks (the policy's
steady chunk, found by its host planner, at least ``--min-warmup``), then ``--chunks`` steady chunks, eager and
compiled taking turns chunk by chunk. A chunk is the Self-Forcing schedule's 5 passes (4 denoising timesteps, then
the refresh pass at t = 0). Recorded per policy: dynamo's unique graphs after each chunk (a compiled model keeps one
graph per plan shape for a chunk's first pass and one for its later passes, so the count stops growing with the
warm-up), the compiled warm-up's time (compilation included), the median ms per steady chunk eager and compiled,
their ratio (compiled / eager: below 1 is faster), and the largest difference of the flows relative to their
largest magnitude.

On a CPU every time is CPU time (the JSON says ``"cpu_timing": true``): the ratio there shows what compiling
costs or saves in host work at tiny shapes, not a GPU speed. Writes JSON + CSV at ``--out`` (default
``benchmarks/results/compile_<preset>_<device>.json``) and prints the table last.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import common

common.configure_triton()

import relaxkv_kernels as rk  # noqa: E402
from relaxkv_gen import FlowMatchSampler  # noqa: E402
from relaxkv_gen import build_model  # noqa: E402
from relaxkv_gen import get_preset  # noqa: E402
from relaxkv_gen import make_policy  # noqa: E402
from relaxkv_gen import random_text  # noqa: E402
from relaxkv_gen.rollout import POLICY_NAMES  # noqa: E402
from relaxkv_gen.rollout import default_backend  # noqa: E402

LABEL = "torch.compile against eager, per steady chunk"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: wan-1.3b on CUDA, tiny on a CPU)")
    p.add_argument("--policies", nargs="+", default=list(POLICY_NAMES), choices=list(POLICY_NAMES))
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--attention", default="window", choices=["window", "per_call", "segments"])
    p.add_argument("--chunks", type=int, default=4, help="steady chunks timed")
    p.add_argument("--min-warmup", type=int, default=8, help="at least this many warm-up chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class Side:
    """One side of the comparison: a model (eager or compiled) with its own cache; runs and times whole chunks."""

    def __init__(self, forward, model, policy, attention: str, backend: str):
        cfg, param = model.cfg, next(model.parameters())
        self.forward = forward
        self.cache = rk.KVCache(policy, cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.grid_height,
                                cfg.grid_width, dtype=param.dtype, device=param.device, backend=backend,
                                attention=attention)

    def chunk(self, xs: list[torch.Tensor], ts: list[torch.Tensor], context: torch.Tensor):
        """The chunk's passes; (seconds, flows)."""
        common.synchronize(xs[0].device)
        start = time.perf_counter()
        self.cache.begin_chunk()
        flows = [self.forward(x, t, context, self.cache) for x, t in zip(xs, ts)]
        self.cache.end_chunk()
        common.synchronize(xs[0].device)
        return time.perf_counter() - start, flows


def run_policy(name: str, model, context: torch.Tensor, args, backend: str) -> dict:
    cfg = model.cfg
    policy = make_policy(name)
    warmup = max(args.min_warmup, common.steady_chunk(policy, cfg.grid_height, cfg.grid_width) + 1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = Side(model, model, policy, args.attention, backend)
    compiled = Side(torch.compile(model, backend=args.backend), model, policy, args.attention, backend)
    param = next(model.parameters())
    u = policy.chunk_frames
    steps = [float(t) for t in FlowMatchSampler.create().timesteps] + [0.0]
    gen = torch.Generator().manual_seed(args.seed)
    graphs, times, worst = [], {"eager": [], "compiled": []}, 0.0
    compile_s = 0.0
    with torch.no_grad():
        for chunk in range(warmup + args.chunks):
            xs = [torch.randn(1, cfg.in_dim, u, cfg.latent_height, cfg.latent_width, generator=gen).to(param)
                  for _ in steps]
            ts = [torch.full((1, u), t, device=param.device) for t in steps]
            sides = (("eager", eager), ("compiled", compiled)) if chunk % 2 else (("compiled", compiled),
                                                                                   ("eager", eager))
            out = {}
            for side_name, side in sides:
                seconds, out[side_name] = side.chunk(xs, ts, context)
                if chunk >= warmup:
                    times[side_name].append(seconds)
                elif side_name == "compiled":
                    compile_s += seconds
            for a, b in zip(out["compiled"], out["eager"]):
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    eager_ms, compiled_ms = (1e3 * statistics.median(times[k]) for k in ("eager", "compiled"))
    return {"policy": name, "attention": args.attention, "compile_backend": args.backend, "warmup_chunks": warmup,
            "steady_chunks": args.chunks, "passes": len(steps), "graphs": graphs[-1],
            "graphs_after_warmup": graphs[-1] - graphs[warmup - 1], "graphs_per_chunk": graphs,
            "warmup_compiled_s": compile_s, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "ratio": compiled_ms / eager_ms, "max_rel_diff": worst,
            "same_selection": compiled.cache.selected_frames() == eager.cache.selected_frames()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.default_device()
    cfg = get_preset(args.preset or ("wan-1.3b" if device.type == "cuda" else "tiny"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = default_backend()
    model = build_model(cfg, seed=args.seed).to(device, dtype)
    context = model.embed_text(random_text(cfg, 1, args.seed).to(device, dtype))
    rows = [run_policy(name, model, context, args, backend) for name in args.policies]
    env = common.env_info(device)
    label = LABEL + (f" ({common.CPU_LABEL})" if env["cpu_timing"] else "")
    out = args.out or common.default_out("compile", cfg.name, device)
    payload = {"label": label, "env": env, "preset": cfg.name, "cache_backend": backend}
    common.write_results(out, payload, rows)
    print(label)
    head = ["policy", "graphs", "after warm-up", "warm-up compiled s", "eager ms", "compiled ms", "ratio", "max diff"]
    table = [[r["policy"], str(r["graphs"]), str(r["graphs_after_warmup"]), common.fmt(r["warmup_compiled_s"]),
              common.fmt(r["eager_ms"]), common.fmt(r["compiled_ms"]), common.fmt(r["ratio"]),
              common.fmt(r["max_rel_diff"])] for r in rows]
    print("\n".join(common.text_table(head, table)))
    return dict(payload, rows=rows)


if __name__ == "__main__":
    main()
