"""Ulysses sequence parallelism in relaxkv_gen on the CPU (gloo; the ranks are processes spawned here).

Whole rollouts on 2 and 4 ranks give the single-process latents and selections on every rank, with K/V pools
of 1/P the size; a rank that fails stops every rank within seconds with a named error; P must divide a chunk's
tokens; ``torchrun -m relaxkv_gen`` writes the single-process latents and records the ranks.
"""
import dataclasses
import datetime
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import relaxkv_kernels as rk
from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import make_cache
from relaxkv_gen import make_policy
from relaxkv_gen import random_text
from relaxkv_gen import rollout
from relaxkv_gen.cli import main
from relaxkv_gen.parallel import check_ranks
from relaxkv_gen.parallel import tokens_per_rank

from helpers import spawn_ranks

rollout_module = importlib.import_module("relaxkv_gen.rollout")  # the package's ``rollout`` is the function
ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
TINY = get_preset("tiny")  # 2 heads of 32; 16 tokens per frame
TINY_4_HEADS = dataclasses.replace(TINY, name="tiny-4-heads", num_heads=4)  # head_dim 16
# PackMemory attending one mid block: a real choice (the affinity over all heads) at chunks 4 and 5, out of 2
# and 3 blocks; the default (top_k 16) would attend every mid block of a short rollout
SMALL_PACK = rk.PackMemory(sink_frames=4, top_k=1, archive=4)
POLICIES = ("dense", "relax", "pack")
CHUNKS = 6  # relax selects from chunk 2, the small pack from chunk 3
SWITCH = 4  # a prompt switch with a re-cache of every frame chunk 4 attends (head-parallel rewrites, prototypes)
PASSES_PER_CHUNK = 5
GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # a collective waiting on a stopped rank fails after this
JOIN_TIMEOUT_S = 90.0  # every rank of a spawn reports within this, or the test fails (no hang)
FAILURE_DEADLINE_S = 30.0
TOLERANCE = 1e-5  # fp32; only the matmul row blocking and the mean of the ranks' prototype means differ


def _policy(name: str):
    """``make_policy`` with :data:`SMALL_PACK` for "pack" (patched into the rollout module)."""
    return SMALL_PACK if name == "pack" else make_policy(name)


def _fail_at_call(forward, call: int):
    """``forward`` raising at its ``call``-th call (0-based): a rank crashing mid-rollout."""
    calls = itertools.count()

    def failing(*args, **kwargs):
        if next(calls) == call:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    return failing


def _worker(rank: int, size: int, store: str, results, cfg, policies, fail_chunk) -> None:
    """One rank: rollouts of ``policies`` over the world group, then its K/V pool sizes; puts ``(rank, outputs)``
    (or ``(rank, "ExceptionType: message")``) on ``results``. ``fail_chunk``: rank 1 raises at that chunk's first
    pass."""
    torch.set_num_threads(1)  # P ranks on 2 cores
    rollout_module.make_policy = _policy
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=GROUP_TIMEOUT)
    try:
        model = build_model(cfg, seed=0)
        if fail_chunk is not None and rank == 1:
            model.forward = _fail_at_call(model.forward, fail_chunk * PASSES_PER_CHUNK)
        text = random_text(cfg, 1, 0)
        outputs = {}
        for name in policies:
            res = rollout(model, name, text, num_chunks=CHUNKS, timing=False, process_group=dist.group.WORLD,
                          prompts={SWITCH: random_text(cfg, 1, 1)}, recache="attended")
            cache = make_cache(model, _policy(name), 1, process_group=dist.group.WORLD)
            outputs[name] = {"latents": res.latents.numpy(), "selected": [c["selected_frames"] for c in res.chunks],
                             "k": cache.storage.k.numel(), "v": cache.storage.v.numel()}
        results.put((rank, outputs))
    except Exception as exc:  # reported, and the process ends: the other ranks' collectives fail at once
        results.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, size: int, cfg, policies, fail_chunk=None) -> dict:
    """Runs :func:`_worker` on ``size`` spawned ranks (``helpers.spawn_ranks``); every rank's outputs (or error line)
    by rank, after every rank exited cleanly."""
    values, exit_codes = spawn_ranks(_worker, size, tmp_path, cfg, policies, fail_chunk, timeout=JOIN_TIMEOUT_S)
    assert all(code == 0 for code in exit_codes), exit_codes
    return dict(enumerate(values))


@pytest.fixture
def small_pack(monkeypatch):
    """This process's rollouts use :data:`SMALL_PACK`, as the workers' do."""
    monkeypatch.setattr(rollout_module, "make_policy", _policy)


@pytest.mark.parametrize("size, cfg", [(2, TINY), (4, TINY_4_HEADS)], ids=["2-ranks", "4-ranks-4-heads"])
def test_rollouts_match_one_process(size, cfg, small_pack, tmp_path):
    """Every rank ends with the single-process latents and selections (relax: chunks of 48 tokens, so a
    rank's range cuts frames; pack: 64, whole frames), with 1/P of its K/V pools; a prompt switch re-caches alike."""
    ranks = _spawn(tmp_path, size, cfg, POLICIES)
    model, text = build_model(cfg, seed=0), random_text(cfg, 1, 0)
    for name in POLICIES:
        one = rollout(model, name, text, num_chunks=CHUNKS, timing=False, prompts={SWITCH: random_text(cfg, 1, 1)},
                      recache="attended")
        assert one.chunks[SWITCH]["recached_frames"], name
        cache = make_cache(model, _policy(name), 1)
        selected = [c["selected_frames"] for c in one.chunks]
        if name != "dense":
            assert any(c["selects"] for c in one.chunks), f"{name}: no selection in {CHUNKS} chunks"
        for rank, out in ranks.items():
            assert isinstance(out, dict), f"rank {rank}: {out}"
            got = out[name]
            diff = (torch.from_numpy(got["latents"]) - one.latents).abs().max().item()
            assert diff <= TOLERANCE, f"{name}, rank {rank} of {size}: max abs diff {diff:.3g}"
            assert got["selected"] == selected, f"{name}, rank {rank} of {size}: selected frames differ"
            assert (got["k"] * size, got["v"] * size) == (cache.storage.k.numel(), cache.storage.v.numel())


def test_failed_rank_stops_every_rank(tmp_path):
    """Rank 1 raises at chunk 2: rank 0, inside a collective, ends at once with an error naming the collective."""
    t0 = time.monotonic()
    ranks = _spawn(tmp_path, 2, TINY, ("relax",), fail_chunk=2)
    elapsed = time.monotonic() - t0
    assert elapsed < FAILURE_DEADLINE_S, f"{elapsed:.1f} s"
    assert ranks[1] == "RuntimeError: injected failure"
    assert re.match(r"CollectiveError: rank 0 of 2: \S.* failed \(another rank stopped\?\): ", ranks[0]), ranks[0]


def test_ranks_must_divide_chunk_tokens_and_heads():
    assert tokens_per_rank(48, 4) == 12
    with pytest.raises(ValueError, match=r"the chunk's 48 tokens \(U \* F\) are not divisible by the 5 ranks"):
        tokens_per_rank(48, 5)
    check_ranks(TINY, 3, 2)
    with pytest.raises(ValueError, match="tiny's 2 heads are not divisible by the 4 ranks"):
        check_ranks(TINY, 3, 4)
    grid_3x3 = dataclasses.replace(TINY, name="tiny-3x3", latent_height=6, latent_width=6)  # 9 tokens a frame
    with pytest.raises(ValueError, match="the chunk's 27 tokens"):
        check_ranks(grid_3x3, 3, 2)


def test_torchrun_cli_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m relaxkv_gen`` writes (from rank 0 only) the one-process latents."""
    args = ["--preset", "tiny", "--policy", "relax", "--chunks", str(CHUNKS), "--no-progress", "--no-timing"]
    proc = _torchrun(tmp_path, *args, "--out", str(tmp_path / "ranks"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "ranks"]  # no other rank's staging left behind
    got, want = (torch.load(tmp_path / d / "latents_relax.pt") for d in ("ranks", "one"))
    assert (got - want).abs().max().item() <= TOLERANCE
    ranks, one = (json.loads((tmp_path / d / "report.json").read_text())["meta"]["ranks"] for d in ("ranks", "one"))
    assert (ranks, one) == (2, 1)


def _torchrun(tmp_path, *args, ranks: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (its rendezvous binds a free port itself) of ``python -m relaxkv_gen args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "relaxkv_gen", *args]
    return subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_torchrun_bad_out_fails_every_rank(tmp_path):
    """Rank 0 alone looks at --out, and its verdict is every rank's one-line error."""
    (tmp_path / "a_file").write_text("keep me")
    proc = _torchrun(tmp_path, "--chunks", "1", "--no-progress", "--out", str(tmp_path / "a_file"))
    line = f"relaxkv-generate: error: --out {str(tmp_path / 'a_file')!r} exists and is not a folder"
    assert proc.returncode != 0 and proc.stderr.count(line + "\n") == 2, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("env, args, error", [
    ({"WORLD_SIZE": "2"}, ["--diffusers", "nowhere"],
     "--diffusers runs on one process, not 2 ranks: run it without torchrun"),
    ({"WORLD_SIZE": "two"}, [], "environment variable WORLD_SIZE: expected an integer >= 1 (set by torchrun), "
                                "got 'two'"),
], ids=["diffusers", "world-size"])
def test_ranks_bad_input_is_one_line(env, args, error, tmp_path, monkeypatch, capsys):
    """Checked before the process group is made: the same line on every rank."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"relaxkv-generate: error: {error}\n"
    assert not any(tmp_path.iterdir())
