"""Op registration (opcheck, fake tensors, torch.compile) and argument validation of the public ops."""
import pytest
import torch

import relaxkv_kernels as rk


B, H, D, HH, WW = 2, 2, 16, 4, 4  # frame of 16 tokens
F = HH * WW


def _rand(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _append_args(gen, u=2, n_slots=5):
    q, k, v = (_rand(B, u * F, H, D, gen=gen) for _ in range(3))
    kc, vc = _rand(B, n_slots * F, H, D, gen=gen), _rand(B, n_slots * F, H, D, gen=gen)
    proto = _rand(B, n_slots, D, gen=gen)
    return q, k, v, kc, vc, proto, torch.tensor([3, 1]), torch.tensor([7, 8]), HH, WW


def _attention_args(gen):
    q = _rand(B, 24, H, D, gen=gen)
    kp, vp = _rand(B, 80, H, D, gen=gen), _rand(B, 80, H, D, gen=gen)
    seg = torch.tensor([[[0, 16, 3], [40, 7, -2], [0, 0, 0]], [[16, 1, 0], [60, 20, 5], [33, 3, 1]]], dtype=torch.int32)
    return q, kp, vp, seg


def _relax_args(gen):
    proto = _rand(B, 8, D, gen=gen)
    slot_pos = torch.arange(8) * 3
    seg = torch.zeros(B, 7, 3, dtype=torch.int32)
    return (proto, slot_pos, torch.tensor([0, 1]), torch.tensor([7]), torch.tensor([3, 4, 5, 6]), seg, 2,
            torch.tensor([20]), F, 2.0, False, False)


def _mid_args(gen):
    q = _rand(B, 64, 4, D, gen=gen)
    mean_key = _rand(B, 6, 4, D, gen=gen)
    seg = torch.zeros(B, 10, 3, dtype=torch.int32)
    return q, mean_key, torch.tensor([2, 3, 4, 5, 0]), torch.arange(6) * 4, seg, 3, torch.tensor([30, 34]), 100, 8, 3


def _compress_args(gen):
    k, v = _rand(B, 4 * 64, H, D, gen=gen), _rand(B, 4 * 64, H, D, gen=gen)  # 4 frames of 8x8
    kp, vp = _rand(B, 200, H, D, gen=gen), _rand(B, 200, H, D, gen=gen)
    mean_key = _rand(B, 4, H, D, gen=gen)
    return k, v, kp, vp, mean_key, torch.tensor([2]), torch.tensor([12]), 40, 4, 8, 8


def _gather_args(gen):
    kp, vp = _rand(B, 80, H, D, gen=gen), _rand(B, 80, H, D, gen=gen)
    seg = torch.tensor([[[0, 16, 3], [40, 7, -2], [0, 0, 0]], [[16, 1, 0], [60, 20, 5], [33, 2, 1]]], dtype=torch.int32)
    return kp, vp, seg, 23


OPS = {
    "rope_append": _append_args,
    "sparse_kv_attention": _attention_args,
    "relax_select": _relax_args,
    "mid_select": _mid_args,
    "compress_kv": _compress_args,
    "gather_kv_rope": _gather_args,
}


@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name):
    gen = torch.Generator().manual_seed(0)
    args = OPS[name](gen)
    if name == "sparse_kv_attention":
        args = args + (D**-0.5,)
    torch.library.opcheck(getattr(torch.ops.relaxkv, name).default, args + ("reference",))


@pytest.mark.parametrize("name", list(OPS))
def test_public_wrapper_matches_registered_op(name):
    """The public function validates and forwards to torch.ops.relaxkv.<name> (same result)."""
    gen = torch.Generator().manual_seed(1)
    args = OPS[name](gen)
    clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = getattr(rk, name)(*args)
    extra = (D**-0.5,) if name == "sparse_kv_attention" else ()
    want = getattr(torch.ops.relaxkv, name)(*clone, *extra, "reference")
    if out is not None:
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, c in zip(args, clone):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "policy", [rk.RelaxMemory(), rk.PackMemory(top_k=2, archive=3, q_stride=4)], ids=["relax", "pack"]
)
def test_compiled_chunk_step_matches_eager(policy):
    """torch.compile(fullgraph=True) of a whole chunk step (all layers, selection included)."""
    layers, u = 2, policy.chunk_frames
    gen = torch.Generator().manual_seed(2)
    eager = rk.KVCache(policy, layers, B, H, D, HH, WW, dtype=torch.float32, backend="reference")
    compiled = rk.KVCache(policy, layers, B, H, D, HH, WW, dtype=torch.float32, backend="reference")

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    torch._dynamo.reset()  # warm-up chunks change table shapes (one compile each); count from zero per case
    step_c = torch.compile(step, fullgraph=True, backend="eager")
    for _ in range(7):
        qkv = [tuple(_rand(B, u * F, H, D, gen=gen) for _ in range(3)) for _ in range(layers)]
        eager.begin_chunk()
        compiled.begin_chunk()
        want = step(eager, qkv)
        got = step_c(compiled, qkv)
        eager.end_chunk()
        compiled.end_chunk()
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(3)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _attention_args(gen)]
        out = torch.ops.relaxkv.sparse_kv_attention(*args, 0.25, "reference")
        assert out.shape == (B, 24, H, D)
        relax = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _relax_args(gen)]
        assert torch.ops.relaxkv.relax_select(*relax, "reference").shape == (B, 4)


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("sparse_kv_attention", cpu) == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("sparse_kv_attention", cpu, "fastest")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("relax_select", cpu, "cuda")


# ------------------------------------------------------------------------------------------ bad input


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD = [
    # (op, argument index, replacement, error type, message fragment)
    ("rope_append", 0, torch.randn(B, 2 * F, H), ValueError, "q: expected rank 4"),
    ("rope_append", 0, torch.randn(B, 2 * F, H, 15), ValueError, "head_dim must be a positive even"),
    ("rope_append", 1, torch.randn(B, 2 * F, H, D).half(), TypeError, "k: expected dtype"),
    ("rope_append", 0, torch.randn(B, 2 * F + 3, H, D), ValueError, "whole number of frames"),
    ("rope_append", 3, torch.randn(B, 5 * F, H, D).half(), TypeError, "k_cache: expected dtype"),
    ("rope_append", 5, torch.randn(B, 5, D).double(), TypeError, "proto: expected dtype"),
    ("rope_append", 6, torch.tensor([3, 5]), ValueError, "frame_slot: expected values in \\[0, 4\\]"),
    ("rope_append", 6, torch.tensor([3.0, 1.0]), TypeError, "frame_slot: expected dtype"),
    ("rope_append", 7, torch.tensor([7, 8, 9]), ValueError, "frame_pos: expected shape"),
    ("rope_append", 8, 0, ValueError, "height"),
    ("sparse_kv_attention", 3, torch.tensor([[[0, 16, 0]], [[70, 20, 0]]], dtype=torch.int32), ValueError, "rows inside the pool"),
    ("sparse_kv_attention", 3, torch.tensor([[[0, -1, 0]], [[0, 2, 0]]], dtype=torch.int32), ValueError, "lengths >= 0"),
    ("sparse_kv_attention", 3, torch.tensor([[[0, 0, 0]], [[0, 2, 0]]], dtype=torch.int32), ValueError, "empty table"),
    ("sparse_kv_attention", 3, torch.zeros(B, 2, 3, dtype=torch.int64), TypeError, "seg: expected dtype"),
    ("sparse_kv_attention", 3, torch.zeros(B, 2, 2, dtype=torch.int32), ValueError, "seg: expected shape"),
    ("sparse_kv_attention", 1, torch.randn(B, 80, H + 1, D), ValueError, "k_pool: expected shape"),
    ("relax_select", 9, float("inf"), ValueError, "lam: expected a finite number"),
    ("relax_select", 4, torch.tensor([3, 9]), ValueError, "cand_slots: expected values in \\[0, 7\\]"),
    ("relax_select", 7, torch.tensor([1, 2, 3, 4, 5]), ValueError, "target_pos: expected 1 .. 4"),
    ("relax_select", 6, 7, ValueError, "seg_index"),
    ("mid_select", 2, torch.tensor([2, 7]), ValueError, "mid_slots: expected values in \\[0, 5\\]"),
    ("mid_select", 9, 0, ValueError, "q_stride"),
    ("mid_select", 0, torch.randn(B, 64, 1, D), ValueError, "mean_key: expected shape"),
    ("compress_kv", 5, torch.tensor([4]), ValueError, "block_slot: expected values in \\[0, 3\\]"),
    ("compress_kv", 0, torch.randn(B, 4 * 64 - 1, H, D), ValueError, "k: expected 4\\*8\\*8"),
    ("compress_kv", 8, 1, ValueError, "at least 2x4x4"),
    ("compress_kv", 7, 195, ValueError, "row0"),
]


@pytest.mark.parametrize("op,index,value,exc,match", BAD, ids=[f"{b[0]}-{b[4][:24]}" for b in BAD])
def test_bad_input_raises_before_any_kernel(op, index, value, exc, match):
    args = _replace(OPS[op](torch.Generator().manual_seed(4)), index, value)
    with pytest.raises(exc, match=match):
        getattr(rk, op)(*args)


def test_device_mismatch_is_reported():
    q, kp, vp, seg = _attention_args(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="seg: expected a tensor on cpu, got one on meta"):
        rk.sparse_kv_attention(q, kp, vp, seg.to("meta"))
