"""CUDA ops of csrc/ (relax_select, mid_select, compress_kv, gather_kv_rope) and the gather attention path.

CPU (every session): the extension exposes the launchers, every launcher and wrapper raises a clear
RuntimeError without a GPU, dispatch finds ``relaxkv_kernels.cuda.<op>_cuda``, gather_kv_rope's
reference against a literal slice + cat + delta RoPE, ``sparse_kv_attention(impl="gather")`` against
``impl="fused"``, the tuning table, bad inputs. GPU (``-m gpu``): each kernel against its reference and
its Triton twin in fp32 / fp16 / bf16 with ragged tables, strided and unaligned inputs, B > 1, and
NaN-poisoned outputs (tests/conftest.py), plus a CUDA-graph replay of a Relax chunk step.
``tests/run_compute_sanitizer.sh`` runs the GPU part under compute-sanitizer memcheck.
"""
import importlib
import inspect
import json
import os

import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels import cuda as rk_cuda
from relaxkv_kernels import reference, tuning
from relaxkv_kernels.availability import cuda_extension
from relaxkv_kernels.ops import implementation, resolve_backend
from relaxkv_kernels.reference.rope import delta_rope_ref

CUDA_OPS = ["relax_select", "mid_select", "compress_kv", "gather_kv_rope"]
REFS = {
    "relax_select": reference.relax_select_ref,
    "mid_select": reference.mid_select_ref,
    "compress_kv": reference.compress_kv_into_ref,
    "gather_kv_rope": reference.gather_kv_rope_ref,
}
N_LAUNCHER_ARGS = {"relax_select_cuda": 35, "mid_select_cuda": 37, "compress_kv_cuda": 35, "gather_kv_rope_cuda": 22}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _extension_or_skip():
    ext = cuda_extension()
    if ext is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    return ext


def _triton_or_skip(name: str):
    """relaxkv_kernels.triton.<name>_triton, imported lazily (written separately; skip when absent)."""
    pytest.importorskip("triton")
    try:
        mod = importlib.import_module("relaxkv_kernels.triton")
    except ImportError as exc:
        pytest.skip(f"relaxkv_kernels.triton does not import: {exc}")
    fn = getattr(mod, f"{name}_triton", None)
    if fn is None:
        pytest.skip(f"relaxkv_kernels.triton.{name}_triton not available")
    return fn


def _triton_twin(name: str, dev: str, dtype: torch.dtype):
    """The Triton kernel to compare a CUDA kernel with: on the GPU always; on the CPU (the emulation) under
    the Triton interpreter, except bf16, which the interpreter computes wrongly (../shared/GPU.md)."""
    if dev == "cpu" and (dtype == torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1"):
        return None
    return _triton_or_skip(name)


# ------------------------------------------------------------------------------------------ CPU


def test_extension_exposes_the_launchers():
    ext = _extension_or_skip()
    for name in N_LAUNCHER_ARGS:
        assert callable(getattr(ext, name)), name
    assert ext.mid_select_splits(780) == 13 and ext.mid_select_splits(1) == 1 and ext.mid_select_splits(10**6) == 32


@pytest.mark.parametrize("name", list(N_LAUNCHER_ARGS))
def test_raw_launcher_without_device_raises(name):
    ext = _extension_or_skip()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: null pointers would fault")
    with pytest.raises(RuntimeError, match=f"relaxkv {name}: no CUDA device available"):
        getattr(ext, name)(*([0] * N_LAUNCHER_ARGS[name]))


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_wrapper_has_the_reference_signature(op):
    fn = getattr(rk_cuda, f"{op}_cuda")
    assert list(inspect.signature(fn).parameters) == list(inspect.signature(REFS[op]).parameters)


@pytest.mark.parametrize("op", CUDA_OPS)
def test_dispatch_finds_the_cuda_kernel(op):
    _extension_or_skip()
    cuda = torch.device("cuda")
    assert resolve_backend(op, cuda, "cuda") == "cuda"
    assert resolve_backend(op, cuda) == ("cuda" if op == "gather_kv_rope" else "triton")  # auto: see ops._CUDA_AUTO
    assert implementation(op, cuda, "cuda") is getattr(rk_cuda, f"{op}_cuda")
    assert resolve_backend(op, torch.device("cpu")) == "reference"


def test_gather_has_no_triton_backend():
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        resolve_backend("gather_kv_rope", torch.device("cpu"), "triton")


def _cpu_args(op, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    seg = torch.zeros(2, 6, 3, dtype=torch.int32)
    if op == "relax_select":
        return (r(2, 8, 16), torch.arange(8), torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5]), seg, 2,
                torch.tensor([20]), 16, 2.0, False, False)
    if op == "mid_select":
        return r(2, 32, 4, 16), r(2, 6, 4, 16), torch.tensor([1, 2, 3]), torch.arange(6), seg, 1, torch.tensor([9]), 100, 8, 2
    if op == "compress_kv":
        return (r(2, 64, 2, 16), r(2, 64, 2, 16), r(2, 40, 2, 16), r(2, 40, 2, 16), r(2, 3, 2, 16), torch.tensor([1]),
                torch.tensor([4]), 8, 2, 4, 8)
    return r(2, 40, 2, 16), r(2, 40, 2, 16), torch.tensor([[[0, 5, 1]], [[3, 5, 0]]], dtype=torch.int32), 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error path")
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_wrapper_without_gpu_raises(op):
    _extension_or_skip()
    with pytest.raises(RuntimeError, match=f"relaxkv {op}_cuda: no CUDA device available"):
        getattr(rk_cuda, f"{op}_cuda")(*_cpu_args(op, torch.Generator().manual_seed(0)))


def _ragged_table(batch: int, n_rows: int, gen: torch.Generator):
    """Per-batch tables with zero-length, single-row and odd segments, the same total for every element."""
    lengths = [[17, 0, 1, 9, 0, 30], [5, 21, 0, 0, 30, 1]][:batch]
    while len(lengths) < batch:
        lengths.append(list(reversed(lengths[-1])))
    assert len({sum(row) for row in lengths}) == 1
    rows = []
    for lens in lengths:
        row = []
        for n in lens:
            start = int(torch.randint(0, n_rows - n + 1, (1,), generator=gen))
            delta = int(torch.randint(-40, 40, (1,), generator=gen))
            row.append([start, n, delta])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32), sum(lengths[0])


def _gather_literal(k_pool, v_pool, seg):
    """Slice + cat + delta_rope_ref, one batch element at a time: what the Relax code does on every call."""
    ks, vs = [], []
    for b in range(k_pool.shape[0]):
        kb, vb = [], []
        for start, length, delta in seg[b].tolist():
            if length == 0:
                continue
            kb.append(delta_rope_ref(k_pool[b, start:start + length], torch.full((length,), float(delta))))
            vb.append(v_pool[b, start:start + length])
        ks.append(torch.cat(kb))
        vs.append(torch.cat(vb))
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("batch,heads,head_dim", [(1, 1, 8), (2, 3, 128), (3, 2, 64)],
                         ids=["single_head-d8", "b2-wan_d", "b3-d64"])
def test_gather_kv_rope_ref_matches_literal(batch, heads, head_dim):
    gen = torch.Generator().manual_seed(10)
    k_pool = torch.randn(batch, 90, heads, head_dim, generator=gen, dtype=torch.float64)
    v_pool = torch.randn(batch, 90, heads, head_dim, generator=gen, dtype=torch.float64)
    seg, total = _ragged_table(batch, 90, gen)
    k, v = reference.gather_kv_rope_ref(k_pool, v_pool, seg, total)
    k_lit, v_lit = _gather_literal(k_pool, v_pool, seg)
    assert k.shape == (batch, total, heads, head_dim) and k.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(k, k_lit, rtol=1e-12, atol=1e-12)
    assert torch.equal(v, v_lit)


def test_gather_kv_rope_public_op_matches_reference():
    gen = torch.Generator().manual_seed(11)
    k_pool, v_pool = torch.randn(2, 90, 2, 32, generator=gen), torch.randn(2, 90, 2, 32, generator=gen)
    seg, total = _ragged_table(2, 90, gen)
    k0, v0, s0 = k_pool.clone(), v_pool.clone(), seg.clone()
    k, v = rk.gather_kv_rope(k_pool, v_pool, seg, total)
    k_ref, v_ref = reference.gather_kv_rope_ref(k_pool, v_pool, seg, total)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0) and torch.equal(seg, s0)


def _attention_case(gen, dtype=torch.float32, device="cpu"):
    q = torch.randn(2, 33, 3, 64, generator=gen).to(device, dtype)
    k_pool = torch.randn(2, 120, 3, 64, generator=gen).to(device, dtype)
    v_pool = torch.randn(2, 120, 3, 64, generator=gen).to(device, dtype)
    seg, total = _ragged_table(2, 120, gen)
    return q, k_pool, v_pool, seg.to(device), total


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale0.3"])
def test_gather_impl_matches_fused_on_cpu(scale):
    q, k_pool, v_pool, seg, total = _attention_case(torch.Generator().manual_seed(12))
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend="reference", impl="gather", total=total)
    assert gather.shape == fused.shape and gather.dtype == fused.dtype
    torch.testing.assert_close(gather, fused, rtol=1e-5, atol=1e-5)


@pytest.fixture
def tuning_table(tmp_path, monkeypatch):
    """A private tuning.json (the package's own is left alone)."""
    path = tmp_path / "tuning.json"
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    tuning.load_table.cache_clear()
    yield path
    tuning.load_table.cache_clear()


def test_tuning_keys_and_record(tuning_table):
    assert [tuning.bucket(n) for n in (1, 2, 3, 4680, 8192, 10920)] == [1, 2, 4, 8192, 8192, 16384]
    key = tuning.tuning_key("cpu", 64, 33, 57)
    assert key == "cpu|d64|q64|k64"
    assert tuning.choose_impl("cpu", 64, 33, 57) == "fused"  # no table: default
    tuning.record({key: "gather"})
    assert json.loads(tuning_table.read_text()) == {"version": 1, "entries": {key: "gather"}}
    assert tuning.choose_impl("cpu", 64, 40, 60) == "gather"  # same buckets
    assert tuning.choose_impl("cpu", 64, 65, 60) == "fused"
    with pytest.raises(ValueError, match="expected values in"):
        tuning.record({key: "fastest"})


def test_auto_impl_follows_the_tuning_table(tuning_table):
    q, k_pool, v_pool, seg, total = _attention_case(torch.Generator().manual_seed(13))
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total)
    assert not torch.equal(fused, gather)  # different kernels: distinguishable results
    assert torch.equal(rk.sparse_kv_attention(q, k_pool, v_pool, seg, total=total), fused)
    tuning.record({tuning.tuning_key("cpu", 64, q.shape[1], total): "gather"})
    assert torch.equal(rk.sparse_kv_attention(q, k_pool, v_pool, seg, total=total), gather)
    assert torch.equal(rk.sparse_kv_attention(q, k_pool, v_pool, seg), fused)  # no total: fused


@pytest.mark.parametrize("impl", ["gather", "auto"])
def test_compiled_gather_attention_matches_eager(impl):
    q, k_pool, v_pool, seg, total = _attention_case(torch.Generator().manual_seed(14))

    def attend(q, k_pool, v_pool, seg):
        return rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl=impl, total=total)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k_pool, v_pool, seg), attend(q, k_pool, v_pool, seg))


def _gather_bad_cases():
    gen = torch.Generator().manual_seed(15)
    kp, vp = torch.randn(2, 40, 2, 16, generator=gen), torch.randn(2, 40, 2, 16, generator=gen)
    seg = torch.tensor([[[0, 5, 1], [9, 2, 0]], [[3, 7, 0], [0, 0, 0]]], dtype=torch.int32)
    return [
        ("total_mismatch", (kp, vp, seg, 8), ValueError, "total: expected sum\\(length\\).*\\[7, 7\\], got 8"),
        ("total_zero", (kp, vp, seg, 0), ValueError, "total: expected an int in \\[1"),
        ("total_float", (kp, vp, seg, 7.0), TypeError, "total: expected an int"),
        ("ragged_totals", (kp, vp, torch.tensor([[[0, 5, 1]], [[3, 6, 0]]], dtype=torch.int32), 5), ValueError,
         "\\[5, 6\\], got 5"),
        ("seg_int64", (kp, vp, seg.long(), 7), TypeError, "seg: expected dtype"),
        ("seg_outside_pool", (kp, vp, torch.tensor([[[36, 7, 0]], [[3, 7, 0]]], dtype=torch.int32), 7), ValueError,
         "rows inside the pool"),
        ("v_pool_dtype", (kp, vp.half(), seg, 7), TypeError, "v_pool: expected dtype"),
        ("v_pool_shape", (kp, vp[:, :30], seg, 7), ValueError, "v_pool: expected shape"),
        ("odd_head_dim", (kp[..., :15], vp[..., :15], seg, 7), ValueError, "head_dim must be a positive even"),
        ("seg_device", (kp, vp, seg.to("meta"), 7), ValueError, "seg: expected a tensor on cpu"),
    ]


@pytest.mark.parametrize("case", _gather_bad_cases(), ids=lambda c: c[0])
def test_gather_kv_rope_rejects_bad_inputs(case):
    _, args, exc, match = case
    with pytest.raises(exc, match=match):
        rk.gather_kv_rope(*args)


def test_sparse_kv_attention_impl_arguments_are_checked():
    q, k_pool, v_pool, seg, total = _attention_case(torch.Generator().manual_seed(16))
    with pytest.raises(ValueError, match="impl: expected one of"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="flash")
    with pytest.raises(ValueError, match="total: required for impl='gather'"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather")
    with pytest.raises(ValueError, match="total: expected sum\\(length\\)"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total + 1)
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        rk.sparse_kv_attention(q, k_pool, v_pool, seg, backend="triton", impl="gather", total=total)


# ------------------------------------------------------------------------------------------ GPU
# tests/conftest.py fills every torch.empty* made by the package (kernel outputs, workspaces) with NaN;
# the pool rows and table rows a kernel must write are NaN / poison too, so a missed write fails.


def _close(got, want, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=what)


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, N, H, D] as a contiguous tensor, a 16-byte aligned strided view, or an unaligned view (scalar path)."""
    if layout == "contiguous":
        return x.contiguous()
    b, n, h, d = x.shape
    if layout == "strided":  # heads padded, 16-byte aligned rows
        out = torch.empty(b, n, h + 2, d, dtype=x.dtype, device=x.device)[:, :, 1:h + 1]
    else:  # "unaligned": odd element offset
        out = torch.empty(b, n, h, d + 1, dtype=x.dtype, device=x.device)[..., 1:]
    out.copy_(x)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("batch0,contiguous,index_dtype", [
    (False, False, torch.int64), (True, False, torch.int64), (False, True, torch.int32),
], ids=["per_sample", "batch0_decides", "contiguous_rope-int32"])
@pytest.mark.parametrize("head_dim", [128, 62], ids=["d128", "d62"])
def test_relax_select_cuda_matches_reference(kernel_device, batch0, contiguous, index_dtype, head_dim):
    dev, b, n_slots = kernel_device, 3, 12
    gen = torch.Generator(device=dev).manual_seed(20)
    proto = torch.randn(2, b, n_slots, head_dim, device=dev, generator=gen)[1]  # a layer of [L, B, S, D]: strided
    proto = proto.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride != S * D
    idx = lambda *v: torch.tensor(v, dtype=index_dtype, device=dev)  # noqa: E731
    slot_pos = torch.randperm(40, device=dev)[:n_slots].to(index_dtype)
    args = (proto, slot_pos, idx(0, 1), idx(11), idx(3, 5, 6, 8, 9), None, 2, idx(20, 21), 16, 2.0, batch0, contiguous)
    seg0 = torch.randint(-5, 5, (b, 7, 3), dtype=torch.int32, device=dev)
    seg0[:, 2:4] = -(2**30)  # rows the kernel must write
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    proto0 = proto.clone()
    scores = rk_cuda.relax_select_cuda(*args[:5], seg_cuda, *args[6:])
    want = reference.relax_select_ref(*args[:5], seg_ref, *args[6:])
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(seg_cuda, seg_ref)
    assert torch.equal(proto, proto0)
    twin = _triton_twin("relax_select", dev, torch.float32)
    if index_dtype == torch.int64 and twin is not None:
        seg_tri = seg0.clone()
        scores_tri = twin(*args[:5], seg_tri, *args[6:])
        torch.testing.assert_close(scores, scores_tri, rtol=1e-5, atol=1e-5)
        assert torch.equal(seg_cuda, seg_tri)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout,n_q,q_stride", [
    ("contiguous", 200, 3), ("strided", 97, 1), ("unaligned", 130, 130),
], ids=["contiguous-stride3", "strided-odd_nq", "unaligned-one_query"])
def test_mid_select_cuda_matches_reference(kernel_device, dtype, layout, n_q, q_stride):
    dev, b, h, d, n_blocks = kernel_device, 2, 4, 128, 9
    gen = torch.Generator(device=dev).manual_seed(21)
    q = _strided(torch.randn(b, n_q, h, d, device=dev, generator=gen).to(dtype), layout)
    mean_key = torch.randn(b, n_blocks, h, d, device=dev, generator=gen)
    mid_slots = torch.tensor([4, 5, 6, 7, 8, 0, 1], device=dev)
    block_pos = torch.arange(n_blocks, device=dev) * 4 + 8
    target = torch.tensor([40, 44, 48], device=dev)
    args = (q, mean_key, mid_slots, block_pos, None, 5, target, 1000, 12, q_stride)
    seg0 = torch.full((b, 10, 3), -(2**30), dtype=torch.int32, device=dev)
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    q0 = q.clone()
    scores = rk_cuda.mid_select_cuda(*args[:4], seg_cuda, *args[5:])
    want = reference.mid_select_ref(*args[:4], seg_ref, *args[5:])
    scale = want.abs().max().item()
    torch.testing.assert_close(scores / scale, want / scale, rtol=0, atol=1e-5)
    assert torch.equal(seg_cuda, seg_ref)
    assert torch.equal(q, q0)
    twin = _triton_twin("mid_select", dev, dtype)
    if twin is not None:
        seg_tri = seg0.clone()
        scores_tri = twin(*args[:4], seg_tri, *args[5:])
        torch.testing.assert_close(scores / scale, scores_tri / scale, rtol=0, atol=1e-5)
        assert torch.equal(seg_cuda, seg_tri)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout,frames,height,width,heads,head_dim", [
    ("contiguous", 4, 8, 8, 2, 128),
    ("strided", 5, 9, 10, 3, 128),  # odd grid: floors 2x2x2
    ("unaligned", 2, 4, 12, 1, 64),
], ids=["contiguous-4x8x8", "strided-odd_grid", "unaligned-d64"])
def test_compress_kv_cuda_matches_reference(kernel_device, dtype, layout, frames, height, width, heads, head_dim):
    dev, b, n_blocks, row0, slot, t0 = kernel_device, 2, 4, 7, 2, 13
    gen = torch.Generator(device=dev).manual_seed(22)
    n = frames * height * width
    k = _strided(torch.randn(b, n, heads, head_dim, device=dev, generator=gen).to(dtype), layout)
    v = _strided(torch.randn(b, n, heads, head_dim, device=dev, generator=gen).to(dtype), layout)
    nc = (frames // 2) * (height // 4) * (width // 4)
    n_rows = row0 + n_blocks * nc + 3
    k_pool = torch.randn(b, n_rows, heads, head_dim, device=dev, generator=gen).to(dtype)
    v_pool = torch.randn_like(k_pool)
    mean_key = torch.randn(b, n_blocks, heads, head_dim, device=dev, generator=gen)
    rows = slice(row0 + slot * nc, row0 + (slot + 1) * nc)
    k_pool[:, rows] = float("nan")
    v_pool[:, rows] = float("nan")
    mean_key[:, slot] = float("nan")
    pools = [t.clone() for t in (k_pool, v_pool, mean_key)]
    k0, v0 = k.clone(), v.clone()
    one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    rk_cuda.compress_kv_cuda(k, v, k_pool, v_pool, mean_key, one(slot), one(t0), row0, frames, height, width)
    ref = [t.clone() for t in pools]
    reference.compress_kv_into_ref(k, v, *ref, one(slot), one(t0), row0, frames, height, width)
    _close(k_pool, ref[0], dtype, "k_pool")
    _close(v_pool, ref[1], dtype, "v_pool")
    torch.testing.assert_close(mean_key, ref[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    twin = _triton_twin("compress_kv", dev, dtype)
    if twin is not None:
        tri = [t.clone() for t in pools]
        twin(k, v, *tri, one(slot), one(t0), row0, frames, height, width)
        _close(k_pool, tri[0], dtype, "k_pool vs triton")
        _close(v_pool, tri[1], dtype, "v_pool vs triton")
        torch.testing.assert_close(mean_key, tri[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout,batch,heads,head_dim", [
    ("contiguous", 2, 3, 128), ("strided", 3, 2, 128), ("unaligned", 1, 1, 64),
], ids=["contiguous-b2", "strided-b3", "unaligned-d64"])
def test_gather_kv_rope_cuda_matches_reference(kernel_device, dtype, layout, batch, heads, head_dim):
    dev = kernel_device
    gen = torch.Generator().manual_seed(23)
    k_pool = _strided(torch.randn(batch, 150, heads, head_dim, generator=gen).to(dev, dtype), layout)
    v_pool = _strided(torch.randn(batch, 150, heads, head_dim, generator=gen).to(dev, dtype), layout)
    seg, total = _ragged_table(batch, 150, gen)
    seg = seg.to(dev)
    k0, v0 = k_pool.clone(), v_pool.clone()
    k, v = rk_cuda.gather_kv_rope_cuda(k_pool, v_pool, seg, total)
    k_ref, v_ref = reference.gather_kv_rope_ref(k_pool.double(), v_pool, seg, total)
    assert k.shape == (batch, total, heads, head_dim) and k.is_contiguous() and v.is_contiguous()
    _close(k, k_ref, dtype, "k")
    assert torch.equal(v, v_ref)
    assert torch.equal(k_pool, k0) and torch.equal(v_pool, v0)


def test_gather_kv_rope_cuda_uncovered_rows_are_nan_not_out_of_bounds(kernel_device):
    """total > the table's rows: an error the host cannot see; the kernel writes NaN there, nothing else."""
    dev = kernel_device
    k_pool = torch.randn(2, 40, 2, 64, device=dev, dtype=torch.bfloat16)
    seg = torch.tensor([[[0, 5, 2], [10, 4, 0]], [[3, 9, -1], [0, 0, 0]]], dtype=torch.int32, device=dev)
    k, v = rk_cuda.gather_kv_rope_cuda(k_pool, k_pool, seg, 20)
    k_ref, v_ref = reference.gather_kv_rope_ref(k_pool, k_pool, seg, 9)
    _close(k[:, :9], k_ref, torch.bfloat16, "covered k rows")
    assert torch.equal(v[:, :9], v_ref)
    assert k[:, 9:].isnan().all() and v[:, 9:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gather_impl_matches_fused_on_gpu(dtype):
    _extension_or_skip()
    _triton_or_skip("sparse_kv_attention")
    q, k_pool, v_pool, seg, total = _attention_case(torch.Generator().manual_seed(24), dtype, "cuda")
    fused = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="fused")
    gather = rk.sparse_kv_attention(q, k_pool, v_pool, seg, impl="gather", total=total)
    want = rk.sparse_kv_attention(q, k_pool, v_pool, seg, backend="reference", impl="fused")
    _close(gather, want, dtype, "gather vs reference")
    _close(fused, want, dtype, "fused vs reference")


@pytest.mark.gpu
def test_cuda_graph_replays_a_relax_chunk_step(monkeypatch):
    """A whole first pass of a Relax chunk (rope_append, relax_select at layer 0, attention) in one graph."""
    _extension_or_skip()
    _triton_or_skip("sparse_kv_attention")
    dev, layers, b, h, d, hh, ww = torch.device("cuda"), 2, 2, 2, 64, 4, 4
    policy = rk.RelaxMemory()
    u, f = policy.chunk_frames, hh * ww
    gen = torch.Generator(device=dev).manual_seed(25)
    caches = [rk.KVCache(policy, layers, b, h, d, hh, ww, dtype=torch.bfloat16, device=dev, backend="auto")
              for _ in range(2)]
    for op in ("RELAX_SELECT", "ROPE_APPEND"):  # the CUDA kernels (auto would pick Triton)
        monkeypatch.setenv(f"RELAXKV_BACKEND_{op}", "cuda")
    eager, graphed = caches

    def inputs():
        return [tuple(torch.randn(b, u * f, h, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
                for _ in range(layers)]

    for _ in range(4):  # past the warm-up (selection from chunk 2 on); compiles every Triton kernel
        qkv = inputs()
        for cache in caches:
            cache.begin_chunk()
            for layer in range(layers):
                cache.attend(layer, *qkv[layer])
            cache.end_chunk()

    qkv = inputs()
    eager.begin_chunk()
    assert eager.last_plan.relax is not None
    want = [eager.attend(layer, *qkv[layer]) for layer in range(layers)]
    static = [tuple(t.clone() for t in x) for x in qkv]
    graphed.begin_chunk()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [graphed.attend(layer, *static[layer]) for layer in range(layers)]
    graph.replay()
    torch.cuda.synchronize()
    first = [o.clone() for o in outs]
    graph.replay()
    torch.cuda.synchronize()
    for got, again, ref in zip(first, outs, want):
        assert torch.equal(got, again)  # replays are identical
        torch.testing.assert_close(got, ref, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    assert torch.equal(graphed.seg, eager.seg)  # the selection ran inside the graph
    eager.end_chunk()
    graphed.end_chunk()
