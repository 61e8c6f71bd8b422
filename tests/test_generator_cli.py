"""relaxkv-generate CLI: bad inputs fail cleanly and write nothing; a tiny run writes its report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relaxkv_gen import build_model
from relaxkv_gen.cli import main
from relaxkv_gen.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _inputs(tmp_path):
    """Files the bad-input cases point at (made fresh per test)."""
    other = ModelConfig(name="other", dim=96, num_heads=3, num_layers=3, ffn_dim=192, text_len=8,
                        latent_height=8, latent_width=8)
    torch.save({"generator_ema": {"model." + k: v for k, v in build_model(other, seed=1).state_dict().items()}},
               tmp_path / "other_arch.pt")
    torch.save(torch.randn(5, 512), tmp_path / "text_512.pt")
    torch.save(torch.randn(9, 4096), tmp_path / "text_too_long.pt")
    (tmp_path / "a_file").write_text("keep me")


BAD_INPUTS = [
    ("checkpoint-other-arch", ["--checkpoint", "{d}/other_arch.pt"], "mis-shaped"),
    ("checkpoint-missing", ["--checkpoint", "{d}/nope.pt"], "no such file"),
    ("text-wrong-width", ["--text-embeds", "{d}/text_512.pt"], "expected [L, 4096]"),
    ("text-too-long", ["--text-embeds", "{d}/text_too_long.pt"], "expected 1..8 rows"),
    ("chunks-zero", ["--chunks", "0"], "--chunks: expected >= 1"),
    ("seconds-negative", ["--seconds", "-1"], "seconds: expected a positive number"),
    ("batch-zero", ["--batch", "0"], "--batch: expected >= 1"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, capsys, args, message):
    _inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    code = main(["--preset", "tiny", "--policy", "relax", "--no-progress", "--out", str(out),
                 *[a.format(d=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left behind either


def test_out_that_is_a_file_is_rejected(tmp_path, capsys):
    _inputs(tmp_path)
    assert main(["--preset", "tiny", "--chunks", "1", "--no-progress", "--out", str(tmp_path / "a_file")]) != 0
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("args", [["--preset", "wan-14b"], ["--policy", "lru"], ["--backend", "cuda-graphs"]],
                         ids=["preset", "policy", "backend"])
def test_unknown_choice_exits_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_bad_policy(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "relaxkv_gen", "--policy", "nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_tiny_run_all_policies_writes_report(tmp_path, capsys):
    out = tmp_path / "run"
    # 3 s at 16 fps = 12 latent frames: 4 chunks of 3 frames, 3 chunks of 4 frames (pack)
    assert main(["--preset", "tiny", "--policy", "all", "--seconds", "3", "--seed", "5", "--no-progress",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "CPU time" in stdout and "self-attn" in stdout and "cross-attn" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "report.png", "report_memory_map.png", *(f"latents_{p}.pt" for p in ("dense", "sink", "relax", "pack"))])
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # temp folder removed
    for png in ("report.png", "report_memory_map.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["preset"] == "tiny" and report["meta"]["backend"] == "reference"
    expected = {"dense": (3, 4), "sink": (3, 4), "relax": (3, 4), "pack": (4, 3)}
    assert set(report["policies"]) == set(expected)
    for name, (u, n) in expected.items():
        pol = report["policies"][name]
        assert pol["chunk_frames"] == u and len(pol["chunks"]) == n
        for i, c in enumerate(pol["chunks"]):
            assert c["chunk"] == i and c["start_frame"] == i * u and c["frames"] == u
            assert c["time_ms"] > 0 and c["kv_bytes"] >= c["kv_live_bytes"] > 0
            sections = {"qkv", "rope_append", "select", "compress", "attention", "o_proj", "cross_attn", "ffn",
                        "stage", "self_attn"}
            assert set(c["timing_ms"]) == sections
            assert c["timing_ms"]["cross_attn"] > 0 and c["timing_ms"]["ffn"] > 0
            assert (c["timing_ms"]["select"] > 0) == (name in ("relax", "pack") and c["plan"]["frames_attended"].count(-1) > 0)
            assert c["plan"]["start_frame"] == i * u
        lat = torch.load(out / f"latents_{name}.pt", weights_only=True)
        assert lat.shape == (1, 16, u * n, 8, 8) and torch.isfinite(lat).all()
        assert pol["latent_shape"] == list(lat.shape)


def test_rollout_is_deterministic_under_seed(tmp_path, capsys):
    torch.save(torch.randn(5, 4096), tmp_path / "text.pt")

    def run(name, *extra):
        assert main(["--preset", "tiny", "--policy", "relax", "--chunks", "3", "--no-progress", "--no-timing",
                     "--out", str(tmp_path / name), *extra]) == 0
        return torch.load(tmp_path / name / "latents_relax.pt", weights_only=True)

    a, b = run("a", "--seed", "7"), run("b", "--seed", "7")
    assert torch.equal(a, b)
    assert not torch.equal(a, run("c", "--seed", "8"))
    assert not torch.equal(a, run("d", "--seed", "7", "--text-embeds", str(tmp_path / "text.pt")))
