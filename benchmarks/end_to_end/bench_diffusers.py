"""The diffusers adapter's cost: diffusers' Wan transformer with relaxkv memory attached against relaxkv_gen's model.

    python -m benchmarks diffusers                # GPU: wan-1.3b, bf16, dense / relax / pack (~1 min, H100)
    python -m benchmarks diffusers --preset tiny  # CPU: the harness at toy sizes (CPU time, not a GPU figure)

Two models with the same random weights, batch 1, bf16 on CUDA (fp32 on a CPU): relaxkv_gen's ``CausalWanModel``
and diffusers' ``WanTransformer3DModel(**relaxkv_gen.diffusers.diffusers_config(cfg))`` loaded with those weights
through ``wan_to_diffusers`` (every parameter in the run's dtype, as in relaxkv_gen's model: ``from_pretrained(
torch_dtype=...)`` would keep diffusers' ``_keep_in_fp32_modules`` in fp32). Per policy (dense, relax, pack), in
the same run:

- ours: ``make_cache(model, policy)``, each pass ``model(x, t, context, cache)`` with ``context =
  model.embed_text(text)`` computed once; diffusers: ``attach(transformer, policy, ...)`` (``KVCacheAttnProcessor``
  in every block's self-attention), each pass ``transformer(hidden_states=x, timestep=t[:, 0],
  encoder_hidden_states=text).sample``;
- both warmed up to the steady state (``common.steady_chunk``; each warm-up chunk one refresh pass) on the same
  noise, then one pass of one input from both states: ``max_abs_diff`` of the two flows (fp32: rounding, ~1e-6;
  bf16: bf16 rounding of two operation orders), beside ``max_abs_flow``;
- then complete chunks (4 denoising passes + the refresh pass, sampler included), eager, timed with
  ``common.measure`` in ``--rounds`` rounds that alternate the two (ours then diffusers, diffusers then ours, ...),
  so drift of clocks and load hits both alike. ``ours_ms`` / ``diffusers_ms``: the median of the rounds' medians
  (``*_rounds_ms``: each round's); ``ratio`` = diffusers / ours, target <= 1.03 (the adapter costs at most 3 %).

What the ratio includes: diffusers' forward does work in every pass that ours does not, and a user of the adapter
pays it: the text embedder (T5 states -> context; relaxkv_gen embeds the text once per video) and the RoPE table
(``transformer.rope``; the attached processor does not use it: the cache rotates at absolute positions). Both are
also timed alone (``extra_ms_per_chunk``: one call each per pass), and ``ratio_less_extra`` = (diffusers -
extra) / ours says how much of the gap they make.

Writes JSON (device, torch / triton versions, commit, date, ``cpu_timing``) + CSV at ``--out`` (default
``benchmarks/results/diffusers_<preset>_<device>.json``, rewritten after every policy so a cut-short run keeps what
it measured) and prints a short table last. Without diffusers (or with one older than the adapter needs) it
measures nothing: it says why, writes the JSON with ``skipped`` and exits with status 77.
"""
from __future__ import annotations

import statistics
import sys
import time

from benchmarks import common

common.configure_triton()

import torch  # noqa: E402

from relaxkv_gen import build_model  # noqa: E402
from relaxkv_gen import random_text  # noqa: E402
from relaxkv_gen.rollout import make_cache  # noqa: E402
from relaxkv_gen.rollout import make_policy  # noqa: E402
from relaxkv_kernels.integrations.diffusers import attach  # noqa: E402
from relaxkv_kernels.integrations.diffusers import detach  # noqa: E402
from relaxkv_kernels.integrations.diffusers import require_diffusers  # noqa: E402

POLICIES = ("dense", "relax", "pack")
SIDES = ("ours", "diffusers")
TARGET_RATIO = 1.03  # the adapter costs at most 3 % over relaxkv_gen's own model
EXIT_SKIPPED = 77  # the automake convention for "skipped"


# ----------------------------------------------------------------------------------------------------
# the two models


def build_models(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(relaxkv_gen's ``CausalWanModel``, diffusers' ``WanTransformer3DModel`` with the same weights), both in
    ``dtype`` on ``device``, eval, without gradients. Needs diffusers (ImportError naming the extra)."""
    require_diffusers()
    from diffusers import WanTransformer3DModel  # optional: needs the diffusers extra

    from relaxkv_gen.diffusers import diffusers_config
    from relaxkv_gen.diffusers import wan_to_diffusers

    model = build_model(cfg, seed=seed, device=device, dtype=dtype, init_on_device=True)  # seconds, not ~20 s
    with torch.device(device):  # its own random init on the device too (1.3B on the CPU: ~20 s), overwritten below
        transformer = WanTransformer3DModel(**diffusers_config(cfg))
    transformer = transformer.to(device, dtype).eval().requires_grad_(False)
    transformer.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return model, transformer


def make_sides(name: str, model, transformer, text: torch.Tensor, backend: str,
               seed: int) -> dict[str, common.ChunkRun]:
    """Policy ``name`` on both models: ours through ``make_cache``, diffusers' through ``attach`` (the caller
    detaches)."""
    cfg = model.cfg
    context = model.embed_text(text)  # [1, text_len, dim], once: relaxkv_gen's model takes embedded text
    policy = make_policy(name)
    shape = (text.shape[0], cfg.in_dim, int(policy.chunk_frames), cfg.latent_height, cfg.latent_width)
    ours = make_cache(model, policy, text.shape[0], backend)
    theirs = attach(transformer, make_policy(name), batch=text.shape[0], height=cfg.grid_height, width=cfg.grid_width,
                    backend=backend)

    def ours_forward(x, t, _pass):
        return model(x, t, context, ours)

    def diffusers_forward(x, t, _pass):  # diffusers embeds the text in every forward
        return transformer(hidden_states=x, timestep=t[:, 0], encoder_hidden_states=text).sample

    return {"ours": common.ChunkRun(ours_forward, ours, shape, text.device, text.dtype, seed),
            "diffusers": common.ChunkRun(diffusers_forward, theirs, shape, text.device, text.dtype, seed)}


def flow_diff(sides: dict[str, common.ChunkRun], seed: int) -> dict:
    """Both sides' flows for one input (``common.first_pass_flows``): the largest difference and the largest flow."""
    ours, theirs = common.first_pass_flows([sides["ours"], sides["diffusers"]], seed)
    return {"max_abs_diff": (ours - theirs).abs().max().item(), "max_abs_flow": ours.abs().max().item()}


# ----------------------------------------------------------------------------------------------------
# timing


def time_interleaved(sides: dict[str, common.ChunkRun], device: torch.device, rounds: int, reps: int,
                     budget_s: float) -> dict[str, list[common.Timing]]:
    """``common.measure`` of whole chunks per side, ``rounds`` times, alternating which side goes first."""
    timings = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            timings[name].append(common.measure(sides[name].chunk, device, warmup=1, reps=reps, budget_s=budget_s))
    return timings


def extra_work(transformer, text: torch.Tensor, x: torch.Tensor, passes: int, device: torch.device, reps: int,
               budget_s: float) -> dict[str, float]:
    """ms per chunk (``passes`` calls) of what diffusers' forward computes and relaxkv_gen's does not."""
    embedder = transformer.condition_embedder.text_embedder
    parts = {"text_embedder": lambda: embedder(text), "rope_table": lambda: transformer.rope(x)}
    return {name: passes * common.measure(fn, device, warmup=1, reps=reps, budget_s=budget_s).ms
            for name, fn in parts.items()}


def bench_policy(name: str, model, transformer, text: torch.Tensor, args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    sides = make_sides(name, model, transformer, text, args.backend, args.seed)
    try:
        ours = sides["ours"]
        cfg = model.cfg
        warmup = common.steady_chunk(ours.cache.policy, cfg.grid_height, cfg.grid_width)
        for label, side in sides.items():
            side.warm_up(warmup, f"{name} warm-up ({label})", not args.no_progress)
        check = flow_diff(sides, args.seed)
        first = ours.cache.chunk
        timings = time_interleaved(sides, device, args.rounds, args.reps, args.budget_s)
        passes = ours.sampler.num_steps + 1
        extra = extra_work(transformer, text, ours.noise(), passes, device, args.reps, args.budget_s)
        out = {"chunk_frames": ours.frames, "warmup_chunks": warmup, "passes_per_chunk": passes,
               "chunks": [first, ours.cache.chunk - 1], "attention": ours.cache.attention,
               "kv_bytes": ours.cache.memory_bytes(), **check}
    finally:
        detach(transformer)
    for label, runs in timings.items():
        out[f"{label}_ms"] = statistics.median(t.ms for t in runs)
        out[f"{label}_reps"] = sum(t.reps for t in runs)
        out[f"{label}_method"] = f"{runs[0].method}, median of {len(runs)} interleaved rounds"
        out[f"{label}_rounds_ms"] = [t.ms for t in runs]
    out["ratio"] = out["diffusers_ms"] / out["ours_ms"]
    out["round_ratios"] = [d.ms / o.ms for o, d in zip(timings["ours"], timings["diffusers"])]
    out["extra_ms_per_chunk"] = extra
    out["ratio_less_extra"] = (out["diffusers_ms"] - sum(extra.values())) / out["ours_ms"]
    out["seconds"] = time.perf_counter() - t0
    del sides
    common.free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------
# results


def rows_of(policies: dict) -> list[dict]:
    """One CSV row per policy: its scalars and the extra work's parts."""
    return [{"policy": name, **{k: v for k, v in pol.items() if not isinstance(v, (dict, list))},
             **{f"extra_{part}_ms": ms for part, ms in pol["extra_ms_per_chunk"].items()}}
            for name, pol in policies.items()]


def targets(policies: dict, cpu_timing: bool) -> list[dict]:
    """diffusers / relaxkv_gen <= 1.03 per chunk, per policy (None on a CPU: not a GPU figure)."""
    return [{"target": f"diffusers adapter / relaxkv_gen <= {TARGET_RATIO:g} ms per chunk (the adapter costs at "
                       f"most {TARGET_RATIO - 1:.0%})", "policy": name, "mode": "eager", "kind": "eager",
             "value": pol["ratio"], "goal": TARGET_RATIO, "met": None if cpu_timing else pol["ratio"] <= TARGET_RATIO}
            for name, pol in policies.items()]


def table(data: dict) -> str:
    env = data["env"]
    label = common.CPU_LABEL if env["cpu_timing"] else "CUDA events"
    lines = [f"diffusers adapter {data['preset']} ({data['dtype']}, batch {data['batch']}, backend {data['backend']}) "
             f"on {env['device']}: ms per chunk, eager, {data['rounds']} interleaved rounds ({label})"]
    if data.get("skipped"):
        return "\n".join(lines + [f"skipped: {data['skipped']}"])
    head = ["policy", "frames/chunk", "relaxkv_gen ms", "diffusers ms", "ratio", "less extra", "max |diff|",
            "text embed ms", "rope ms"]
    rows = [[name, str(pol["chunk_frames"]), common.fmt(pol["ours_ms"]), common.fmt(pol["diffusers_ms"]),
             f"{common.fmt(pol['ratio'])}x", f"{common.fmt(pol['ratio_less_extra'])}x", common.fmt(pol["max_abs_diff"]),
             *(common.fmt(pol["extra_ms_per_chunk"][part]) for part in ("text_embedder", "rope_table"))]
            for name, pol in data["policies"].items()]
    lines += common.text_table(head, rows)
    lines += common.target_lines(data["targets"], lambda g: g["policy"])
    return "\n".join(lines)


def parse_args(argv=None):
    return common.parse_comparison_args(common.comparison_parser(__doc__, POLICIES, "side"), argv)


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    device, cfg, dtype = common.generator_setup(args)
    t0 = time.perf_counter()
    out = args.out or common.default_out("diffusers", cfg.name, device)
    data = {"benchmark": "diffusers", "env": common.env_info(device), "preset": cfg.name, "model": cfg.to_dict(),
            "dtype": str(dtype).replace("torch.", ""), "batch": 1, "backend": args.backend, "rounds": args.rounds,
            "reps": args.reps, "diffusers_extra_work": "in diffusers' times: its forward embeds the text and builds "
            "its RoPE table (unused once attached) in every pass, which relaxkv_gen's model does not (it takes the "
            "text embedded once per video); each timed alone in extra_ms_per_chunk",
            "complete": False, "policies": {}, "targets": []}
    data["cpu_timing"] = data["env"]["cpu_timing"]
    if data["cpu_timing"]:
        data["label"] = common.CPU_LABEL
    try:
        model, transformer = build_models(cfg, device, dtype, args.seed)
    except ImportError as exc:  # the GPU machine may lack diffusers: say so, measure nothing
        data["skipped"] = str(exc)
        common.write_results(out, data, [])
        print(f"bench_diffusers: SKIPPED, nothing measured: {exc}", file=sys.stderr)
        return data
    data["diffusers"] = require_diffusers().__version__
    text = random_text(cfg, 1, args.seed).to(device, dtype)
    for name in args.policies:
        pol = data["policies"][name] = bench_policy(name, model, transformer, text, args, device)
        print(f"{name}: relaxkv_gen {pol['ours_ms']:.4g} ms/chunk, diffusers {pol['diffusers_ms']:.4g} ms/chunk, "
              f"ratio {pol['ratio']:.4g} (less extra {pol['ratio_less_extra']:.4g}), max |diff| "
              f"{pol['max_abs_diff']:.3g} [{pol['seconds']:.0f} s]", flush=True)
        data["targets"] = targets(data["policies"], data["cpu_timing"])
        common.write_results(out, data, rows_of(data["policies"]))  # after every policy: a cut-short run keeps it
    data["complete"], data["seconds"] = True, time.perf_counter() - t0
    json_path, csv_path = common.write_results(out, data, rows_of(data["policies"]))
    print(f"wrote {json_path}, {csv_path} in {data['seconds']:.0f} s")
    print(table(data))
    return data


if __name__ == "__main__":
    sys.exit(EXIT_SKIPPED if main().get("skipped") else 0)
