"""Prompt switches with KV re-cache (README, "Generation modes": "Prompt switches and re-cache").

A re-cache rewrites frames the memory holds at full resolution, one chunk's frames at a time, by one clean pass over
their latents at timestep 0 under the new text: their rows are the rotated K/V of that pass at their own positions,
computed attending to the frames the next chunk may read from earlier chunks (as they are then) and to themselves.
Checked here against a plain-PyTorch recomputation (the model's pass with float64 RoPE and softmax attention over the
same keys), with the rows not chosen bitwise unchanged and the policy's derived state (Relax's prototypes, Pack's
compressed block and mean key) following.
"""
import json
import os

import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_gen import build_model
from relaxkv_gen.cli import main
from relaxkv_gen.config import get_preset
from relaxkv_gen.rollout import POLICY_NAMES
from relaxkv_gen.rollout import denoise_chunk
from relaxkv_gen.rollout import make_policy
from relaxkv_gen.rollout import random_text
from relaxkv_gen.rollout import rollout
from relaxkv_gen.rollout import run_recache
from relaxkv_gen.sampler import FlowMatchSampler

from helpers import assert_2x_rule
from helpers import literal_rope

CFG = get_preset("tiny")
CHUNKS = {"dense": 8, "sink": 8, "relax": 7, "pack": 5}  # past the warm-up: eviction, Relax's candidates, Pack's mid


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _generate(model, policy: str, chunks: int, **cache_kw):
    """A cache after ``chunks`` chunks of relaxkv_gen's model (text of seed 0), and every chunk's latents."""
    cache = rk.KVCache(make_policy(policy), CFG.num_layers, 1, CFG.num_heads, CFG.head_dim, CFG.grid_height,
                       CFG.grid_width, dtype=torch.float32, **{"backend": "reference", **cache_kw})
    text = model.embed_text(random_text(CFG, 1, 0))
    u, gen = cache.policy.chunk_frames, torch.Generator().manual_seed(1)
    shape = (1, CFG.in_dim, u, CFG.latent_height, CFG.latent_width)
    outputs = []
    for _ in range(chunks):
        cache.begin_chunk()
        outputs.append(denoise_chunk(lambda x, t, _: model(x, t, text, cache), FlowMatchSampler.create(),
                                     lambda: torch.randn(shape, generator=gen), 1, u, "cpu"))
        cache.end_chunk()
    return cache, torch.cat(outputs, dim=2)


class PlainPass:
    """The ``cache.attend`` of a plain recomputation: q and k rotated at the frames' positions (float64), softmax
    attention over ``context`` (per layer: rotated keys and values [1, n, H, D]) and the frames' own keys."""

    def __init__(self, frames: list[int], context: list[tuple[torch.Tensor, torch.Tensor]]):
        h, w = CFG.grid_height, CFG.grid_width
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        self.pos = torch.cat([torch.cat([torch.full((h * w, 1), fr), grid], 1) for fr in frames])
        self.context, self.k, self.v, self.k_rot = context, {}, {}, {}

    def attend(self, layer, q, k, v):
        self.k[layer], self.v[layer] = k, v
        self.k_rot[layer] = literal_rope(k, self.pos)
        ck, cv = self.context[layer]
        keys = torch.cat([ck.double(), self.k_rot[layer]], dim=1)
        values = torch.cat([cv.double(), v.double()], dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", literal_rope(q, self.pos), keys) * CFG.head_dim ** -0.5
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values).to(q.dtype)


def _rows(cache, frames: list[int]) -> torch.Tensor:
    f, slot_of = cache.frame_tokens, cache.planner.slots.slot_of
    return torch.tensor([slot_of[fr] * f + i for fr in frames for i in range(f)], dtype=torch.long)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equal, NaN (rows never written) included."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("policy, which, attention", [
    (policy, which, ("segments", "window")[(i + j) % 2])
    for i, policy in enumerate(POLICY_NAMES) for j, which in enumerate(("recent", "attended"))])
def test_rewritten_rows_equal_a_plain_recomputation(model, policy, which, attention):
    cache, latents = _generate(model, policy, CHUNKS[policy], attention=attention)
    new_text = model.embed_text(random_text(CFG, 1, 7))
    frames = cache.recache_frames(which)
    assert frames, f"{policy}: nothing to re-cache past the warm-up"
    u, s = cache.policy.chunk_frames, cache.storage
    pack = cache.planner if policy == "pack" else None
    readable = cache.planner.readable_frames(cache.planner.plan(cache.chunk))
    for group in cache.recache_groups(frames):
        before = {name: t.clone() for name, t in (("k", s.k), ("v", s.v), ("proto", s.proto), *s.state.items())
                  if t is not None}
        context_frames = [fr for fr in readable if fr // u < group[0] // u]
        rows = _rows(cache, context_frames)
        plain = PlainPass(group, [(s.k[layer][:, rows], s.v[layer][:, rows]) for layer in range(CFG.num_layers)])
        x = latents[:, :, group]
        t = torch.zeros(1, len(group))
        model(x, t, new_text, plain)
        cache.begin_rewrite(group)
        model(x, t, new_text, cache)
        cache.end_rewrite()

        written = _rows(cache, group)
        changed = torch.zeros(s.k.shape[2], dtype=torch.bool)
        changed[written] = True
        for layer in range(CFG.num_layers):
            torch.testing.assert_close(s.k[layer][:, written], plain.k_rot[layer].float(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(s.v[layer][:, written], plain.v[layer], rtol=1e-4, atol=1e-4)
        slots = [cache.planner.slots.slot_of[fr] for fr in group]
        if s.proto is not None:  # layer 0's pre-RoPE keys, averaged over each frame's tokens, then the heads
            want = plain.k[0].unflatten(1, (len(group), -1)).mean(2).mean(2)
            torch.testing.assert_close(s.proto[:, slots], want, rtol=1e-4, atol=1e-4)
        block = []
        if pack is not None and group[0] in pack.block_pos:  # the recent block: its compressed copy follows
            slot = pack.block_pos.index(group[0])
            block = list(range(pack.row0 + slot * pack.block_tokens, pack.row0 + (slot + 1) * pack.block_tokens))
            changed[block] = True
            kc, vc = torch.zeros_like(s.k[0]), torch.zeros_like(s.v[0])
            mean = torch.zeros_like(s.state["mean_key"][0])
            for layer in range(CFG.num_layers):
                rk.compress_kv(plain.k[layer], plain.v[layer], kc, vc, mean, torch.tensor([slot]),
                               torch.tensor([group[0]]), pack.row0, u, CFG.grid_height, CFG.grid_width, "reference")
                torch.testing.assert_close(s.k[layer][:, block], kc[:, block], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(s.state["mean_key"][layer][:, slot], mean[:, slot], rtol=1e-4, atol=1e-4)
        # everything else bitwise as it was
        _same(s.k[:, :, ~changed], before["k"][:, :, ~changed])
        _same(s.v[:, :, ~changed], before["v"][:, :, ~changed])
        if s.proto is not None:
            others = [i for i in range(s.proto.shape[1]) if i not in slots]
            _same(s.proto[:, others], before["proto"][:, others])
        if pack is not None:
            others = [i for i in range(pack.n_blocks) if not block or i != pack.block_pos.index(group[0])]
            _same(s.state["mean_key"][:, :, others], before["mean_key"][:, :, others])


def test_a_switch_without_recache_changes_only_the_text(model):
    """recache="none": the memory is bitwise what it was (every chunk before the switch bitwise the same latents),
    later chunks change; "attended" changes them again, and the records say what was re-computed."""
    text, new = random_text(CFG, 1, 0), random_text(CFG, 1, 5)
    plain = rollout(model, "relax", text, num_chunks=4, timing=False)
    none = rollout(model, "relax", text, num_chunks=4, timing=False, prompts={3: new})
    attended = rollout(model, "relax", text, num_chunks=4, timing=False, prompts={3: new}, recache="attended")
    cut = 3 * 3
    assert torch.equal(none.latents[:, :, :cut], plain.latents[:, :, :cut])
    assert not torch.allclose(none.latents[:, :, cut:], plain.latents[:, :, cut:])
    assert torch.equal(attended.latents[:, :, :cut], plain.latents[:, :, :cut])
    assert not torch.allclose(attended.latents[:, :, cut:], none.latents[:, :, cut:])
    assert [c["prompt"] for c in attended.chunks] == [0, 0, 0, 3]
    assert [c["recached_frames"] for c in none.chunks] == [[]] * 4
    assert attended.chunks[3]["recached_frames"] == [0, 1, 5, 6, 8]  # sink, history candidates, tail


@pytest.mark.parametrize("policy", ["relax", "pack"])
def test_recache_with_host_and_fp8_pools(model, policy):
    """Host pools rewrite the same bytes as device pools (bitwise, in the segments mode: neither reads a pool prefix in
    place); FP8 pools rewrite the chosen rows' codes and
    scales and leave the others bitwise."""
    new_text = model.embed_text(random_text(CFG, 1, 7))
    runs = {}
    for name, kw in (("device", {}), ("host", {"pool_device": "cpu"}), ("fp8", {"kv_dtype": torch.float8_e4m3fn})):
        cache, latents = _generate(model, policy, CHUNKS[policy], attention="segments", **kw)
        before = cache.storage.k.clone()
        frames = run_recache(cache, "attended", lambda fr, lat=latents: lat[:, :, fr],
                             lambda x, t, _, c=cache: model(x, t, new_text, c), 1, "cpu")
        rows = _rows(cache, frames)
        assert not torch.equal(cache.storage.k[:, :, rows], before[:, :, rows]), name
        runs[name] = cache
    _same(runs["host"].storage.k, runs["device"].storage.k)
    _same(runs["host"].storage.v, runs["device"].storage.v)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_recache_through_the_fused_kernels(dtype):
    """The fused kernels (Triton on a GPU, the interpreter on CPU) re-cache as the reference backend does: fp32 within
    summation order; bf16 (GPU) within twice the error of the same rollout by the torch reference in bf16, both
    against the fp32 reference."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and (dtype != torch.float32 or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1; bf16 needs a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text, new = random_text(CFG, 1, 0), random_text(CFG, 1, 5)
    kw = dict(num_chunks=4, timing=False, prompts={3: new}, recache="attended")

    def run(backend, dt):
        return rollout(build_model(CFG, seed=0, device=device, dtype=dt), "relax", text, backend=backend, **kw)

    truth = run("reference", torch.float32)
    fused = run("fused", dtype)
    if dtype == torch.float32:
        assert [c["selected_frames"] for c in fused.chunks] == [c["selected_frames"] for c in truth.chunks]
        torch.testing.assert_close(fused.latents, truth.latents, rtol=2e-4, atol=2e-4)
    else:  # bf16 prototypes may break a near-tie of the scores otherwise than fp32 ones: latents only
        assert_2x_rule(fused.latents, truth.latents, run("reference", dtype).latents, slack=1e-3, what="bf16 re-cache")


def test_rewrite_contract(model):
    cache, latents = _generate(model, "pack", 4)
    with pytest.raises(rk.FrameNotHeldError, match=r"frames \[8, 9, 10, 11\] are not held at full resolution "
                       r"before chunk 4 \(held: \[0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15\]\)"):
        cache.begin_rewrite([8, 9, 10, 11])  # a compressed mid block: its full-resolution rows are gone
    with pytest.raises(rk.FrameNotHeldError, match=r"frames \[16\]"):
        cache.begin_rewrite([16])  # the next chunk's: not made yet
    with pytest.raises(ValueError, match="frames of one chunk of 4"):
        cache.begin_rewrite([3, 12])
    for bad in ([], [2, 1], [1, 1], [True], "0", [-1], [0.0]):
        with pytest.raises(ValueError, match="sorted distinct frame indices"):
            cache.begin_rewrite(bad)
    with pytest.raises(ValueError, match=r"block 3 \(frames 12 to 15\) takes all its 4 frames"):
        cache.begin_rewrite([12, 13])
    with pytest.raises(ValueError, match="expected one of"):
        cache.recache_frames("all")
    with pytest.raises(RuntimeError, match="no rewrite in progress"):
        cache.end_rewrite()
    cache.begin_rewrite([0, 1, 2, 3])
    assert cache.pass_frames == 4
    for op in (cache.begin_chunk, cache.end_chunk, lambda: cache.begin_rewrite([0]), lambda: cache.recache_frames(
            "recent")):
        with pytest.raises(RuntimeError, match="in progress"):
            op()
    x = torch.zeros(1, 16 * 4, CFG.num_heads, CFG.head_dim)
    cache.attend(0, x, x, x)
    with pytest.raises(RuntimeError, match=r"layers \[1\] attended \[0\] times in the rewrite of frames \[0, 1, 2"):
        cache.end_rewrite()
    cache.attend(1, x, x, x)
    cache.end_rewrite()
    cache.begin_rewrite([12, 13, 14, 15])
    one = torch.zeros(1, 16, CFG.num_heads, CFG.head_dim)
    with pytest.raises(ValueError, match="q"):
        cache.attend(0, one, one, one)


def test_bad_schedule_is_named_before_any_work(model):
    text = random_text(CFG, 1, 0)
    for prompts, match in (({9: text}, r"chunk 9: expected a chunk index >= 0 < 3"),
                           ({-1: text}, "chunk -1"), ({"1": text}, "chunk '1'"),
                           ({1: text[:, :0]}, r"chunk 1: expected text states"),
                           ({1: torch.zeros(1, 4, 3)}, r"chunk 1: expected text states"), ([text], "expected a dict")):
        with pytest.raises((ValueError, TypeError), match=match):
            rollout(model, "relax", text, num_chunks=3, timing=False, prompts=prompts)
    with pytest.raises(ValueError, match="recache: expected one of"):
        rollout(model, "relax", text, num_chunks=3, timing=False, recache="all")


def test_cli_prompt_schedule(model, tmp_path, capsys):
    """--prompt-schedule CHUNK:FILE;... --recache: the rollout with that schedule (the seed's random text until the
    first switch), report.json says what each chunk read and re-computed; bad specs are one error line."""
    new = random_text(CFG, 1, 5)
    torch.save(new[0], tmp_path / "b.pt")
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--policy", "relax", "--chunks", "4", "--no-progress", "--no-timing",
                 "--prompt-schedule", f"3:{tmp_path / 'b.pt'}", "--recache", "attended", "--out", str(out)]) == 0
    want = rollout(model, "relax", random_text(CFG, 1, 0), num_chunks=4, timing=False, prompts={3: new},
                   recache="attended")
    torch.testing.assert_close(torch.load(out / "latents_relax.pt", weights_only=True), want.latents, rtol=0, atol=0)
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["prompt_schedule"] == {"3": str(tmp_path / "b.pt")}
    assert report["meta"]["recache"] == "attended"
    assert [c["recached_frames"] for c in report["policies"]["relax"]["chunks"]] == [[], [], [], [0, 1, 5, 6, 8]]
    capsys.readouterr()
    for args, message in ((["--prompt-schedule", "x:b.pt"], "expected CHUNK:VALUE entries"),
                          (["--prompt-schedule", "1:"], "expected CHUNK:VALUE entries"),
                          (["--prompt-schedule", f"1:{tmp_path / 'b.pt'};1:{tmp_path / 'b.pt'}"], "scheduled twice"),
                          (["--recache", "recent"], "--recache recent needs --prompt-schedule"),
                          (["--prompt-schedule", f"9:{tmp_path / 'b.pt'}"], r"prompts: chunk 9: expected a chunk")):
        assert main(["--preset", "tiny", "--chunks", "2", "--no-progress", "--out", str(tmp_path / "e"), *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "e").exists()


def test_a_rewrite_leaves_a_captured_chunks_buffers(model):
    """After a capture (cache.capture()), a rewrite between chunks uses buffers of its own: the chunk plan's index
    tensors and segment table keep their storage, and the next begin_chunk accepts the plan as the captured one."""
    cache, latents = _generate(model, "relax", 5, attention="window")
    text = model.embed_text(random_text(CFG, 1, 0))
    x, t = latents[:, :, -3:], torch.zeros(1, 3)
    cache.begin_chunk()
    with cache.capture():
        model(x, t, text, cache)
    cache.end_chunk()
    latents = torch.cat([latents, x], dim=2)  # chunk 5's frames: what the re-cache reads for them
    plan = cache.plan_buffers
    def pointers():
        return [t.data_ptr() for t in (plan.seg, plan.frame_slot, plan.frame_pos, *vars(plan.index).values())
                if isinstance(t, torch.Tensor)]

    before = pointers()
    run_recache(cache, "attended", lambda fr: latents[:, :, fr], lambda x, t, _: model(x, t, text, cache), 1, "cpu")
    cache.begin_chunk()
    assert pointers() == before
    model(x, t, text, cache)
    cache.end_chunk()
