"""CUDA ops of csrc/ (relax_select, mid_select, compress_kv, gather_kv_rope) and the gather attention path.

CPU (every session): the extension exposes the launchers, every launcher and wrapper raises a clear
RuntimeError without a GPU, dispatch finds ``relaxkv_kernels.cuda.<op>_cuda``, gather_kv_rope's
reference against a literal slice + cat + delta RoPE, ``sparse_kv_attention(impl="gather")`` against
``impl="fused"``, the tuning table, bad inputs.

Kernels (``kernel_device``: ``[gpu]`` on a GPU, ``[emulated]`` through tests/cuda_emulator.py on the CPU):
each kernel against its reference and its Triton twin in fp32 / fp16 / bf16 with ragged and long
tables, strided and unaligned inputs, B > 1, ties, NaN scores, out-of-range slots, more work items than
warps or threads, and NaN-poisoned outputs (tests/conftest.py). GPU only (``-m gpu``): a CUDA-graph replay
of a Relax chunk step. ``tests/run_compute_sanitizer.sh`` (GPU) and ``tests/run_emulated_asan.sh`` (CPU)
run the kernel tests under a memory checker.
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
from relaxkv_kernels.cuda import _launch
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


def _cpu_args(op, gen, dev="cpu"):
    """Small valid arguments of ``op`` (int64 index tensors) on ``dev``."""
    r = lambda *s: torch.randn(*s, generator=gen).to(dev)  # noqa: E731
    seg = torch.zeros(2, 6, 3, dtype=torch.int32, device=dev)
    if op == "rope_append":  # 2 frames of 4x4 tokens into slots 3 and 1 of 4
        return r(2, 32, 2, 16), r(2, 32, 2, 16), r(2, 32, 2, 16), r(2, 64, 2, 16), r(2, 64, 2, 16), r(2, 4, 16), \
            torch.tensor([3, 1]), torch.tensor([7, 8]), 4, 4
    if op == "relax_select":
        return (r(2, 8, 16), torch.arange(8), torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5]), seg, 2,
                torch.tensor([20]), 16, 2.0, False, False)
    if op == "mid_select":
        return r(2, 32, 4, 16), r(2, 6, 4, 16), torch.tensor([1, 2, 3]), torch.arange(6), seg, 1, torch.tensor([9]), 100, 8, 2
    if op == "compress_kv":
        return (r(2, 64, 2, 16), r(2, 64, 2, 16), r(2, 40, 2, 16), r(2, 40, 2, 16), r(2, 3, 2, 16), torch.tensor([1]),
                torch.tensor([4]), 8, 2, 4, 8)
    return r(2, 40, 2, 16), r(2, 40, 2, 16), torch.tensor([[[0, 5, 1]], [[3, 5, 0]]], dtype=torch.int32), 5


def _public_op_outputs(op: str, args: list, backend: str, keep: list[int]) -> list[torch.Tensor]:
    """rk.<op>(*args) with the tensors at positions ``keep`` cloned first (the op may write them): its returned
    tensors, then those."""
    call = [a.clone() if i in keep else a for i, a in enumerate(args)]
    out = getattr(rk, op)(*call, backend=backend)
    return (list(out) if isinstance(out, tuple) else [] if out is None else [out]) + [call[i] for i in keep]


def _int32_indices_match_int64(op: str, backend: str, dev: str):
    """The public op with every index tensor int32 gives the int64 result (all backends take both)."""
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in _cpu_args(op, torch.Generator().manual_seed(9))]
    index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dtype == torch.int64]
    keep = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in index]
    results = [_public_op_outputs(op, [a.to(dtype) if i in index else a for i, a in enumerate(args)], backend, keep)
               for dtype in (torch.int64, torch.int32)]
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # proto: fp32 atomics on the GPU


INDEX_OPS = ["rope_append", "relax_select", "mid_select", "compress_kv"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", INDEX_OPS)
def test_int32_indices_match_int64(op, backend):
    if backend == "triton":
        _triton_or_skip(op)
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    _int32_indices_match_int64(op, backend, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("op", INDEX_OPS)
def test_int32_indices_match_int64_cuda(op, kernel_device):
    _int32_indices_match_int64(op, "cuda", kernel_device)


# read-only float inputs of each op (positions in _cpu_args), given to the CUDA wrappers as last-dim strided views
_READ_ONLY = {"rope_append": (0, 1, 2), "mid_select": (0, 1), "compress_kv": (0, 1), "gather_kv_rope": (0, 1)}


@pytest.mark.parametrize("op", list(_READ_ONLY))
def test_last_dim_strided_inputs_cuda(op, kernel_device):
    """Inputs that the public ops accept with any strides (the kernels read rows of unit stride: the wrappers copy
    such inputs) give the reference result; written tensors still need unit rows (test_build, bad inputs)."""
    args = [a.to(kernel_device) if isinstance(a, torch.Tensor) else a
            for a in _cpu_args(op, torch.Generator().manual_seed(10))]
    for i in _READ_ONLY[op]:
        wide = torch.randn(*args[i].shape[:-1], 2 * args[i].shape[-1], device=kernel_device)
        wide[..., ::2] = args[i]
        args[i] = wide[..., ::2]
        assert args[i].stride(-1) == 2
    keep = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in _READ_ONLY[op]]
    results = [_public_op_outputs(op, args, backend, keep) for backend in ("reference", "cuda")]
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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


# ------------------------------------------------------------------------------ kernel edge cases
# Boundaries of the csrc/ kernels the tests above do not reach: empty score terms, ties and NaN in the
# top-k, more candidates / mid blocks than warps and threads, several qsum splits, odd H/2, segment
# tables wider than one warp scan step, head_dim at the ends of the range and with the temporal pairs
# ending inside a vector, non-contiguous index and table views, and the out-of-range slots the wrappers
# define. Tiny shapes: every case runs in a fraction of a second under the emulation too.


def _spaced(t: torch.Tensor) -> torch.Tensor:
    """t [n] as a view with stride 2 over poison: a kernel ignoring the index stride reads -2^30."""
    out = torch.full((t.numel(), 2), -(2**30), dtype=t.dtype, device=t.device)
    out[:, 0] = t
    return out[:, 0]


def _seg_table(base: torch.Tensor, layout: str) -> torch.Tensor:
    """The [B, n_seg, 3] table stored in ``base`` ([B, n_seg, 3], or [B, 3, 2 n_seg + 1] for "view":
    field stride 2 n_seg + 1, row stride 2, one poisoned column between rows)."""
    return base if layout == "contiguous" else base[:, :, 1::2].transpose(1, 2)


def _seg_base(batch: int, n_seg: int, layout: str, gen: torch.Generator, dev) -> torch.Tensor:
    """Random storage for a ``layout`` table (see :func:`_seg_table`)."""
    shape = (batch, n_seg, 3) if layout == "contiguous" else (batch, 3, 2 * n_seg + 1)
    return torch.randint(-50, 50, shape, dtype=torch.int32, device=dev, generator=gen)


def _scores_close(got: torch.Tensor, want: torch.Tensor, what: str):
    """Same NaN entries; the finite ones within 1e-5 of the largest |score| (mid_select's fp32 sums)."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN entries {got} vs {want}"
    fin = ~want.isnan()
    scale = want[fin].abs().max().clamp_min(1e-30) if fin.any() else 1.0
    torch.testing.assert_close(got[fin] / scale, want[fin] / scale, rtol=0, atol=1e-5, msg=what)


# relax_select: defaults batch 3, 12 slots (sink 0, 1; tail 11), candidates 3 5 6 8 9, H_sel 2, D 64
_RELAX_EDGES = {
    "no_sink": dict(n_sink=0),
    "no_tail-contiguous_rope": dict(n_tail=0, contiguous=True),
    "no_sink_no_tail": dict(n_sink=0, n_tail=0, n_sel=3),  # every score 0: the first H_sel candidates
    "all_picked": dict(n_sel=5),
    "ties": dict(special="ties"),  # candidates 1, 3, 4 identical and best: H_sel 2 takes 1 and 3
    "nan_candidate": dict(special="nan_cand"),  # NaN ranks above every number
    "nan_tail": dict(special="nan_tail"),  # every score NaN: the first H_sel candidates
    "many_candidates-d200": dict(n_slots=160, n_cand=150, n_sel=70, head_dim=200, batch=2, lam=0.5),
    "views-batch0_decides": dict(views=True, batch0=True),  # strided proto, index tensors and seg
}


@pytest.mark.parametrize("case", list(_RELAX_EDGES), ids=list(_RELAX_EDGES))
def test_relax_select_cuda_edge_cases(kernel_device, case):
    cfg = dict(batch=3, n_slots=12, head_dim=64, n_sink=2, n_tail=1, n_cand=5, n_sel=2, lam=2.0,
               batch0=False, contiguous=False, views=False, special=None) | _RELAX_EDGES[case]
    dev, b, n_slots, d = kernel_device, cfg["batch"], cfg["n_slots"], cfg["head_dim"]
    gen = torch.Generator(device=dev).manual_seed(40)
    if cfg["views"]:  # a layer of [L, B, S, 2D], every other dim: p_sd = 2, p_ss = 2D
        proto = torch.randn(2, b, n_slots, 2 * d, device=dev, generator=gen)[1, :, :, 1::2]
    else:
        proto = torch.randn(b, n_slots, d, device=dev, generator=gen)
    sink = torch.arange(cfg["n_sink"], device=dev)
    tail = torch.arange(n_slots - cfg["n_tail"], n_slots, device=dev)
    if cfg["n_cand"] == 5:
        cand = torch.tensor([3, 5, 6, 8, 9], device=dev)
    else:  # a sorted random subset of the middle slots
        middle = torch.arange(2, n_slots - 1, device=dev)
        cand = middle[torch.randperm(middle.numel(), generator=gen, device=dev)[:cfg["n_cand"]]].sort().values
    if cfg["special"] == "ties":  # the best possible direction p_sink - lam p_tail, three times
        unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        best = unit(proto[:, sink].mean(1)) - cfg["lam"] * unit(proto[:, tail].mean(1))
        for c in (1, 3, 4):
            proto[:, cand[c]] = best
    elif cfg["special"] == "nan_cand":
        proto[:, cand[2], 5] = float("nan")
    elif cfg["special"] == "nan_tail":
        proto[:, tail[0], 0] = float("nan")
    slot_pos = torch.randperm(n_slots + 30, generator=gen, device=dev)[:n_slots]
    n_sel = cfg["n_sel"]
    target = torch.arange(20, 20 + n_sel, device=dev)
    seg_index = 3
    n_seg = seg_index + n_sel + (0 if cfg["views"] else 2)  # views: the rows end at the table's end
    layout = "view" if cfg["views"] else "contiguous"
    base0 = _seg_base(b, n_seg, layout, gen, dev)
    _seg_table(base0, layout)[:, seg_index:seg_index + n_sel] = -(2**30)  # the rows the kernel must write
    if cfg["views"]:
        slot_pos, sink, tail, cand, target = map(_spaced, (slot_pos, sink, tail, cand, target))
    base_cuda, base_ref = base0.clone(), base0.clone()
    proto0 = proto.clone()
    args = (proto, slot_pos, sink, tail, cand)
    tail_args = (seg_index, target, 16, cfg["lam"], cfg["batch0"], cfg["contiguous"])
    scores = rk_cuda.relax_select_cuda(*args, _seg_table(base_cuda, layout), *tail_args)
    want = reference.relax_select_ref(*args, _seg_table(base_ref, layout), *tail_args)
    assert scores.shape == (b, cand.numel())
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(base_cuda, base_ref)  # written rows, untouched rows and the gaps of the view
    assert torch.equal(proto.nan_to_num(), proto0.nan_to_num())
    rows = _seg_table(base_cuda, layout)[:, seg_index:seg_index + n_sel]
    picked = {  # the rule the case is about, spelled out (candidate indices of the H_sel rows)
        "no_sink_no_tail": [0, 1, 2], "ties": [1, 3], "nan_tail": [0, 1], "all_picked": [0, 1, 2, 3, 4],
    }.get(case)
    if picked is not None:
        assert torch.equal(rows[..., 0], (cand[picked] * 16).int().expand(b, -1))
    if case == "nan_candidate":
        assert bool((rows[..., 0] == int(cand[2]) * 16).any(-1).all())
    if case == "no_sink_no_tail":
        assert torch.equal(scores, torch.zeros_like(scores))


# mid_select: defaults batch 2, H 4, D 64, fp32 contiguous, 12 archive slots, M 7 mid blocks, k 3
_MID_EDGES = {
    "many_blocks-odd_half_heads": dict(heads=6, n_blocks=24, n_mid=20, n_sel=5),  # M > 8 warps, H/2 = 3
    "32_splits-odd_heads-fp16": dict(batch=1, heads=5, head_dim=16, n_q=6145, q_stride=3, dtype=torch.float16),
    "ties": dict(n_sel=2, special="ties"),  # mid blocks 1, 3, 4 identical and best: k 2 takes 1 and 3
    "nan_block": dict(special="nan"),
    "300_blocks-views-bf16": dict(batch=3, heads=2, head_dim=8, n_blocks=310, n_mid=300, n_sel=100, views=True,
                                  dtype=torch.bfloat16),  # M and B * k > 256 threads
    "d512-scalar-bf16": dict(heads=2, head_dim=512, n_q=10, q_stride=4, layout="unaligned", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(_MID_EDGES), ids=list(_MID_EDGES))
def test_mid_select_cuda_edge_cases(kernel_device, case):
    cfg = dict(batch=2, heads=4, head_dim=64, n_q=50, q_stride=2, n_blocks=12, n_mid=7, n_sel=3, views=False,
               layout="contiguous", dtype=torch.float32, special=None) | _MID_EDGES[case]
    dev, b, h, d, n_q, stride = kernel_device, cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["n_q"], cfg["q_stride"]
    gen = torch.Generator(device=dev).manual_seed(41)
    q = torch.randn(b, n_q, h, d, device=dev, generator=gen)
    n_sub = -(-n_q // stride)
    if case == "32_splits-odd_heads-fp16":
        ext = _launch.require_device("mid_select_cuda")  # the extension the wrapper calls (real or emulated)
        assert ext.mid_select_splits(n_sub) == 32 and n_sub % 32  # the cap, a short last split
    sampled = torch.zeros(n_q, dtype=torch.bool, device=dev)
    sampled[::stride] = True
    q[:, ~sampled] = float("nan")  # tokens outside the subsample, and heads >= H/2, are never read
    q[:, :, h // 2:] = float("nan")
    q = _strided(q.to(cfg["dtype"]), cfg["layout"])
    n_blocks, n_mid, n_sel = cfg["n_blocks"], cfg["n_mid"], cfg["n_sel"]
    if cfg["views"]:  # [B, H, n_blocks, 2D] storage: k_sn = 2D, k_sh = n_blocks * 2D, k_sd = 2
        mean_key = torch.randn(b, h, n_blocks, 2 * d, device=dev, generator=gen).transpose(1, 2)[..., ::2]
    else:
        mean_key = torch.randn(b, n_blocks, h, d, device=dev, generator=gen)
    mean_key[:, :, h // 2:] = float("nan")
    mid_slots = torch.randperm(n_blocks, generator=gen, device=dev)[:n_mid]
    if cfg["special"] == "ties":  # 10 x the subsampled query mean: far above any random block's score
        qbar = q[:, ::stride, : h // 2].float().mean(1)
        for m in (1, 3, 4):
            mean_key[:, mid_slots[m], : h // 2] = 10 * qbar
    elif cfg["special"] == "nan":
        mean_key[1, mid_slots[5], 0, 3] = float("nan")
    block_pos = torch.randperm(4 * n_blocks, generator=gen, device=dev)[:n_blocks]
    target = torch.arange(n_sel, device=dev) * 4 + 100
    row0, nc, seg_index = 11, 5, 2
    n_seg = seg_index + n_sel + (0 if cfg["views"] else 3)
    layout = "view" if cfg["views"] else "contiguous"
    base0 = _seg_base(b, n_seg, layout, gen, dev)
    _seg_table(base0, layout)[:, seg_index:seg_index + n_sel] = -(2**30)
    if cfg["views"]:
        mid_slots, block_pos, target = map(_spaced, (mid_slots, block_pos, target))
    base_cuda, base_ref = base0.clone(), base0.clone()
    q0, mk0 = q.clone(), mean_key.clone()
    args = (q, mean_key, mid_slots, block_pos)
    tail_args = (seg_index, target, row0, nc, stride)
    scores = rk_cuda.mid_select_cuda(*args, _seg_table(base_cuda, layout), *tail_args)
    want = reference.mid_select_ref(*args, _seg_table(base_ref, layout), *tail_args)
    assert scores.shape == (n_mid,)
    _scores_close(scores, want, case)
    assert torch.equal(base_cuda, base_ref)
    assert torch.equal(q.nan_to_num(), q0.nan_to_num()) and torch.equal(mean_key.nan_to_num(), mk0.nan_to_num())
    rows = _seg_table(base_cuda, layout)[:, seg_index:seg_index + n_sel]
    if case == "ties":
        assert torch.equal(rows[..., 0], (row0 + mid_slots[[1, 3]] * nc).int().expand(b, -1))
    if case == "nan_block":
        assert bool((rows[..., 0] == row0 + int(mid_slots[5]) * nc).any(-1).all())


def test_mid_select_cuda_out_of_range_slot_scores_zero_and_gets_an_empty_segment(kernel_device):
    """Wrapper contract, which the reference does not cover: a slot outside [0, n_blocks) scores exactly 0 and,
    when selected, gets the empty segment (row0, 0, 0); the valid blocks score and rank as in the reference."""
    dev, b, h, d, n_blocks, row0, nc = kernel_device, 2, 4, 32, 6, 3, 7
    gen = torch.Generator(device=dev).manual_seed(42)
    q = torch.randn(b, 20, h, d, device=dev, generator=gen)
    mean_key = torch.randn(b, n_blocks, h, d, device=dev, generator=gen)
    mid_slots = torch.tensor([4, n_blocks, 0, -1, 2], device=dev)  # two invalid of five, k = 4: one is picked
    block_pos = torch.arange(n_blocks, device=dev) * 4
    target = torch.tensor([30, 34, 38, 42], device=dev)
    seg = torch.full((b, 5, 3), -(2**30), dtype=torch.int32, device=dev)
    scores = rk_cuda.mid_select_cuda(q, mean_key, mid_slots, block_pos, seg, 1, target, row0, nc, 3)
    valid = (mid_slots >= 0) & (mid_slots < n_blocks)
    padded = torch.cat([mean_key, torch.zeros_like(mean_key[:, :1])], 1)  # invalid -> a zero mean key
    remapped = torch.where(valid, mid_slots, n_blocks)
    seg_ref = torch.zeros_like(seg)
    want = reference.mid_select_ref(q, padded, remapped, torch.cat([block_pos, block_pos[:1]]), seg_ref, 1, target,
                                    row0, nc, 3)
    assert torch.equal(scores[~valid], torch.zeros(2, device=dev))
    _scores_close(scores, want, "scores")
    pick = reference.relax.top_in_order(want[None], 4)[0]
    assert not bool(valid[pick].all())
    expect = seg_ref[:, 1:5].clone()
    expect[:, ~valid[pick]] = torch.tensor([row0, 0, 0], dtype=torch.int32, device=dev)
    assert torch.equal(seg[:, 1:5], expect)
    assert bool((seg[:, 0] == -(2**30)).all())


def test_mid_select_cuda_rejects_q_stride_beyond_the_queries(kernel_device):
    dev = kernel_device
    q, mean_key = torch.randn(1, 5, 2, 8, device=dev), torch.randn(1, 3, 2, 8, device=dev)
    seg = torch.zeros(1, 2, 3, dtype=torch.int32, device=dev)
    idx = torch.arange(3, device=dev)
    with pytest.raises(ValueError, match="q_stride: expected 1 .. 5, got 6"):
        rk_cuda.mid_select_cuda(q, mean_key, idx, idx, seg, 0, idx[:1], 0, 4, 6)


_COMPRESS_CASES = [  # layout, batch, frames, height, width, heads, head_dim, slot, t0
    ("contiguous", 2, 4, 8, 8, 2, 128, 2, 13),
    ("strided", 2, 5, 9, 10, 3, 128, 2, 13),  # odd grid: floors 2x2x2; strided mean_key
    ("unaligned", 2, 2, 4, 12, 1, 64, 2, 13),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", _COMPRESS_CASES, ids=["contiguous-4x8x8", "strided-odd_grid", "unaligned-d64"])
def test_compress_kv_cuda_matches_reference(kernel_device, dtype, case):
    _check_compress_kv_cuda(kernel_device, dtype, *case, triton_twin=True)


@pytest.mark.parametrize("dtype,case", [
    (torch.float32, ("contiguous", 3, 3, 7, 5, 2, 128, 0, 0)),  # one compressed token (floors 1x1x1), first slot
    (torch.float16, ("unaligned", 2, 2, 4, 9, 5, 128, 3, 41)),  # scalar path: 4 head lanes for 5 heads; last slot
    (torch.float32, ("contiguous", 2, 2, 5, 4, 9, 128, 1, 6)),  # vector path: 8 head lanes for 9 heads
    (torch.bfloat16, ("strided", 2, 4, 4, 9, 33, 64, 2, 97)),  # 32 head lanes for 33 heads; strided mean_key
], ids=["single_token-fp32", "head_loop-scalar-fp16", "head_loop-vector-fp32", "head_loop-strided_mean_key-bf16"])
def test_compress_kv_cuda_edge_cases(kernel_device, dtype, case):
    _check_compress_kv_cuda(kernel_device, dtype, *case, triton_twin=False)


def _check_compress_kv_cuda(dev, dtype, layout, batch, frames, height, width, heads, head_dim, slot, t0,
                            triton_twin: bool):
    """The CUDA kernel against the reference (and its Triton twin): written rows, mean key, untouched memory."""
    n_blocks, row0 = 4, 5
    gen = torch.Generator(device=dev).manual_seed(43)
    n = frames * height * width
    k = _strided(torch.randn(batch, n, heads, head_dim, device=dev, generator=gen).to(dtype), layout)
    v = _strided(torch.randn(batch, n, heads, head_dim, device=dev, generator=gen).to(dtype), layout)
    nc = (frames // 2) * (height // 4) * (width // 4)
    n_rows = row0 + n_blocks * nc + 2
    k_pool = torch.randn(batch, n_rows, heads, head_dim, device=dev, generator=gen).to(dtype)
    v_pool = torch.randn_like(k_pool)
    # mean_key lives in a [B, H, n_blocks, 2D] buffer for the strided case: m_sn = 2D, m_sh = n_blocks * 2D, m_sd = 2
    if layout == "strided":
        mk_base = torch.randn(batch, heads, n_blocks, 2 * head_dim, device=dev, generator=gen)
        as_mean_key = lambda t: t.transpose(1, 2)[..., 1::2]  # noqa: E731
    else:
        mk_base = torch.randn(batch, n_blocks, heads, head_dim, device=dev, generator=gen)
        as_mean_key = lambda t: t  # noqa: E731
    rows = torch.arange(row0 + slot * nc, row0 + (slot + 1) * nc, device=dev)
    k_pool[:, rows] = float("nan")
    v_pool[:, rows] = float("nan")
    as_mean_key(mk_base)[:, slot] = float("nan")
    k0, v0 = k.clone(), v.clone()
    index_dtype = torch.int32 if dtype == torch.float16 else torch.int64
    one = lambda x: torch.tensor([x], device=dev, dtype=index_dtype)  # noqa: E731
    got = [t.clone() for t in (k_pool, v_pool, mk_base)]
    rk_cuda.compress_kv_cuda(k, v, got[0], got[1], as_mean_key(got[2]), one(slot), one(t0), row0, frames, height, width)
    ref = [t.clone() for t in (k_pool, v_pool, mk_base)]
    reference.compress_kv_into_ref(k, v, ref[0], ref[1], as_mean_key(ref[2]), one(slot), one(t0), row0, frames, height,
                                   width)
    _close(got[0][:, rows], ref[0][:, rows], dtype, "k_pool")
    _close(got[1][:, rows], ref[1][:, rows], dtype, "v_pool")
    torch.testing.assert_close(as_mean_key(got[2])[:, slot], as_mean_key(ref[2])[:, slot], rtol=1e-5, atol=1e-5)
    keep = torch.ones(n_rows, dtype=torch.bool, device=dev)
    keep[rows] = False
    assert torch.equal(got[0][:, keep], k_pool[:, keep]) and torch.equal(got[1][:, keep], v_pool[:, keep])
    written = torch.zeros_like(mk_base, dtype=torch.bool)
    as_mean_key(written)[:, slot] = True
    assert torch.equal(got[2][~written], mk_base[~written])  # other slots and the gaps of the strided buffer
    assert torch.equal(k, k0) and torch.equal(v, v0)
    twin = _triton_twin("compress_kv", dev, dtype) if triton_twin else None
    if twin is not None:
        tri = [t.clone() for t in (k_pool, v_pool, mk_base)]
        twin(k, v, tri[0], tri[1], as_mean_key(tri[2]), one(slot), one(t0), row0, frames, height, width)
        _close(got[0], tri[0], dtype, "k_pool vs triton")
        _close(got[1], tri[1], dtype, "v_pool vs triton")
        torch.testing.assert_close(got[2], tri[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slot", [4, -1, 3], ids=["slot_n_blocks", "slot_negative", "slot_past_pool_rows"])
def test_compress_kv_cuda_out_of_range_slot_writes_nothing(kernel_device, slot):
    """Wrapper contract: a slot outside [0, n_blocks), or whose Nc rows would not fit in the pool, writes nothing."""
    dev, b, h, d, n_blocks, row0 = kernel_device, 2, 2, 32, 4, 3
    gen = torch.Generator(device=dev).manual_seed(44)
    k = torch.randn(b, 2 * 4 * 8, h, d, device=dev, generator=gen)  # Nc = 2
    k_pool = torch.randn(b, row0 + 3 * 2 + 1, h, d, device=dev, generator=gen)  # room for slots 0 .. 2 only
    pools = [k_pool, torch.randn_like(k_pool), torch.randn(b, n_blocks, h, d, device=dev, generator=gen)]
    got = [t.clone() for t in pools]
    one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    rk_cuda.compress_kv_cuda(k, k, *got, one(slot), one(8), row0, 2, 4, 8)
    for name, g, p in zip(("k_pool", "v_pool", "mean_key"), got, pools):
        assert torch.equal(g, p), name


def _gather_check(k_pool, v_pool, seg, total, dtype):
    """gather_kv_rope_cuda against the reference (fp64 K math), inputs unchanged; returns (k, v)."""
    k_pool0, v_pool0, seg0 = k_pool.clone(), v_pool.clone(), seg.clone()
    k, v = rk_cuda.gather_kv_rope_cuda(k_pool, v_pool, seg, total)
    k_ref, v_ref = reference.gather_kv_rope_ref(k_pool.double(), v_pool, seg, total)
    assert k.shape == v.shape == (k_pool.shape[0], total, *k_pool.shape[2:]) and k.is_contiguous() and v.is_contiguous()
    _close(k, k_ref, dtype, "k")
    assert torch.equal(v, v_ref)
    assert torch.equal(k_pool, k_pool0) and torch.equal(v_pool, v_pool0) and torch.equal(seg, seg0)
    return k, v


def _long_table(batch: int, n_seg: int, n_rows: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """n_seg (> 32) segments of 0 .. 3 rows, empty around the 32-wide scan steps, the same total for every
    batch element (permuted lengths), random starts and deltas of both signs."""
    lens = torch.randint(0, 4, (n_seg,), generator=gen)
    lens[[s for s in (31, 32, 63, 64) if s < n_seg]] = 0
    lens[[s for s in (30, 33, 65) if s < n_seg]] = 2
    table = torch.zeros(batch, n_seg, 3, dtype=torch.int32)
    for b in range(batch):
        lb = lens if b == 0 else lens[torch.randperm(n_seg, generator=gen)]
        table[b, :, 1] = lb.int()
        table[b, :, 0] = (torch.rand(n_seg, generator=gen) * (n_rows - lb + 1)).int()
        table[b, :, 2] = torch.randint(-40, 40, (n_seg,), generator=gen).int()
    return table, int(lens.sum())


@pytest.mark.parametrize("dtype,layout,batch,heads,head_dim,n_seg", [
    (torch.float16, "contiguous", 2, 2, 32, 70),  # 3 scan steps; VEC 8: temporal pairs (6) end inside a vector
    (torch.float32, "strided", 2, 3, 40, 40),  # 2 scan steps; VEC 4 on a pair-split boundary (8 temporal pairs)
    (torch.bfloat16, "contiguous", 1, 1, 512, 36),  # max head_dim: 86 temporal pairs end inside vector 21
    (torch.float32, "unaligned", 3, 2, 10, 34),  # scalar path, 3 temporal pairs
    (torch.float16, "unaligned", 2, 1, 2, 33),  # D = 2: the single pair is temporal
], ids=["70seg-fp16-d32", "40seg-strided-fp32-d40", "36seg-bf16-d512", "34seg-scalar-fp32-d10", "33seg-fp16-d2"])
def test_gather_kv_rope_cuda_long_tables(kernel_device, dtype, layout, batch, heads, head_dim, n_seg):
    dev, n_rows = kernel_device, 60
    gen = torch.Generator().manual_seed(45)
    k_pool = _strided(torch.randn(batch, n_rows, heads, head_dim, generator=gen).to(dev, dtype), layout)
    v_pool = _strided(torch.randn(batch, n_rows, heads, head_dim, generator=gen).to(dev, dtype), layout)
    table, total = _long_table(batch, n_seg, n_rows, gen)
    assert total > 2 * 16  # several blocks of kGatherRows rows
    seg = _seg_table(_seg_base(batch, n_seg, "view", gen, "cpu").to(dev), "view")  # s_ss = 2, s_sf = 2 n_seg + 1
    seg.copy_(table)
    _gather_check(k_pool, v_pool, seg, total, dtype)


@pytest.mark.parametrize("total", [16, 32, 5], ids=["one_full_block", "two_full_blocks", "partial_block"])
def test_gather_kv_rope_cuda_block_boundaries(kernel_device, total):
    dev = kernel_device
    gen = torch.Generator().manual_seed(46)
    k_pool = torch.randn(2, 40, 2, 64, generator=gen).to(dev, torch.bfloat16)
    v_pool = torch.randn(2, 40, 2, 64, generator=gen).to(dev, torch.bfloat16)
    a = total // 3
    seg = torch.tensor([[[30, a, -7], [0, 0, 3], [2, total - a, 0]],
                        [[39, 1, 25], [5, total - 1, -30], [0, 0, 0]]], dtype=torch.int32, device=dev)
    _gather_check(k_pool, v_pool, seg, total, torch.bfloat16)


def test_gather_kv_rope_cuda_rows_outside_the_pool_are_nan(kernel_device):
    """Kernel contract (csrc/gather_kv_rope.cuh): a source row outside the pool (negative start, start + length
    past n_rows) gives a NaN output row and is not read; a negative length counts as 0."""
    dev, n_rows = kernel_device, 20
    gen = torch.Generator().manual_seed(47)
    k_pool = torch.randn(2, n_rows, 2, 16, generator=gen).to(dev)
    v_pool = torch.randn(2, n_rows, 2, 16, generator=gen).to(dev)
    seg = torch.tensor([[[-3, 5, 4], [7, -2, 1], [18, 4, -5]],  # rows -3 .. 1, nothing, 18 .. 21
                        [[4, 3, 0], [16, 6, 2], [0, 0, 0]]], dtype=torch.int32, device=dev)
    k, v = rk_cuda.gather_kv_rope_cuda(k_pool, v_pool, seg, 9)
    nan_rows = [[0, 1, 2, 7, 8], [7, 8]]
    clipped = torch.tensor([[[0, 2, 4], [18, 2, -5]], [[4, 3, 0], [16, 4, 2]]], dtype=torch.int32, device=dev)
    for b, bad in enumerate(nan_rows):
        good = [r for r in range(9) if r not in bad]
        assert k[b, bad].isnan().all() and v[b, bad].isnan().all()
        kb, vb = reference.gather_kv_rope_ref(k_pool[b:b + 1].double(), v_pool[b:b + 1], clipped[b:b + 1],
                                              len(good))
        _close(k[b, good], kb[0], torch.float32, f"k[{b}]")
        assert torch.equal(v[b, good], vb[0])


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


# ---------------------------------------------------------------------------------------------
# Wan2.1-1.3B geometry (F = 30 x 52 = 1560 tokens, H = 12, D = 128), bf16: the real grid sizes, tiles that
# do not divide F, 13 mid_select splits (780 subsampled queries), 2x4x4 pooling with a remainder row.

WAN_F, WAN_H, WAN_D, WAN_HW = 1560, 12, 128, (30, 52)


def test_gather_kv_rope_cuda_at_wan_shapes(kernel_device):
    """Frames of 1560 rows and compressed blocks of 182 (neither a multiple of the 16-row tile), hybrid deltas:
    2 sink frames, 4 of 12 archived blocks, 3 current frames."""
    dev, f, nc = kernel_device, WAN_F, 182
    gen = torch.Generator().manual_seed(50)
    n_rows = 5 * f + 12 * nc
    k_pool = torch.randn(1, n_rows, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
    v_pool = torch.randn(1, n_rows, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
    mids = sorted(torch.randperm(12, generator=gen)[:4].tolist())
    seg = torch.tensor([[[0, 2 * f, 296]] + [[5 * f + m * nc, nc, 40 - 4 * j] for j, m in enumerate(mids)]
                        + [[2 * f, 3 * f, 0]]], dtype=torch.int32, device=dev)
    total = 5 * f + 4 * nc
    k, v = rk_cuda.gather_kv_rope_cuda(k_pool, v_pool, seg, total)
    k_ref, v_ref = reference.gather_kv_rope_ref(k_pool.float(), v_pool, seg, total)
    _close(k, k_ref, torch.bfloat16, "k")
    assert torch.equal(v, v_ref)


def test_compress_kv_cuda_at_wan_shapes(kernel_device):
    dev, (h, w), frames, n_blocks, row0, slot, t0 = kernel_device, WAN_HW, 4, 6, 3 * WAN_F, 4, 36
    gen = torch.Generator().manual_seed(51)
    nc = (frames // 2) * (h // 4) * (w // 4)  # 182
    k = torch.randn(2, frames * WAN_F, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
    v = torch.randn(2, frames * WAN_F, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
    pools = [torch.randn(2, row0 + n_blocks * nc, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
             for _ in range(2)] + [torch.randn(2, n_blocks, WAN_H, WAN_D, generator=gen).to(dev)]
    rows = slice(row0 + slot * nc, row0 + (slot + 1) * nc)
    for t in pools[:2]:
        t[:, rows] = float("nan")
    pools[2][:, slot] = float("nan")
    got, ref = [t.clone() for t in pools], [t.clone() for t in pools]
    one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    rk_cuda.compress_kv_cuda(k, v, *got, one(slot), one(t0), row0, frames, h, w)
    reference.compress_kv_into_ref(k, v, *ref, one(slot), one(t0), row0, frames, h, w)
    _close(got[0], ref[0], torch.bfloat16, "k_pool")
    _close(got[1], ref[1], torch.bfloat16, "v_pool")
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_mid_select_cuda_at_wan_shapes(kernel_device):
    """6240 queries subsampled every 8 (780: 13 splits), 6 half-heads, top 16 of 40 archived blocks."""
    dev, n_slots, nc = kernel_device, 66, 182
    gen = torch.Generator().manual_seed(52)
    q = torch.randn(2, 4 * WAN_F, WAN_H, WAN_D, generator=gen).to(dev, torch.bfloat16)
    mean_key = torch.randn(2, n_slots, WAN_H, WAN_D, generator=gen).to(dev)
    mid_slots = torch.randperm(n_slots, generator=gen)[:40].sort().values.to(dev)
    block_pos = (torch.arange(n_slots) * 4 + 8).to(dev)
    target = (torch.arange(16) * 4 + 8).to(dev)
    seg0 = torch.full((2, 20, 3), -(2**30), dtype=torch.int32, device=dev)
    seg_cuda, seg_ref = seg0.clone(), seg0.clone()
    args = (q, mean_key, mid_slots, block_pos)
    scores = rk_cuda.mid_select_cuda(*args, seg_cuda, 2, target, 16 * WAN_F, nc, 8)
    want = reference.mid_select_ref(*args, seg_ref, 2, target, 16 * WAN_F, nc, 8)
    scale = want.abs().max().item()
    torch.testing.assert_close(scores / scale, want / scale, rtol=0, atol=1e-5)
    assert torch.equal(seg_cuda, seg_ref)
