"""FP8 pools' error budget, measured: the error tables of docs/pages/guides/fp8-pools.md.

    python -m benchmarks fp8_budget [--chunks 20] [--part granularity|budget]   # CPU, reference ops, minutes

Scale granularity first: e4m3 with one scale per (token, head) (ours), per token over all heads, per frame and
head, per 32 values, power-of-two or tightest scales, at Wan-like statistics (below): the error of K (after RoPE),
V and the attention output of the last chunk's queries over 9 frames, against the bytes per element; then the
same with V's rows scaled by 2^-10 .. 2^10 at random (outlier tokens, as trained models have: a random block has
none), where a scale shared by many rows pushes the small ones into e4m3's subnormals. Errors are per (token,
head) row, relative to the row, RMS over the rows.


Three caches see the same attention calls. A generator in float32 runs whole rollouts with a float32 cache
(the truth: its outputs drive the rollout), and every call's q, k and v (after the q/k norms, before RoPE)
are also given, cast to bf16, to a bf16 cache with bf16 pools (today's default) and to a bf16 cache with FP8
pools. Per policy: the attention output's error against the truth (relative RMS over all calls, and the
largest error relative to the largest output), the ratio of the two, and whether every layer of every
chunk selected the same frames (Relax's history, Pack's mid blocks) with FP8 pools as with bf16 pools.
Then the generator's latents after ``--chunks`` chunks from whole bf16 rollouts with bf16 pools and with
FP8 pools, against the float32 rollout and against each other.

Models: relaxkv_gen's ``tiny`` preset, and "Wan-like statistics": a random Wan2.1-1.3B block (dim 1536, 12
heads of 128, the preset's own init) with two layers on a 8 x 13 token grid, so keys are real RMSNorm
outputs rotated by RoPE and values come from a Wan block's projection (random weights, not a checkpoint).

Why the ratio is bounded: a bf16 pool stores each element with 8 significant bits (relative rounding error
at most 2^-9), an e4m3 code with 4 (at most 2^-5 relative to a power-of-two scale: 2^-4 of the element at
worst); the stored rows' contribution to the output error grows by that factor of 16, and the rest (rounding
q, the chunk's own rows, the output) is the same in both caches. So the FP8 error is at most 16 times the
bf16 error (2x slack for the statistics of a few thousand calls), and more than the bf16 error (it is not
silently skipped): the tests (benchmarks/reports/test_fp8_budget.py) assert both.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

import relaxkv_kernels as rk
from relaxkv_gen.config import get_preset
from relaxkv_gen.model import build_model
from relaxkv_gen.rollout import POLICY_NAMES
from relaxkv_gen.rollout import denoise_chunk
from relaxkv_gen.rollout import make_cache
from relaxkv_gen.rollout import make_policy
from relaxkv_gen.rollout import random_text
from relaxkv_gen.rollout import rollout
from relaxkv_gen.sampler import FlowMatchSampler
from relaxkv_kernels import dense_attention
from relaxkv_kernels.geometry import apply_rope
from relaxkv_kernels.geometry import token_positions
from relaxkv_kernels.ops.fp8 import FP8_MAX
from relaxkv_kernels.ops.fp8 import fp8_scale

FP8 = torch.float8_e4m3fn
STEP_RATIO = 16  # e4m3 (4 significant bits) against bf16 (8): the stored rows' rounding error grows 16x
SLACK = 2


def wan_like():
    """A random Wan2.1-1.3B-width model: two blocks, 8 x 13 tokens per latent frame (16 x 26 latents)."""
    return dataclasses.replace(get_preset("wan-1.3b"), name="wan-1.3b-block", num_layers=2, latent_height=16,
                               latent_width=26, text_len=16)


class Errors:
    """Sums of one cache's attention-output errors against the truth over many calls."""

    def __init__(self):
        self.sq_err = self.sq_ref = self.max_err = self.max_ref = 0.0

    def add(self, got: torch.Tensor, truth: torch.Tensor) -> None:
        err = got.double() - truth.double()
        self.sq_err += float(err.square().sum())
        self.sq_ref += float(truth.double().square().sum())
        self.max_err = max(self.max_err, float(err.abs().max()))
        self.max_ref = max(self.max_ref, float(truth.abs().max()))

    def rms(self) -> float:
        """Relative RMS error: ||got - truth|| / ||truth|| over every call."""
        return math.sqrt(self.sq_err / self.sq_ref)

    def worst(self) -> float:
        """The largest error, relative to the largest output."""
        return self.max_err / self.max_ref


class TeeCache:
    """The truth cache for the model, the same calls (cast to each cache's dtype) to the others ("same": pools in
    the compute dtype, "fp8"), errors kept; ``same_selections``: FP8 pools chose what "same" chose, every layer."""

    def __init__(self, truth: rk.KVCache, others: dict[str, rk.KVCache]):
        self.truth, self.others = truth, others
        self.errors = {name: Errors() for name in others}
        self.same_selections = True

    def begin_chunk(self) -> None:
        for cache in (self.truth, *self.others.values()):
            cache.begin_chunk()

    def end_chunk(self) -> None:
        for cache in (self.truth, *self.others.values()):
            cache.end_chunk()
        same, fp8 = self.others["same"], self.others["fp8"]
        for layer in range(self.truth.num_layers):
            self.same_selections &= fp8.selected_frames(layer) == same.selected_frames(layer)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.truth.attend(layer, q, k, v)
        for name, cache in self.others.items():
            got = cache.attend(layer, q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype))
            self.errors[name].add(got, out)
        return out


def float32_rollout(cfg, pol, chunks: int, wrap, seed: int = 0):
    """A float32 rollout of ``chunks`` chunks of policy ``pol`` whose attention calls go to ``wrap(cache)`` (cache: the
    model's float32 KVCache; the wrapper: an AttendFn with begin_chunk / end_chunk, called around every chunk);
    returns the wrapper."""
    model = build_model(cfg, seed=seed)
    context = model.embed_text(random_text(cfg, 1, seed))
    attend = wrap(make_cache(model, pol, 1))
    sampler, u = FlowMatchSampler.create(), int(pol.chunk_frames)
    g = torch.Generator().manual_seed(seed)
    shape = (1, cfg.in_dim, u, cfg.latent_height, cfg.latent_width)
    with torch.no_grad():
        for _ in range(chunks):
            attend.begin_chunk()
            denoise_chunk(lambda x, t, _i: model(x, t, context, attend), sampler,
                          lambda: torch.randn(shape, generator=g), 1, u, "cpu")
            attend.end_chunk()
    return attend


def attention_errors(cfg, policy: str, chunks: int, attention: str = "segments", backend: str = "reference",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> TeeCache:
    """A float32 rollout of ``chunks`` chunks whose every attention call also runs on a ``dtype`` cache with pools in
    ``dtype`` ("same") and one with FP8 pools ("fp8") (``attention`` and ``backend`` for both)."""
    pol = make_policy(policy)

    def other(kv_dtype):
        return rk.KVCache(pol, cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.grid_height, cfg.grid_width,
                          dtype=dtype, backend=backend, attention=attention, kv_dtype=kv_dtype)

    return float32_rollout(cfg, pol, chunks, lambda truth: TeeCache(truth, {"same": other(None), "fp8": other(FP8)}),
                           seed)


def latent_errors(cfg, policy: str, chunks: int, seed: int = 0) -> dict[str, float]:
    """Relative RMS differences of whole rollouts' latents: bf16 model with bf16 pools ("same") and with FP8 pools
    ("fp8"), each against the float32 rollout, and FP8 against bf16 pools ("fp8_vs_same")."""
    text = random_text(cfg, 1, seed)
    with torch.no_grad():
        truth = rollout(build_model(cfg, seed=seed), policy, text, num_chunks=chunks, seed=seed, timing=False).latents
        model = build_model(cfg, seed=seed, dtype=torch.bfloat16)
        same, fp8 = (rollout(model, policy, text, num_chunks=chunks, seed=seed, timing=False, kv_dtype=kv).latents
                     for kv in (None, FP8))

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    return {"same": rel(same, truth), "fp8": rel(fp8, truth), "fp8_vs_same": rel(fp8, same)}


class Recorder:
    """An AttendFn through ``cache`` that keeps the pre-RoPE q, k, v of one layer's last call of every chunk (its
    refresh pass: the rows a cache stores) in ``refresh``."""

    def __init__(self, cache: rk.KVCache, layer: int):
        self.cache, self.layer, self.last, self.refresh = cache, layer, None, []

    def begin_chunk(self) -> None:
        self.cache.begin_chunk()

    def end_chunk(self) -> None:
        self.cache.end_chunk()
        self.refresh.append(self.last)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer == self.layer:
            self.last = (q, k, v)
        return self.cache.attend(layer, q, k, v)


def wan_keys_values(frames: int = 9, seed: int = 0):
    """q of the last chunk and the rotated keys and values of ``frames`` latent frames of the Wan-like model's second
    block (its refresh passes: the rows a cache stores), float32: (q [1, 3F, H, D], k [1, frames F, H, D], v)."""
    cfg, pol = wan_like(), make_policy("dense")
    u = int(pol.chunk_frames)
    qs, ks, vs = zip(*float32_rollout(cfg, pol, frames // u, lambda cache: Recorder(cache, layer=1), seed).refresh)
    f = cfg.grid_height * cfg.grid_width
    pos = token_positions(torch.arange(frames), cfg.grid_height, cfg.grid_width)
    k = apply_rope(torch.cat(ks, 1), pos)
    q = apply_rope(qs[-1], pos[-u * f:])
    return q, k, torch.cat(vs, 1)


def quantize_groups(x: torch.Tensor, group: str, pow2: bool = True) -> torch.Tensor:
    """``x`` [1, N, H, D] through e4m3 with one scale per group (dequantized, float32): "token-head" (D values),
    "token" (H * D), "frame-head" (F * D, F = N / frames), "32" (32 values); ``pow2``: power-of-two scales (ours),
    else the tightest ``amax / 448``."""
    d = x.shape[-1]
    if group == "token-head":
        g = x
    elif group == "token":
        g = x.flatten(-2)
    elif group == "32":
        g = x.unflatten(-1, (d // 32, 32))
    else:  # frame-head: [1, frames, F, H, D] -> [1, frames, H, F * D]
        frames = int(group.split(":")[1])
        g = x.unflatten(1, (frames, -1)).transpose(2, 3).flatten(-2)
    amax = g.abs().amax(-1, keepdim=True)
    scale = fp8_scale(amax) if pow2 else (amax / FP8_MAX).clamp_min(2.0**-126)
    back = (g / scale).to(FP8).float() * scale
    if group.startswith("frame-head"):
        return back.unflatten(-1, (-1, d)).transpose(2, 3).flatten(1, 2)
    return back.reshape(x.shape)


def row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS over the (token, head) rows of each row's relative error ||got - want|| / ||want|| (a norm over the whole
    tensor would hide what happens to small rows)."""
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).square().mean().sqrt())


def granularity_markdown(frames: int = 9) -> str:
    """Error against bytes of the scale granularities at Wan-like statistics (module docstring)."""
    q, k, v = wan_keys_values(frames)
    h, d = k.shape[2:]
    truth = dense_attention(q, k, v, engine="reference")
    schemes = [("token-head", True, "per token and head, power of two (ours)", 4 / d),
               ("token-head", False, "per token and head, amax / 448", 4 / d),
               ("token", True, "per token, all heads", 4 / (h * d)),
               (f"frame-head:{frames}", True, "per frame and head", 4 / (k.shape[1] // frames * d)),
               ("32", True, "per 32 values", 4 / 32)]
    g = torch.Generator().manual_seed(1)
    spread = v * torch.exp2(torch.randint(-10, 11, (1, v.shape[1], 1, 1), generator=g).float())  # outliers
    truth_spread = dense_attention(q, k, spread, engine="reference")
    lines = ["| scales | bytes per element (bf16: 2) | K error | V error | attention error | V with rows spread "
             "over 2^-10 .. 2^10: V error | attention error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for group, pow2, name, extra in schemes:
        kq, vq, sq = (quantize_groups(x, group, pow2) for x in (k, v, spread))
        out = dense_attention(q, kq, vq, engine="reference")
        out_spread = dense_attention(q, kq, sq, engine="reference")
        errs = [row_error(a, b) for a, b in ((kq, k), (vq, v), (out, truth), (sq, spread), (out_spread, truth_spread))]
        lines.append(f"| {name} | {1 + extra:.3f} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    return "\n".join(lines) + "\n"


def markdown(chunks: int) -> str:
    lines = ["| model | policy | attention error, bf16 pools | FP8 pools | ratio | largest, bf16 pools | FP8 pools "
             "| selections | latents after " + f"{chunks} chunks, bf16 pools | FP8 pools | FP8 vs bf16 pools |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for cfg in (get_preset("tiny"), wan_like()):
        for policy in POLICY_NAMES:
            tee = attention_errors(cfg, policy, chunks)
            same, fp8 = tee.errors["same"], tee.errors["fp8"]
            lat = latent_errors(cfg, policy, chunks)
            lines.append(f"| {cfg.name} | {policy} | {same.rms():.2e} | {fp8.rms():.2e} | {fp8.rms() / same.rms():.1f} "
                         f"| {same.worst():.2e} | {fp8.worst():.2e} | "
                         f"{'identical' if tee.same_selections else 'DIFFER'} | {lat['same']:.2e} | {lat['fp8']:.2e} "
                         f"| {lat['fp8_vs_same']:.2e} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--part", choices=["granularity", "budget", "all"], default="all")
    args = parser.parse_args()
    if args.part in ("granularity", "all"):
        sys.stdout.write(granularity_markdown() + "\n")
    if args.part in ("budget", "all"):
        sys.stdout.write(markdown(args.chunks))
