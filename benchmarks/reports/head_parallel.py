"""Head parallelism on paper: K/V bytes per rank and what the collectives move per chunk, Wan2.1-1.3B and Wan-14B.

    python -m benchmarks head_parallel    # the tables of docs/pages/guides/many-gpus.md (markdown), computed here

Bytes per rank are ``KVCache.memory_bytes()`` of the cache one rank allocates (``num_heads / P`` heads; built on
``device="meta"``, so nothing is allocated): pools, prototypes, policy state, tables and the per-layer windows of
the ``window`` mode (the CUDA default), bf16, batch 1, 480 x 832 video (30 x 52 tokens per latent frame).

The collectives of one chunk (4 denoising passes + the refresh pass), bytes each rank sends:

- Ulysses all-to-all (relaxkv_gen): per layer and pass, q, k, v sequence -> head shards and the output back,
  4 tensors of ``B * S * H * D`` elements, each rank sending ``(P - 1) / P`` of its ``1 / P``;
- Relax: one all_reduce of the chunk's prototypes (fp32 ``B * U * D``; a ring sends ``2 (P - 1) / P`` of it);
- Pack: per layer, at the selection, an all_gather of the subsampled queries (``B * ceil(S / q_stride) * H * D``
  in bf16) and of the blocks' mean keys (fp32 ``B * n_blocks * H * D``); each rank sends its ``1 / P`` to the
  ``P - 1`` others.

Time = bytes / link bandwidth per direction (NVLink 4 on an H100 SXM: 450 GB/s; PCIe 5.0 x16: 64 GB/s): a model
on paper, without latency, contention or overlap with compute; no GPU measured it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

import relaxkv_kernels as rk
from relaxkv_gen.rollout import make_policy

POLICIES = ("dense", "sink", "relax", "pack")
RANKS = (1, 2, 4, 8)
PASSES = 5  # 4 denoising passes + the refresh pass
BATCH = 1
LINKS = {"NVLink 4 (450 GB/s)": 450e9, "PCIe 5.0 x16 (64 GB/s)": 64e9}


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    heads: int
    head_dim: int = 128
    height: int = 30  # tokens per latent frame: 480 x 832 video, VAE 8x, patch 2x2
    width: int = 52


MODELS = (Model("Wan2.1-1.3B", 30, 12), Model("Wan-14B", 40, 40))


def rank_cache(model: Model, policy: str, ranks: int) -> rk.KVCache | None:
    """The cache one of ``ranks`` ranks allocates (on meta tensors), or None if the heads do not divide."""
    if model.heads % ranks:
        return None
    return rk.KVCache(make_policy(policy), model.layers, BATCH, model.heads // ranks, model.head_dim, model.height,
                      model.width, dtype=torch.bfloat16, device="meta", attention="window")


def collective_bytes(model: Model, policy: str, ranks: int) -> dict[str, int]:
    """Bytes one rank sends per chunk, per collective (see the module docstring)."""
    cache = rank_cache(model, policy, 1)
    u, hd = cache.policy.chunk_frames, model.heads * model.head_dim
    s = u * model.height * model.width
    share = (ranks - 1) / ranks
    out = {"ulysses all-to-all": 4 * BATCH * s * hd * 2 * share / ranks * model.layers * PASSES}
    if policy == "relax":
        out["relax all_reduce"] = 2 * share * BATCH * u * model.head_dim * 4
    if policy == "pack":
        n_blocks = cache.storage.state["mean_key"].shape[2]
        q_sub = BATCH * math.ceil(s / cache.policy.q_stride) * hd * 2
        out["pack all_gather"] = (q_sub + BATCH * n_blocks * hd * 4) / ranks * (ranks - 1) * model.layers
    return {k: round(v) for k, v in out.items()}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def memory_table() -> list[str]:
    lines = ["| model | policy | " + " | ".join(f"P = {p}" for p in RANKS) + " |",
             "|---|---|" + "---:|" * len(RANKS)]
    for model in MODELS:
        for policy in POLICIES:
            cells = [rank_cache(model, policy, p) for p in RANKS]
            lines.append(f"| {model.name} | {policy} | "
                         + " | ".join("-" if c is None else gib(c.memory_bytes()) for c in cells) + " |")
    return lines


def collective_table() -> list[str]:
    head = ["model", "policy", "P", "collective", "MiB / chunk / rank", *(f"ms at {link}" for link in LINKS)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * (len(head) - 4)]
    for model in MODELS:
        for policy in ("dense", "relax", "pack"):
            for p in RANKS[1:]:
                if model.heads % p:
                    continue
                for name, n in collective_bytes(model, policy, p).items():
                    times = " | ".join(f"{1e3 * n / bw:.3g}" for bw in LINKS.values())
                    lines.append(f"| {model.name} | {policy} | {p} | {name} | {n / 2**20:.4g} | {times} |")
    return lines


def markdown() -> str:
    return "\n".join(["K/V memory per rank (GiB, `memory_bytes()`, window mode, bf16, batch 1, 480 x 832):", "",
                      *memory_table(), "", "Collectives per chunk (5 passes), each rank, on paper:", "",
                      *collective_table()]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
