"""Which implementation runs: backend tables and their resolution (argument, RELAXKV_BACKEND_<OP>,
RELAXKV_BACKEND), the tuning table of attention engines, the registered ops as a whole (fake kernels,
inference-only backward), and a whole chunk step under torch.compile(fullgraph=True)."""
import importlib
import inspect
import json
import warnings

import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.availability import cuda_extension
from relaxkv_kernels.availability import triton_available
from relaxkv_kernels.ops.compress_kv.op import BACKENDS as COMPRESS_KV_BACKENDS
from relaxkv_kernels.ops.dense_attention import tuning
from relaxkv_kernels.ops.dense_attention.op import resolve_engine
from relaxkv_kernels.ops.dispatch import OpBackends
from relaxkv_kernels.ops.dispatch import environment_backend
from relaxkv_kernels.ops.gather_kv_rope.op import BACKENDS as GATHER_KV_ROPE_BACKENDS
from relaxkv_kernels.ops.mid_select.op import BACKENDS as MID_SELECT_BACKENDS
from relaxkv_kernels.ops.quantize_frames.op import BACKENDS as QUANTIZE_FRAMES_BACKENDS
from relaxkv_kernels.ops.relax_select.op import BACKENDS as RELAX_SELECT_BACKENDS
from relaxkv_kernels.ops.rope_append.op import BACKENDS as ROPE_APPEND_BACKENDS
from relaxkv_kernels.ops.sparse_kv_attention.op import BACKENDS as SPARSE_KV_ATTENTION_BACKENDS

from helpers import gen
from helpers import need_triton
from helpers import randn

TABLES = {  # op -> its backend table (relaxkv_kernels/ops/<op>/op.py)
    "rope_append": ROPE_APPEND_BACKENDS,
    "sparse_kv_attention": SPARSE_KV_ATTENTION_BACKENDS,
    "relax_select": RELAX_SELECT_BACKENDS,
    "mid_select": MID_SELECT_BACKENDS,
    "compress_kv": COMPRESS_KV_BACKENDS,
    "gather_kv_rope": GATHER_KV_ROPE_BACKENDS,
    "quantize_frames": QUANTIZE_FRAMES_BACKENDS,
}
TABLE_OPS = list(TABLES)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _ref(*args):
    return "reference"


@pytest.fixture
def no_backend_env(backend_env):
    """No RELAXKV_BACKEND* variable from the environment the tests run in; returns ``backend_env`` (conftest) to set
    them."""
    for op in TABLE_OPS:
        backend_env(f"RELAXKV_BACKEND_{op.upper()}", None)
    backend_env("RELAXKV_BACKEND", None)
    return backend_env


# ----------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("op", TABLE_OPS)
def test_every_backend_has_the_reference_signature(op):
    """The table's implementations are interchangeable: same parameters, in the same order."""
    table = TABLES[op]
    want = list(inspect.signature(table.reference).parameters)
    impls = [table.cuda] + ([table.triton()] if table.triton is not None and triton_available() else [])
    for fn in filter(None, impls):
        assert list(inspect.signature(fn).parameters) == want, fn.__qualname__


@pytest.mark.parametrize("op", TABLE_OPS)
def test_auto_on_cpu_is_the_reference(op, no_backend_env):
    assert TABLES[op].resolve(CPU) == "reference"
    assert TABLES[op].implementation(CPU) is TABLES[op].reference


@pytest.mark.parametrize("op", [op for op in TABLE_OPS if TABLES[op].cuda is not None])
def test_cuda_backend_finds_the_cuda_kernel(op, no_backend_env, fake_gpu):
    if cuda_extension() is None:
        pytest.skip("relaxkv_kernels._C not built (no nvcc at install time)")
    fake_gpu((9, 0), "NVIDIA H100 80GB HBM3")
    table = TABLES[op]
    assert table.resolve(CUDA, "cuda") == "cuda"
    assert table.implementation(CUDA, "cuda") is table.cuda
    with pytest.raises(RuntimeError, match="backend 'cuda' needs a CUDA kernel for this op and CUDA tensors"):
        table.resolve(CPU, "cuda")  # the real runtime takes CUDA tensors only (the emulated one CPU tensors)


def test_resolution_rules(no_backend_env, fake_gpu):
    """auto on CUDA: the first kernel of the table's ``auto`` order that is available here; explicit names
    that cannot run raise, naming the op."""
    fake_gpu((9, 0), "NVIDIA H100 80GB HBM3")
    both = OpBackends("toy", reference=_ref, triton=lambda: _ref, cuda=_ref, auto=("cuda", "triton"))
    only_ref = OpBackends("toy", reference=_ref)
    first = "cuda" if cuda_extension() is not None else "triton" if triton_available() else "reference"
    assert both.resolve(CUDA) == first
    assert only_ref.resolve(CUDA) == "reference"
    with pytest.raises(ValueError, match="relaxkv.toy: backend: expected one of"):
        both.resolve(CPU, "fastest")
    with pytest.raises(RuntimeError, match="relaxkv.toy: backend 'triton': no Triton kernel"):
        only_ref.resolve(CUDA, "triton")
    with pytest.raises(RuntimeError, match="relaxkv.toy: backend 'cuda' needs a CUDA kernel"):
        only_ref.resolve(CUDA, "cuda")


def test_triton_on_cpu_needs_the_interpreter(no_backend_env, monkeypatch):
    need_triton()
    table = TABLES["relax_select"]
    assert table.resolve(CPU, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs triton and a CUDA tensor"):
        table.resolve(CPU, "triton")


def test_environment_chooses_the_backend_of_auto(no_backend_env):
    """RELAXKV_BACKEND_<OP> beats RELAXKV_BACKEND, which beats auto; an explicit argument beats both."""
    need_triton()
    env = no_backend_env
    env("RELAXKV_BACKEND", "triton")
    assert TABLES["mid_select"].resolve(CPU) == "triton"
    env("RELAXKV_BACKEND_MID_SELECT", "reference")
    assert TABLES["mid_select"].resolve(CPU) == "reference"
    assert TABLES["relax_select"].resolve(CPU) == "triton"
    assert TABLES["relax_select"].resolve(CPU, "reference") == "reference"
    env("RELAXKV_BACKEND_RELAX_SELECT", "fastest")
    with pytest.raises(ValueError, match="relaxkv.relax_select: backend: expected one of .* got 'fastest'"):
        TABLES["relax_select"].resolve(CPU)


def test_the_environment_is_read_once(no_backend_env, monkeypatch):
    """The RELAXKV_BACKEND* variables are read once per op, not at every call; ``cache_clear`` reads them again."""
    table = TABLES["mid_select"]
    assert table.resolve(CPU) == "reference"
    monkeypatch.setenv("RELAXKV_BACKEND_MID_SELECT", "fastest")
    assert table.resolve(CPU) == "reference"
    environment_backend.cache_clear()
    with pytest.raises(ValueError, match="relaxkv.mid_select: backend: expected one of .* got 'fastest'"):
        table.resolve(CPU)


def test_public_op_follows_the_environment(no_backend_env, monkeypatch):
    """The variable reaches the implementation a public op runs (a spy in the Triton slot of the table)."""
    table, calls = TABLES["mid_select"], []

    def spy(*args):
        calls.append(len(args))
        return table.reference(*args)

    monkeypatch.setattr(table, "triton", lambda: spy)
    monkeypatch.setattr("relaxkv_kernels.ops.dispatch.triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = gen(1)
    args = [randn(g, 1, 8, 2, 16), randn(g, 1, 3, 2, 16), torch.tensor([0, 1, 2]), torch.arange(3),
            torch.zeros(1, 2, 3, dtype=torch.int32), 0, torch.tensor([5]), 0, 4, 1]
    rk.mid_select(*args)
    assert calls == []
    no_backend_env("RELAXKV_BACKEND_MID_SELECT", "triton")
    rk.mid_select(*args)
    assert calls == [11]  # the 10 arguments and batch_mean


# ------------------------------------------------------------------------------------------- tuning


@pytest.fixture
def tuning_table(tmp_path, monkeypatch):
    """A private tuning.json (the package's own is left alone)."""
    path = tmp_path / "tuning.json"
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    tuning.load_table.cache_clear()
    yield path
    tuning.load_table.cache_clear()


def test_tuning_keys_and_record(tuning_table):
    assert [tuning.bucket(n) for n in (1, 3, 9, 4680, 6240, 8192, 10920, 27872, 32760)] == [
        1, 3, 10, 5120, 7168, 8192, 12288, 28672, 32768]  # the Wan chunk shapes keep apart (dense, pack)
    key = tuning.tuning_key("cpu", 64, 33, 57)
    assert key == "cpu|d64|q40|k64"
    assert tuning.choose_engine("cpu", 64, 33, 57) == "sdpa"  # no table: torch's SDPA dispatch off CUDA
    tuning.record({key: "reference"})
    assert json.loads(tuning_table.read_text()) == {"version": 3, "entries": {key: "reference"}}
    assert tuning.choose_engine("cpu", 64, 40, 60) == "reference"  # same buckets
    assert tuning.choose_engine("cpu", 64, 65, 60) == "sdpa"
    with pytest.raises(ValueError, match="expected engines in"):
        tuning.record({key: "fastest"})


def test_tuning_table_of_another_version_is_ignored(tuning_table):
    key = tuning.tuning_key("cpu", 64, 33, 57)
    tuning_table.write_text(json.dumps({"version": 2, "entries": {key: "sdpa"}}))  # other buckets
    assert tuning.load_table() == {}
    tuning.record({key: "triton"})  # replaces the old entries, does not merge them
    assert json.loads(tuning_table.read_text())["entries"] == {key: "triton"}


def test_default_engine_is_measured_cudnn_or_torch_dispatch():
    """cuDNN first only on a target measured on hardware (sm_90a: H100) with a cuDNN newer than 9.15.0; torch's own
    dispatch on the others (A100 .. RTX 5090, B200) and before sm_80."""
    assert tuning.default_for((9, 0), tuning.CUDNN_MIN) == "sdpa_cudnn"
    assert tuning.default_for((9, 0), tuning.CUDNN_MIN - 1) == "sdpa"
    for capability in [(7, 5), (8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:
        assert tuning.default_for(capability, tuning.CUDNN_MIN) == "sdpa", capability


def test_unmeasured_gpu_gets_the_default_with_one_warning(tuning_table, monkeypatch):
    """A GPU without a row in the table: the default engine and one warning per process naming it; once it has a
    row (bench_chunk --write-tuning), its other shapes fall back silently."""
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(tuning, "default_engine", lambda device: "sdpa")
    tuning.warn_unmeasured.cache_clear()
    with pytest.warns(UserWarning, match="RTX 5090 has no row in tuning.json .*'sdpa', a safe default"):
        assert tuning.choose_engine("cuda:0", 128, 4680, 10920) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.choose_engine("cuda:0", 128, 4680, 32760) == "sdpa"  # said once
        tuning.warn_unmeasured.cache_clear()
        tuning.record({tuning.tuning_key("NVIDIA GeForce RTX 5090", 128, 4680, 10920): "sdpa_flash"})
        assert tuning.choose_engine("cuda:0", 128, 4680, 10920) == "sdpa_flash"
        assert tuning.choose_engine("cuda:0", 128, 4680, 32760) == "sdpa"  # measured GPU, other shape: silent
    tuning.warn_unmeasured.cache_clear()


def test_auto_engine_follows_the_tuning_table(tuning_table):
    """dense_attention(engine="auto") runs the table's engine for the shape, else the device default; an entry
    naming an engine that cannot run here (sdpa_cudnn on CPU) falls back to the default."""
    g = gen(13)
    q, k = randn(g, 1, 33, 2, 64), randn(g, 1, 57, 2, 64)
    assert resolve_engine("auto", CPU, torch.float32, 64, 33, 57) == "sdpa"
    tuning.record({tuning.tuning_key("cpu", 64, 33, 57): "reference"})
    assert resolve_engine("auto", CPU, torch.float32, 64, 33, 57) == "reference"
    assert torch.equal(rk.dense_attention(q, k, k), rk.dense_attention(q, k, k, engine="reference"))
    tuning.record({tuning.tuning_key("cpu", 64, 33, 57): "sdpa_cudnn"})
    assert resolve_engine("auto", CPU, torch.float32, 64, 33, 57) == "sdpa"


# ------------------------------------------------------------------------------------ registered ops


def test_registered_ops():
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("relaxkv::")}
    assert names == {f"relaxkv::{op}" for op in TABLE_OPS + ["gather_kv_rope_into", "dense_attention"]}


@pytest.mark.parametrize("op", ["sparse_kv_attention", "gather_kv_rope", "dense_attention"])
def test_functional_ops_are_inference_only(op):
    """A backward through a functional op fails naming it (the ops that mutate cannot be differentiated
    anyway: torch refuses them itself)."""
    g = gen(2)
    pool = randn(g, 1, 8, 1, 16).requires_grad_()
    seg = torch.tensor([[[0, 8, 1]]], dtype=torch.int32)
    if op == "sparse_kv_attention":
        out = rk.sparse_kv_attention(randn(g, 1, 4, 1, 16), pool, pool, seg)
    elif op == "gather_kv_rope":
        out = rk.gather_kv_rope(pool, pool, seg, 8)[0]
    else:
        out = rk.dense_attention(randn(g, 1, 4, 1, 16), pool, pool, engine="reference")
    with pytest.raises(RuntimeError, match=f"relaxkv::{op} is inference-only"):
        out.sum().backward()


def test_gather_attention_on_meta_tensors():
    """impl="gather" composes two registered ops (gather_kv_rope, dense_attention): shapes flow through their
    fake kernels on the meta device (nothing reads a table there: the checks that would are skipped)."""
    q, pool = torch.empty(2, 5, 2, 16, device="meta"), torch.empty(2, 30, 2, 16, device="meta")
    seg = torch.empty(2, 2, 3, dtype=torch.int32, device="meta")
    out = rk.sparse_kv_attention(q, pool, pool, seg, impl="gather", total=10, engine="sdpa")
    assert out.shape == (2, 5, 2, 16) and out.dtype == torch.float32 and out.device.type == "meta"


# ----------------------------------------------------------------------------- torch.compile chunk step


@pytest.mark.parametrize("policy", [rk.RelaxMemory(), rk.PackMemory(top_k=2, archive=3, q_stride=4)],
                         ids=["relax", "pack"])
def test_compiled_chunk_step_matches_eager(policy):
    """torch.compile(fullgraph=True) of a whole chunk step (all layers, selection included), segments mode."""
    layers, b, h, d, hh, ww = 2, 2, 2, 16, 4, 4
    u = policy.chunk_frames
    g = gen(2)
    eager, compiled = (rk.KVCache(policy, layers, b, h, d, hh, ww, dtype=torch.float32, backend="reference")
                       for _ in range(2))

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(layers)]

    torch._dynamo.reset()  # warm-up chunks change table shapes (one compile each); count from zero per case
    step_c = torch.compile(step, fullgraph=True, backend="eager")
    for _ in range(7):
        qkv = [tuple(randn(g, b, u * hh * ww, h, d) for _ in range(3)) for _ in range(layers)]
        eager.begin_chunk()
        compiled.begin_chunk()
        for got, want in zip(step_c(compiled, qkv), step(eager, qkv)):
            torch.testing.assert_close(got, want)
        eager.end_chunk()
        compiled.end_chunk()


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """Tensors report cuda:<index>; a device given as "cuda" is compared as the current CUDA device (checked here
    without a GPU: a fake tensor on cuda:0 and a patched current device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from relaxkv_kernels.ops.checks import canonical_device
    from relaxkv_kernels.ops.checks import check_tensor

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device("cuda") == torch.device("cuda:0")
    assert canonical_device("cuda:1") == torch.device("cuda:1") and canonical_device("cpu") == torch.device("cpu")
    assert canonical_device("cpu:0") == torch.device("cpu") == torch.empty(0, device="cpu:0").device
    with FakeTensorMode():
        q = torch.empty(1, 4, 2, 16, device="cuda:0")
    check_tensor("op", "q", q, device="cuda")  # "cuda" matches cuda:0
    with pytest.raises(ValueError, match="expected a tensor on cuda:1"):
        check_tensor("op", "q", q, device="cuda:1")


@pytest.mark.parametrize("engine,module", [("flash_attn", "flash_attn"), ("flash_attn_cute", "flash_attn.cute")])
def test_flash_attn_engines_call_flash_attn_func(engine, module, monkeypatch):
    """The flash-attn engines through a stand-in package (flash-attn needs a GPU): [B, N, H, D] in and out,
    softmax_scale passed, flash-attn 4's (out, lse) tuple unpacked; not available off CUDA even when installed."""
    import sys
    import types

    from relaxkv_kernels.ops.dense_attention import engines
    from relaxkv_kernels.ops.dense_attention.reference import dense_attention_ref

    calls = []

    def flash_attn_func(q, k, v, softmax_scale):
        calls.append(softmax_scale)
        out = dense_attention_ref(q, k, v, softmax_scale)
        return (out, None) if engine == "flash_attn_cute" else out

    parts = module.split(".")
    for i in range(len(parts)):
        fake = types.ModuleType(".".join(parts[: i + 1]))
        fake.__path__ = []
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    sys.modules[module].flash_attn_func = flash_attn_func
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    engines.flash_attn_func.cache_clear()
    try:
        g = gen(5)
        q, k, v = randn(g, 2, 8, 2, 16), randn(g, 2, 12, 2, 16), randn(g, 2, 12, 2, 16)
        out = engines.run(engine, q, k, v, 0.3)
        assert calls == [0.3] and out.is_contiguous()
        torch.testing.assert_close(out, dense_attention_ref(q, k, v, 0.3))
        assert not engines.available(engine, torch.device("cpu"), torch.bfloat16)
    finally:
        engines.flash_attn_func.cache_clear()
