"""The whole chunk step with the fused kernels (Triton; the interpreter on CPU) against the reference backend."""
import os

import pytest
import torch

import relaxkv_kernels as rk

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "policy,chunks",
    [
        (rk.DenseWindow(window=6, sink=3, rerotate=True), 4),
        (rk.RelaxMemory(reservoir=15), 7),
        (rk.RelaxMemory(reservoir=15, history=2, batch0_decides=True), 7),
        (rk.PackMemory(sink_frames=2, block_frames=2, recent_frames=2, top_k=2, archive=3, q_stride=3), 9),
    ],
    ids=["sink-rerotate", "relax", "relax-h2-batch0", "pack"],
)
def test_fused_chunk_steps_match_reference(policy, chunks):
    """Past warm-up, eviction and (Relax, Pack) device-side selection, fp32, B = 2."""
    layers, batch, heads, d, h, w = 2, 2, 2, 16, 4, 4
    caches = {be: rk.KVCache(policy, layers, batch, heads, d, h, w, dtype=torch.float32, device=DEVICE, backend=be)
              for be in ("reference", "fused")}
    gen = torch.Generator().manual_seed(0)
    u = policy.chunk_frames
    for _ in range(chunks):
        for cache in caches.values():
            cache.begin_chunk()
        for _ in range(2):  # a denoising pass and the refresh pass
            for layer in range(layers):
                q, k, v = (torch.randn(batch, u * h * w, heads, d, generator=gen).to(DEVICE) for _ in range(3))
                k = k + torch.randn(batch, 1, 1, d, generator=gen).to(DEVICE)  # frame-level signal for selection
                out = {be: cache.attend(layer, q, k, v) for be, cache in caches.items()}
                torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-5, atol=1e-5)
        assert caches["fused"].selected_frames() == caches["reference"].selected_frames()
        for cache in caches.values():
            cache.end_chunk()
