"""Helpers shared by the test files: inputs and layouts, tolerances, segment tables, literal RoPE, running a
public op. Imported as ``helpers`` (pytest puts tests/ on sys.path: the folder of tests/conftest.py)."""
from __future__ import annotations

import torch

import relaxkv_kernels as rk
from relaxkv_kernels.availability import interpreter_enabled
from relaxkv_kernels.availability import triton_available
from relaxkv_kernels.ops.fp8 import dequantize_fp8
from relaxkv_kernels.ops.fp8 import quantize_fp8

INT_POISON = -(2**30)  # integer sentinel: an index a kernel forgot to write, or a stride it ignored
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton tests run (interpreter on CPU)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# outputs of O(1) against an fp64 reference: fp32 a few ulps; fp16 (eps 9.8e-4) and bf16 (eps 7.8e-3) about 2 ulps
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def gen(seed: int) -> torch.Generator:
    """A CPU generator (CUDA generators cannot drive torch.randperm): draw on the CPU, then move."""
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device, dtype)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``got`` within :data:`TOL` of ``dtype`` of ``want`` (both compared in float64)."""
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=what or None)


def assert_2x_rule(got: torch.Tensor, truth: torch.Tensor, same_dtype: torch.Tensor, slack: float, what: str = ""):
    """flash-attention's rule: the kernel's max error against the float64 ``truth`` is at most twice that of the
    same computation done by torch in the kernel's dtype (``same_dtype``), plus ``slack``."""
    err = (got.double() - truth.double()).abs().max().item()
    base = (same_dtype.double() - truth.double()).abs().max().item()
    assert err <= 2 * base + slack, f"{what}: kernel error {err:.3e} vs torch {same_dtype.dtype} error {base:.3e}"


FP8 = torch.float8_e4m3fn


def fp8_pool(g: torch.Generator, *shape: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 pool [B, n_rows, H, D] and its fp32 scales [B, n_rows, H] (``relaxkv_kernels.ops.fp8``): normal
    rows whose magnitudes spread over 2^-6 .. 2^6 from row to row, quantized (so codes and scales vary)."""
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-6, 7, shape[:-1], generator=g)).unsqueeze(-1)
    codes, scale = quantize_fp8(x)
    return codes.to(device), scale.to(device)


def poison_fp8(codes: torch.Tensor, scale: torch.Tensor, index) -> None:
    """The NaN code and a NaN scale in the rows ``index`` selects of an FP8 pool and its scales (codes written through
    a uint8 view: torch has no float8 masked fill). The scale makes a stray read show where the NaN code does not
    (the Triton interpreter decodes it as 480)."""
    codes.view(torch.uint8)[index] = 0x7F
    scale[index] = float("nan")


def assert_fp8_equal(codes: torch.Tensor, scale: torch.Tensor, want_codes: torch.Tensor, want_scale: torch.Tensor,
                     what: str = "", exact: bool = True) -> None:
    """An FP8 pool written by a kernel holds the codes and scales of the reference (ops/fp8.py: every backend
    quantizes with the same power-of-two scales and rounds to nearest even).

    ``exact``: bit for bit (rows copied or computed exactly, e.g. V). Otherwise (rows the kernel computes in
    fp32 where the reference uses float64, e.g. rotated K) a value within 1e-7 of a rounding boundary may
    round the other way: every dequantized value within one e4m3 step (2^-3 relative, or the subnormal step
    2^-9 * scale) of the reference's, and at most 0.1% of the codes different (a wrong rounding rule or
    scale changes about half of them).
    """
    codes, scale, want_codes, want_scale = codes.cpu(), scale.cpu(), want_codes.cpu(), want_scale.cpu()
    if exact:
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0, equal_nan=True, msg=what or None)
        bad = (codes.view(torch.uint8) != want_codes.view(torch.uint8)).sum().item()
        assert bad == 0, f"{what}: {bad} of {codes.numel()} FP8 codes differ from the reference"
        return
    got, want = dequantize_fp8(codes, scale), dequantize_fp8(want_codes, want_scale)
    step = 2.0 ** -3 * torch.maximum(got.abs(), want.abs()) + 2.0 ** -9 * torch.maximum(scale, want_scale)[..., None]
    worst = ((got - want).abs() - step).max().item()
    assert worst <= 0 and not got.isnan().any(), f"{what}: a dequantized value is off by more than one e4m3 step"
    bad = (codes.view(torch.uint8) != want_codes.view(torch.uint8)).float().mean().item()
    assert bad <= 1e-3, f"{what}: {bad:.2%} of the FP8 codes differ from the reference"


def cache_rollout(policy, chunks: int = 9, passes: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                  device="cpu", head_dim: int = 16, layers: int = 2, batch: int = 2, heads: int = 2, height: int = 4,
                  width: int = 4, **cache_kw):
    """Outputs of every attend call (float32, stacked, on the CPU) and the cache, after ``chunks`` chunks of
    ``passes`` passes of fresh random q, k, v (drawn in float32 from ``seed``, then cast to ``dtype``: rollouts with
    the same seed see the same inputs whatever their dtype). The defaults: frames of 4 x 4 tokens, the smallest
    grid Pack can pool (2x4x4), and 9 chunks: past a 3-chunk dense window, Relax's warm-up and eviction, Pack's
    first mid blocks (chunk 4)."""
    cache = rk.KVCache(policy, layers, batch, heads, head_dim, height, width, dtype=dtype, device=device, **cache_kw)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, policy.chunk_frames * height * width, heads, head_dim)
    outs = []
    for _ in range(chunks):
        cache.begin_chunk()
        for _ in range(passes):
            for layer in range(layers):
                q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
                outs.append(cache.attend(layer, q, k, v).float())
        cache.end_chunk()
    return torch.stack(outs).cpu(), cache


def run_side_by_side(caches, chunks: int = 9, passes: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                     check=None) -> None:
    """The caches (one geometry, on one device) fed the same fresh q, k, v (drawn in float32 from ``seed``, cast to
    ``dtype``) over ``chunks`` chunks of ``passes`` passes of every layer: ``check(got, want, chunk, layer)`` on each
    later cache's output against the first's (default: bitwise equal), and equal segment tables after every chunk."""
    first = caches[0]
    device = first.device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (first.batch, first.policy.chunk_frames * first.frame_tokens, first.num_heads, first.head_dim)
    for chunk in range(chunks):
        for cache in caches:
            cache.begin_chunk()
        for _ in range(passes):
            for layer in range(first.num_layers):
                q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
                want, *got = (cache.attend(layer, q, k, v) for cache in caches)
                for out in got:
                    if check is None:
                        assert torch.equal(out, want), (chunk, layer)
                    else:
                        check(out, want, chunk, layer)
        for cache in caches:
            cache.end_chunk()
        for cache in caches[1:]:
            assert torch.equal(cache.plan_buffers.seg, first.plan_buffers.seg), chunk


def held_rows(cache) -> torch.Tensor:
    """Pool rows of the frames the planner still holds (rows of empty slots are never read)."""
    f = cache.frame_tokens
    rows = [s * f + i for s, pos in enumerate(cache.last_plan.slot_pos) if pos >= 0 for i in range(f)]
    return torch.tensor(rows)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, N, H, D] as a contiguous tensor, a 16-byte aligned strided view ("strided": heads padded), or an
    unaligned view ("unaligned": odd element offset, the kernels' scalar path)."""
    if layout == "contiguous":
        return x.contiguous()
    b, n, h, d = x.shape
    if layout == "strided":
        out = torch.empty(b, n, h + 2, d, dtype=x.dtype, device=x.device)[:, :, 1:h + 1]
    else:
        out = torch.empty(b, n, h, d + 1, dtype=x.dtype, device=x.device)[..., 1:]
    out.copy_(x)
    assert not out.is_contiguous()
    return out


def last_dim_strided(x: torch.Tensor) -> torch.Tensor:
    """x as a view with stride(-1) == 2 over poison (NaN for floats, INT_POISON for integers)."""
    fill = float("nan") if x.is_floating_point() else INT_POISON
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), fill, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def spaced(t: torch.Tensor) -> torch.Tensor:
    """A 1-D index tensor as a stride-2 view over INT_POISON: a kernel ignoring the index stride reads -2^30."""
    return last_dim_strided(t[:, None])[:, 0]


def seg_view(base: torch.Tensor, layout: str) -> torch.Tensor:
    """The [B, n_seg, 3] table stored in ``base``: ``base`` itself ("contiguous"), or for "view" a
    [B, 3, 2 n_seg + 1] storage read with field stride 2 n_seg + 1 and row stride 2 (a gap between rows)."""
    return base if layout == "contiguous" else base[:, :, 1::2].transpose(1, 2)


def seg_storage(batch: int, n_seg: int, layout: str, g: torch.Generator, device) -> torch.Tensor:
    """Random storage for a ``layout`` table (see :func:`seg_view`): rows a kernel must not touch are checked too."""
    shape = (batch, n_seg, 3) if layout == "contiguous" else (batch, 3, 2 * n_seg + 1)
    return torch.randint(-50, 50, shape, dtype=torch.int32, generator=g).to(device)


def ragged_table(batch: int, n_rows: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Per-batch tables with zero-length, single-row and odd segments, random starts and deltas of both signs,
    the same total for every batch element: (int32 [B, 6, 3] table, total)."""
    lengths = [[17, 0, 1, 9, 0, 30], [5, 21, 0, 0, 30, 1]][:batch]
    while len(lengths) < batch:
        lengths.append(list(reversed(lengths[-1])))
    rows = []
    for lens in lengths:
        row = []
        for n in lens:
            start = int(torch.randint(0, n_rows - n + 1, (1,), generator=g))
            row.append([start, n, int(torch.randint(-40, 40, (1,), generator=g))])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32), sum(lengths[0])


def literal_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan 3D RoPE restated as a complex float64 multiply at real positions: x [..., N, H, D], pos [N, 3]."""
    d = x.shape[-1]
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]  # Wan's rope_params widths per axis
    ang = torch.cat([pos[:, a:a + 1].double() / 10000.0 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
                     for a, n in enumerate(dims)], dim=1)[:, None, :]  # [N, 1, D/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


def replace(args, i: int, value) -> list:
    """``args`` with entry ``i`` replaced (a bad input for one argument)."""
    args = list(args)
    args[i] = value
    return args


def on(device, args) -> list:
    """``args`` with every tensor moved to ``device``."""
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def run_public(op: str, args, backend: str, keep) -> list[torch.Tensor]:
    """``rk.<op>(*args, backend=backend)`` with the tensors at positions ``keep`` cloned first (the op may write
    them): its returned tensors, then those."""
    call = [a.clone() if i in keep else a for i, a in enumerate(args)]
    out = getattr(rk, op)(*call, backend=backend)
    return (list(out) if isinstance(out, tuple) else [] if out is None else [out]) + [call[i] for i in keep]


def assert_int32_indices_match_int64(op: str, args, backend: str) -> None:
    """The public op with every int64 index tensor of ``args`` given as int32 gives the int64 result."""
    index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dtype == torch.int64]
    keep = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in index]
    assert index, "no int64 index tensor among the arguments"
    results = [run_public(op, [a.to(dtype) if i in index else a for i, a in enumerate(args)], backend, keep)
               for dtype in (torch.int64, torch.int32)]
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # proto: fp32 atomics on the GPU


def assert_strided_inputs_match_reference(op: str, args, read_only, backend: str) -> None:
    """The float inputs at ``read_only`` as last-dim strided views (which the public ops accept; the CUDA
    wrappers copy them to unit rows) give the reference backend's result."""
    args = list(args)
    for i in read_only:
        args[i] = last_dim_strided(args[i])
    keep = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in read_only]
    results = [run_public(op, args, be, keep) for be in ("reference", backend)]
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def backend_device(backend: str, cuda_device: str | None = None) -> str:
    """Where ``backend`` runs in these tests: Triton on :data:`DEVICE` (skipped where it cannot run), the CUDA
    kernels on ``cuda_device`` (the ``kernel_device`` fixture), the reference on the CPU."""
    if backend == "triton":
        need_triton()
        return DEVICE
    return cuda_device or "cpu"


def _outputs(out) -> list[torch.Tensor]:
    """An op's return value as a list of tensors (a tuple, one tensor, or None)."""
    return list(out) if isinstance(out, tuple) else [] if out is None else [out]


def assert_public_op_matches_registered(op: str, args, *extra) -> None:
    """``rk.<op>(*args)`` checks and forwards to ``torch.ops.relaxkv.<op>(*args, *extra, "reference")``: the same
    outputs, and the same writes into the tensors it mutates (``extra``: what the public op fills in)."""
    clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = _outputs(getattr(rk, op)(*args))
    want = _outputs(getattr(torch.ops.relaxkv, op)(*clone, *extra, "reference"))
    assert len(out) == len(want)
    for got, ref in zip(out, want):
        assert torch.equal(got, ref)
    for a, c in zip(args, clone):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, c)


def assert_raw_op_raises_like_public(op: str, args, exc: type[Exception], match: str) -> None:
    """``rk.<op>(*args)`` and the raw ``torch.ops.relaxkv.<op>(*args)`` (``args``: every argument of the raw op but
    ``checked``, the public defaults spelled out) raise the same ``exc`` with the same message, matching ``match``."""
    import pytest

    messages = []
    for fn in (getattr(rk, op), getattr(torch.ops.relaxkv, op)):
        with pytest.raises(exc, match=match) as info:
            fn(*args)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def raw_op_tests(op: str, make_args, bad: list, scalar: tuple[int, object, str] | None = None):
    """The raw-op tests of an op module whose raw op takes ``make_args(generator) + [backend]``:

    - each ``bad`` case (argument index, replacement, error type, message fragment) raises the same error through
      ``rk.<op>`` and ``torch.ops.relaxkv.<op>``;
    - ``scalar`` = (argument index, wrongly typed value, argument name): the public function names the argument in
      a TypeError; the raw op's schema refuses the value first (torch's RuntimeError naming the argument);
    - ``checked=True`` gives the outputs and writes of the default on valid arguments.

    Returns the test functions, to bind to ``test_*`` names in the op's module.
    """
    import pytest

    @pytest.mark.parametrize("index, value, exc, match", bad)
    def bad_input(index, value, exc, match):
        assert_raw_op_raises_like_public(op, replace([*make_args(gen(4)), "auto"], index, value), exc, match)

    def scalar_type():
        index, value, name = scalar
        args = replace([*make_args(gen(5)), "auto"], index, value)
        with pytest.raises(TypeError, match=f"{name}: expected an int"):
            getattr(rk, op)(*args)
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            getattr(torch.ops.relaxkv, op)(*args)

    def checked_true():
        assert_checked_matches_default(op, [*make_args(gen(6)), "reference"])

    return bad_input, scalar_type, checked_true


def assert_checked_matches_default(op: str, args) -> None:
    """``torch.ops.relaxkv.<op>(*args, checked=True)`` (no checks) gives the outputs and writes of the default
    ``checked=False`` on valid ``args`` (every argument of the raw op but ``checked``)."""
    results = []
    for checked in (False, True):
        call = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        out = _outputs(getattr(torch.ops.relaxkv, op)(*call, checked=checked))
        results.append(out + [a for a in call if isinstance(a, torch.Tensor)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def run_on_fakes(op: str, args, *extra):
    """``torch.ops.relaxkv.<op>(*args, *extra, "reference")`` on fake tensors (the registered fake kernel):
    (its output, the fake arguments)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return getattr(torch.ops.relaxkv, op)(*fake, *extra, "reference"), fake


def need_triton(device=DEVICE) -> None:
    """Skip unless Triton kernels can run on ``device`` (triton installed; a GPU, or the interpreter on CPU)."""
    import pytest

    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.device(device).type != "cuda" and not interpreter_enabled():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def compare_with_triton(device, dtype: torch.dtype) -> bool:
    """Whether a CUDA kernel test also compares with the op's Triton kernel: on the GPU always; on the CPU
    (the emulation) under the Triton interpreter, except bf16, which the interpreter computes wrongly
    (../shared/GPU.md)."""
    if torch.device(device).type == "cuda":
        return triton_available()
    return triton_available() and interpreter_enabled() and dtype != torch.bfloat16


def capture_chunk_step(cache, step, static):
    """A CUDA graph of ``step(cache, static)`` for the chunk begun on ``cache``; returns (graph, its outputs).

    A warm-up run on a side stream first (autotuning, compilation and cuDNN plans happen outside the capture),
    then the same chunk planned again (pending selection and staging restored), then the capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(cache, static)
    torch.cuda.current_stream().wait_stream(side)
    cache.begin_chunk()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), cache.capture():
        outs = step(cache, static)
    return graph, outs


def assert_replays_equal_eager(eager, graphed, captured, static, step, inputs, chunks: int) -> None:
    """Replay ``captured`` = (graph, outputs) of ``graphed``'s chunk step, fed through the ``static`` inputs,
    over ``chunks`` chunks (the first one begun already) against ``step`` run eagerly on ``eager`` with the same
    fresh ``inputs()``: bitwise equal outputs and segment tables (same kernels, same inputs)."""
    graph, outs = captured
    for chunk in range(chunks):
        qkv = inputs()
        if chunk:
            graphed.begin_chunk()
        for dst, src in zip(static, qkv):
            for a, b in zip(dst, src):
                a.copy_(b)
        eager.begin_chunk()
        want = step(eager, qkv)
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)
        assert torch.equal(graphed.plan_buffers.seg, eager.plan_buffers.seg)
        eager.end_chunk()
        graphed.end_chunk()


def assert_graph_replays_chunk_steps(eager, graphed, step, inputs, warmup: int, chunks: int) -> None:
    """Two caches run ``warmup`` chunks of ``step(cache, inputs())`` side by side (to the steady state, where every
    table keeps its shape), then ``graphed``'s chunk step is captured once (:func:`capture_chunk_step`) and replayed
    over ``chunks`` chunks against ``eager`` (:func:`assert_replays_equal_eager`)."""
    for _ in range(warmup):
        step_inputs = inputs()
        for cache in (eager, graphed):
            cache.begin_chunk()
            step(cache, step_inputs)
            cache.end_chunk()
    static = inputs()
    graphed.begin_chunk()
    captured = capture_chunk_step(graphed, step, static)
    assert_replays_equal_eager(eager, graphed, captured, static, step, inputs, chunks=chunks)


def spawn_ranks(worker, size: int, tmp_path, *args, timeout: float) -> tuple[list, list[int]]:
    """``worker(rank, size, store, results, *args)`` on ``size`` spawned processes, each putting ``(rank, value)``
    on the ``results`` queue; returns (every rank's value, by rank; the processes' exit codes).

    The ranks meet through the file ``store`` in ``tmp_path`` (``init_method=f"file://{store}"``: no TCP port to
    pick, which another process could take before rank 0 binds it). The test fails, naming the silent ranks, when
    some rank has not reported within ``timeout`` seconds (a hang); stragglers are killed.
    """
    import queue
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=worker, args=(rank, size, store, results, *args), daemon=True) for rank in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out = {}
    try:
        while len(out) < size:
            try:
                rank, value = results.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(size)) - set(out))} of {size} did not report within "
                                     f"{timeout:.0f} s (hung?)") from None
            out[rank] = value
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.01))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[rank] for rank in range(size)], [p.exitcode for p in procs]


def assert_layer_steps_replay_eager(eager, graphed, seed: int, warmup: int, chunks: int) -> None:
    """:func:`assert_graph_replays_chunk_steps` for the step that runs every layer once, each on fresh q, k, v of
    its own (the caches' dtype, on their CUDA device, from ``seed``)."""
    gen = torch.Generator(device=eager.device).manual_seed(seed)
    shape = (eager.batch, eager.policy.chunk_frames * eager.frame_tokens, eager.num_heads, eager.head_dim)

    def inputs():
        return [tuple(torch.randn(shape, generator=gen, device=eager.device, dtype=eager.dtype) for _ in range(3))
                for _ in range(eager.num_layers)]

    def step(cache, qkv):
        return [cache.attend(layer, *qkv[layer]) for layer in range(cache.num_layers)]

    assert_graph_replays_chunk_steps(eager, graphed, step, inputs, warmup=warmup, chunks=chunks)
