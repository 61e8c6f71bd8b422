"""fp8_budget.py and kv_memory.py: the FP8 error budget holds over whole tiny generator rollouts, and the memory
tables of the docs' FP8 and host-pool pages are what kv_memory.py computes now.

The bound (fp8_budget's docstring): with the same inputs, the attention output's error against a float32 cache is
larger with FP8 pools than with bf16 pools (the pools really are FP8) and at most 2 x 16 times it (e4m3 keeps 4
significant bits, bf16 8); selections are those of bf16 pools at every layer of every chunk; the generator's
latents stay within the same factor of the bf16 rollout's own distance from float32.
"""
from pathlib import Path

import pytest
import torch

from benchmarks.reports import fp8_budget
from benchmarks.reports import kv_memory
from relaxkv_gen.config import get_preset
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import quantize_fp8

ROOT = Path(__file__).resolve().parents[2]
FP8_PAGE = ROOT / "docs" / "pages" / "guides" / "fp8-pools.md"
HOST_PAGE = ROOT / "docs" / "pages" / "guides" / "host-pools.md"
BOUND = fp8_budget.STEP_RATIO * fp8_budget.SLACK


@pytest.mark.parametrize("policy", ["dense", "relax", "pack"])
def test_attention_error_and_selections_over_a_tiny_rollout(policy):
    tee = fp8_budget.attention_errors(get_preset("tiny"), policy, chunks=7)
    same, fp8 = tee.errors["same"].rms(), tee.errors["fp8"].rms()
    assert same < fp8 <= BOUND * same, (same, fp8)
    assert tee.errors["fp8"].worst() <= BOUND * tee.errors["same"].worst()
    assert tee.same_selections


def test_latents_after_whole_rollouts():
    err = fp8_budget.latent_errors(get_preset("tiny"), "relax", chunks=6)
    assert 0 < err["fp8_vs_same"] <= BOUND * err["same"] and err["fp8"] <= BOUND * err["same"], err


def test_granularity_quantizer_is_the_library_one():
    """The study's per-token-and-head power-of-two scheme is exactly ops/fp8.py's quantization."""
    x = torch.randn(1, 12, 3, 32, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(fp8_budget.quantize_groups(x, "token-head"), dequantize_fp8(*quantize_fp8(x)))
    frame = fp8_budget.quantize_groups(x, "frame-head:3")
    assert frame.shape == x.shape and not torch.equal(frame, x)


def test_docs_memory_table_is_the_scripts():
    table = kv_memory.markdown()
    assert table in FP8_PAGE.read_text(), (
        f"{FP8_PAGE.relative_to(ROOT)}: the memory table is stale: paste `python -m benchmarks kv_memory` in")
    for _, _, pools_bf16, pools_fp8, *_ in kv_memory.rows():
        assert pools_fp8 / pools_bf16 <= kv_memory.TARGET


def test_docs_host_pool_table_is_the_scripts_and_meets_the_targets():
    """Host pools: a Relax cache keeps <= 2.0 GiB on the GPU at Wan2.1-1.3B and <= 8.5 GiB at Wan-14B."""
    assert kv_memory.host_markdown() in HOST_PAGE.read_text(), (
        f"{HOST_PAGE.relative_to(ROOT)}: the memory table is stale: paste `python -m benchmarks kv_memory --host` in")
    rows = {(name, policy): sizes for name, policy, _, *sizes in kv_memory.host_rows()}
    for name, target in kv_memory.HOST_TARGETS.items():
        on_gpu, gpu_host_bf16, host_bf16, gpu_host_fp8, _ = rows[name, "relax"]
        assert gpu_host_bf16 <= target and gpu_host_fp8 <= target and gpu_host_bf16 + host_bf16 == on_gpu
