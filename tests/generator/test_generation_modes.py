"""Generation modes beyond text-to-video through relaxkv_gen's rollout and CLI: context frames (image-to-video, video
extension).

Semantics (docs/pages/modes/image-to-video.md): the video starts with the given clean latent frames, bitwise. Each
whole chunk of them is a context chunk (one clean pass at timestep 0, which commits their K/V at their positions); the
rest (n mod U frames) opens the first generated chunk, where at every pass those frames are the given latents at
timestep 0. The memory then treats them as any frame: later chunks attend to them (their outputs change when only
the given frames change).
"""
import json
import os

import pytest
import torch

from relaxkv_gen import build_model
from relaxkv_gen.cli import main
from relaxkv_gen.config import get_preset
from relaxkv_gen.rollout import POLICY_NAMES
from relaxkv_gen.rollout import make_policy
from relaxkv_gen.rollout import random_text
from relaxkv_gen.rollout import rollout

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _latents(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, CFG.in_dim, n, CFG.latent_height, CFG.latent_width,
                       generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_context_frames_open_the_video_and_later_chunks_attend_to_them(model, policy):
    """One frame (an image's), a whole chunk plus one: the latents begin with them bitwise, the chunk records say how
    many frames each chunk was given, and the last chunk's latents change when only the given frames do."""
    u = int(make_policy(policy).chunk_frames)
    text = random_text(CFG, 2, 0)
    for n in (1, u + 1):
        given = _latents(n, seed=n, batch=1)  # one video's frames for both samples
        res = rollout(model, policy, text, num_chunks=3, seed=3, timing=False, context=given)
        whole = n // u
        assert res.latents.shape[2] == (whole + 3) * u
        assert torch.equal(res.latents[:, :, :n], given.expand(2, -1, -1, -1, -1))
        assert [c["context_frames"] for c in res.chunks] == [u] * whole + [n % u] + [0] * 2
    other = rollout(model, policy, text, num_chunks=3, seed=3, timing=False, context=given * 0.5)
    last = slice((whole + 2) * u, (whole + 3) * u)
    assert not torch.allclose(other.latents[:, :, last], res.latents[:, :, last]), policy


def test_context_frames_through_the_fused_kernels(model):
    """The Triton kernels (interpreter on CPU) give the reference backend's latents with an image's frame."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    text, given = random_text(CFG, 1, 0), _latents(1, seed=9)
    runs = [rollout(model, "relax", text, num_chunks=3, seed=3, backend=be, timing=False, context=given)
            for be in ("reference", "fused")]
    assert torch.equal(runs[1].latents[:, :, :1], given)
    torch.testing.assert_close(runs[1].latents, runs[0].latents, rtol=1e-4, atol=1e-4)  # fp32: summation order


@pytest.mark.parametrize("context, error, match", [
    ("list", TypeError, r"context: expected a tensor \[1 or 1, 16, n, 8, 8\]"),
    ("shape", ValueError, r"context: expected clean latent frames \[1 or 1, 16, n >= 1, 8, 8\] \(a float tensor\), "
                          r"got \[1, 16, 1, 8, 4\]"),
    ("nan", ValueError, "context: expected finite latents"),
])
def test_bad_context_is_named_before_any_work(model, context, error, match):
    bad = {"list": [1, 2], "shape": _latents(1, 0)[..., :4], "nan": _latents(1, 0) * float("nan")}[context]
    with pytest.raises(error, match=match):
        rollout(model, "relax", random_text(CFG, 1, 0), num_chunks=1, timing=False, context=bad)


def test_cli_first_latent(tmp_path, capsys):
    """--first-latent FILE: the written latents begin with the file's frames, bitwise; report.json says so; a file of
    another shape, or --image without --diffusers, is one error line before any work."""
    given = _latents(2, seed=4)
    torch.save(given[0], tmp_path / "first.pt")  # [C, n, h, w]: the batch dim may be left out
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--policy", "pack", "--chunks", "2", "--no-progress", "--no-timing",
                 "--first-latent", str(tmp_path / "first.pt"), "--out", str(out)]) == 0
    latents = torch.load(out / "latents_pack.pt", weights_only=True)
    assert latents.shape[2] == 2 * 4 and torch.equal(latents[:, :, :2], given)
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["first_latent"] == {"path": str(tmp_path / "first.pt"), "frames": 2}
    capsys.readouterr()
    torch.save(given[..., :4], tmp_path / "bad.pt")
    assert main(["--preset", "tiny", "--first-latent", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "--first-latent" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["--preset", "tiny", "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "c")]) == 2
    assert "--image needs --diffusers" in capsys.readouterr().err
