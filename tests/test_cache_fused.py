"""The whole chunk step with the kernels against the reference backend: the Triton kernels (the interpreter on
CPU), and the csrc/ CUDA kernels (emulated on CPU, see tests/cuda_emulator.py)."""
import os

import pytest
import torch

import relaxkv_kernels as rk

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_OPS = ("rope_append", "relax_select", "mid_select", "compress_kv", "gather_kv_rope")
POLICIES = pytest.mark.parametrize(
    "policy,chunks",
    [
        (rk.DenseWindow(window=6, sink=3, rerotate=True), 4),
        (rk.RelaxMemory(reservoir=15), 7),
        (rk.RelaxMemory(reservoir=15, history=2, batch0_decides=True), 7),
        (rk.PackMemory(sink_frames=2, block_frames=2, recent_frames=2, top_k=2, archive=3, q_stride=3), 9),
    ],
    ids=["sink-rerotate", "relax", "relax-h2-batch0", "pack"],
)


@POLICIES
def test_fused_chunk_steps_match_reference(policy, chunks):
    """Past warm-up, eviction and (Relax, Pack) device-side selection, fp32, B = 2."""
    _run_against_reference(policy, chunks, DEVICE, "fused")


@POLICIES
def test_cuda_kernel_chunk_steps_match_reference(policy, chunks, kernel_device, monkeypatch):
    """Every CUDA kernel in the step (RELAXKV_BACKEND_<OP>=cuda), attention through impl="gather"."""
    for op in CUDA_OPS:
        monkeypatch.setenv(f"RELAXKV_BACKEND_{op.upper()}", "cuda")
    monkeypatch.setattr(rk.tuning, "choose_impl", lambda *args: "gather")
    _run_against_reference(policy, chunks, kernel_device, "auto")


def _run_against_reference(policy, chunks: int, device: str, backend: str):
    layers, batch, heads, d, h, w = 2, 2, 2, 16, 4, 4
    caches = {be: rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, device=device, backend=be)
              for be in ("reference", backend)}
    gen = torch.Generator().manual_seed(0)
    u = policy.chunk_frames
    for _ in range(chunks):
        for cache in caches.values():
            cache.begin_chunk()
        for _ in range(2):  # a denoising pass and the refresh pass
            for layer in range(layers):
                q, k, v = (torch.randn(batch, u * h * w, heads, d, generator=gen).to(device) for _ in range(3))
                k = k + torch.randn(batch, 1, 1, d, generator=gen).to(device)  # frame-level signal for selection
                out = {be: cache.attend(layer, q, k, v) for be, cache in caches.items()}
                torch.testing.assert_close(out[backend], out["reference"], rtol=1e-5, atol=1e-5)
        assert caches[backend].selected_frames() == caches["reference"].selected_frames()
        for cache in caches.values():
            cache.end_chunk()
