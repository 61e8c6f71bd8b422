"""The CUDA extension: built when nvcc exists, safe without a GPU, rope_append_cuda vs the reference."""
import importlib
import os
import shutil

import pytest
import torch

from relaxkv_kernels.cuda import rope_append_cuda
from relaxkv_kernels.reference.rope import rope_angles, rope_ref, token_positions

# the module (relaxkv_kernels.backends is also the name of the backends() function the package exports)
backends = importlib.import_module("relaxkv_kernels.availability")


def _nvcc_found() -> bool:
    """Same search as setup.py: CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [os.path.join(home, "bin", "nvcc")] if home else []
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return any(c and os.path.isfile(c) and os.access(c, os.X_OK) for c in cands)


def _extension_or_skip():
    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    return ext


@pytest.mark.skipif(not _nvcc_found() or os.environ.get("RELAXKV_SKIP_CUDA_BUILD") == "1",
                    reason="nvcc not found (or RELAXKV_SKIP_CUDA_BUILD=1): pure-Python install")
def test_extension_built_when_nvcc_present():
    assert backends.cuda_extension() is not None, backends._extension_error
    assert backends.backends()["cuda_extension"]


def test_backends_report():
    report = backends.backends()
    assert set(report) == {"reference", "triton", "cuda_extension", "cuda_device"}
    assert report["reference"] is True
    assert report["cuda_device"] == torch.cuda.is_available()
    assert report["cuda_extension"] == (backends.cuda_extension() is not None)


def test_device_count():
    n = _extension_or_skip().device_count()
    assert isinstance(n, int) and n >= 0
    if torch.cuda.is_available():
        assert n == torch.cuda.device_count()


def test_raw_launcher_without_device_raises():
    ext = _extension_or_skip()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: null pointers would fault")
    n_args = 41  # 9 pointers, 8 sizes, 22 strides, dtype, stream
    with pytest.raises(RuntimeError, match="relaxkv rope_append_cuda: no CUDA device available"):
        ext.rope_append_cuda(*([0] * n_args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error path")
def test_rope_append_cuda_without_cuda_raises():
    q = torch.randn(1, 4, 1, 8)
    cache = torch.randn(1, 8, 1, 8)
    with pytest.raises(RuntimeError, match="relaxkv rope_append_cuda: "):
        rope_append_cuda(q, q, q, cache, cache.clone(), torch.randn(1, 2, 8),
                         torch.tensor([1]), torch.tensor([0]), 2, 2)


# ---------------------------------------------------------------------------------------------
# GPU: rope_append_cuda against reference/rope.py. tests/conftest.py fills the package's
# torch.empty allocations (q_rot) with NaN; the cache rows and proto slots to be written are NaN too.
# ---------------------------------------------------------------------------------------------

def _rope_same_dtype(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan RoPE computed the plain PyTorch way in x.dtype (cos/sin tables cast to x.dtype)."""
    ang = rope_angles(pos, x.shape[-1])
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # [N, 1, D/2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _assert_rope_close(out: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, what: str):
    ref = rope_ref(x.double(), pos)
    err = (out.double() - ref).abs().max().item()
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=what)
    else:  # flash-attention rule: at most ~2x the error of the same-dtype PyTorch computation
        err_torch = (_rope_same_dtype(x, pos).double() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-5, f"{what}: kernel err {err:.3e} vs torch {x.dtype} err {err_torch:.3e}"


def _make_qkv(layout, B, N, H, D, dtype, dev):
    g = dict(dtype=dtype, device=dev)
    if layout == "strided":  # 16-byte aligned views -> vectorised path
        q = torch.randn(B, N, H + 2, D, **g)[:, :, 1:H + 1]
        k = torch.randn(B, H, N, D, **g).transpose(1, 2)
        v = torch.randn(B, N, H, D, **g)
    else:  # "unaligned": odd element offsets and strides -> per-element path
        q = torch.randn(B, N, H, D + 1, **g)[..., 1:]
        k = torch.randn(B, N, H, D, **g)
        v = torch.randn(B, N + 1, H, D, **g)[:, 1:]
    assert not q.is_contiguous()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout,U,h,w,H,D", [
    ("strided", 3, 5, 7, 3, 128),
    ("unaligned", 3, 5, 7, 3, 128),
    ("strided", 1, 1, 9, 2, 64),  # single frame, one token row, D = 64 (12/10/10 pairs)
], ids=["strided-wan_d", "unaligned-wan_d", "single_frame-d64"])
def test_rope_append_cuda_matches_reference(kernel_device, dtype, layout, U, h, w, H, D):
    dev, B, F = kernel_device, 2, h * w
    n_slots = U + 2
    q, k, v = _make_qkv(layout, B, U * F, H, D, dtype, dev)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    frame_slot = torch.randperm(n_slots, device=dev)[:U]
    frame_pos = torch.randperm(12, device=dev)[:U] + 2

    k_cache = torch.randn(B, n_slots * F, H, D, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    proto = torch.randn(B, n_slots, D, device=dev)
    rows = (frame_slot[:, None] * F + torch.arange(F, device=dev)).flatten()  # [U * F], chunk order
    k_cache[:, rows] = float("nan")
    v_cache[:, rows] = float("nan")
    proto[:, frame_slot] = float("nan")
    untouched = torch.ones(n_slots * F, dtype=torch.bool, device=dev)
    untouched[rows] = False
    kc0, vc0, p0 = k_cache.clone(), v_cache.clone(), proto.clone()

    q_rot = rope_append_cuda(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, h, w)

    pos = token_positions(frame_pos, h, w)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q, pos, "q_rot")
    _assert_rope_close(k_cache[:, rows], k, pos, "k_cache")
    assert torch.equal(v_cache[:, rows], v)
    proto_ref = k.double().unflatten(1, (U, F)).mean(dim=(2, 3))  # [B, U, D]
    torch.testing.assert_close(proto[:, frame_slot].double(), proto_ref, atol=1e-5, rtol=1e-5)

    # untouched rows and slots, and the inputs, are unchanged
    assert torch.equal(k_cache[:, untouched], kc0[:, untouched])
    assert torch.equal(v_cache[:, untouched], vc0[:, untouched])
    keep = torch.ones(n_slots, dtype=torch.bool, device=dev)
    keep[frame_slot] = False
    assert torch.equal(proto[:, keep], p0[:, keep])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_rope_append_cuda_rejects_bad_inputs(kernel_device):
    dev = kernel_device
    q = torch.randn(1, 4, 1, 8, device=dev)
    cache, proto = torch.randn(1, 8, 1, 8, device=dev), torch.randn(1, 2, 8, device=dev)
    slot, pos = torch.tensor([1], device=dev), torch.tensor([0], device=dev)
    with pytest.raises(ValueError, match="tokens"):
        rope_append_cuda(q, q, q, cache, cache.clone(), proto, slot, pos, 3, 2)
    with pytest.raises(ValueError, match="stride"):
        qt = torch.randn(1, 4, 1, 16, device=dev)[..., ::2]  # stride(-1) == 2
        rope_append_cuda(qt, qt, qt, cache, cache.clone(), proto, slot, pos, 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        rope_append_cuda(q, q, q, cache.half(), cache.half(), proto, slot, pos, 2, 2)
