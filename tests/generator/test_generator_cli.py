"""relaxkv-generate CLI: every bad input is one error line and exit status 2 before any work, nothing written;
a tiny run writes its report; --out is staged beside itself, replaced whole only with --overwrite, and left as
it was by a failed or interrupted (Ctrl-C: status 130, one line) run."""
import importlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import relaxkv_gen.cli as cli
from relaxkv_gen import build_model
from relaxkv_gen.cli import main
from relaxkv_gen.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))


def _inputs(tmp_path):
    """Files the bad-input cases point at (made fresh per test)."""
    other = ModelConfig(name="other", dim=96, num_heads=3, num_layers=3, ffn_dim=192, text_len=8,
                        latent_height=8, latent_width=8)
    torch.save({"generator_ema": {"model." + k: v for k, v in build_model(other, seed=1).state_dict().items()}},
               tmp_path / "other_arch.pt")
    torch.save(torch.randn(5, 512), tmp_path / "text_512.pt")
    torch.save(torch.randn(9, 4096), tmp_path / "text_too_long.pt")
    torch.save({"blocks": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    good = tmp_path / "text_ok.pt"
    torch.save(torch.randn(5, 4096), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    _previous_run(tmp_path / "old_run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (tmp_path / "notes" / "report.json").write_text("{}")


def _previous_run(out: Path) -> dict[str, bytes]:
    """A folder as an earlier ``--policy all`` run left it (stand-in bytes); returns its contents."""
    out.mkdir(parents=True)
    for name in ("latents_dense.pt", "latents_sink.pt", "latents_relax.pt", "latents_pack.pt", "report.json",
                 "report.png", "report_memory_map.png"):
        (out / name).write_bytes(f"old {name}".encode())
    return _contents(out)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


BAD_INPUTS = [  # (id, arguments, part of the message)
    ("checkpoint-other-arch", ["--checkpoint", "{d}/other_arch.pt"], "mis-shaped"),
    ("checkpoint-missing", ["--checkpoint", "{d}/nope.pt"], "no such file"),
    ("checkpoint-corrupt", ["--checkpoint", "{d}/garbage.pt"], "garbage.pt': not a readable PyTorch/safetensors file"),
    ("checkpoint-truncated", ["--checkpoint", "{d}/truncated.pt"], "not a readable PyTorch/safetensors file"),
    ("checkpoint-corrupt-safetensors", ["--checkpoint", "{d}/garbage.safetensors"],
     "not a readable PyTorch/safetensors"),
    ("checkpoint-pickled-module", ["--checkpoint", "{d}/module.pt"], "holds pickled torch.nn.modules.linear.Linear"),
    ("checkpoint-directory", ["--checkpoint", "{d}/a_dir"], "a_dir': not a file"),
    ("text-wrong-width", ["--text-embeds", "{d}/text_512.pt"], "expected [L, 4096]"),
    ("text-too-long", ["--text-embeds", "{d}/text_too_long.pt"], "expected 1..8 rows"),
    ("text-corrupt", ["--text-embeds", "{d}/truncated.pt"], "text embeddings '{d}/truncated.pt': not a readable"),
    ("text-directory", ["--text-embeds", "{d}/a_dir"], "not a file"),
    ("chunks-zero", ["--chunks", "0"], "argument --chunks: expected >= 1, got 0"),
    ("chunks-not-integer", ["--chunks", "2.5"], "argument --chunks: expected an integer, got '2.5'"),
    ("chunks-past-longest-video", ["--chunks", "100000000"], "exceed the longest video, 16777216 latent frames"),
    ("seconds-inf", ["--seconds", "inf"], "argument --seconds: seconds: expected a number in (0, 4194304]"),
    ("seconds-nan", ["--seconds", "nan"], "got nan"),
    ("seconds-negative", ["--seconds", "-1"], "got -1.0"),
    ("seconds-zero", ["--seconds", "0"], "got 0.0"),
    ("seconds-overflow", ["--seconds", "1e400"], "got inf"),
    ("seconds-too-long", ["--seconds", "1e300"], "got 1e+300"),
    ("seconds-not-a-number", ["--seconds", "ten"], "expected a number of seconds, got 'ten'"),
    ("batch-zero", ["--batch", "0"], "argument --batch: expected >= 1"),
    ("batch-out-of-memory", ["--batch", "1000000000"], "out of memory"),
    ("seed-overflow", ["--seed", "99999999999999999999999"], "argument --seed: expected an integer in"),
    ("device-meta", ["--device", "meta"], "argument --device: expected cpu, cuda or cuda:N, got 'meta'"),
    ("device-unknown", ["--device", "tpu9"], "expected cpu, cuda or cuda:N"),
    ("out-under-a-file", ["--out", "{d}/a_file/sub"], "a_file' is a file, not a folder"),
    ("out-deep-under-a-file", ["--out", "{d}/a_file/sub/deeper"], "a_file' is a file, not a folder"),
    ("out-is-a-file", ["--out", "{d}/a_file"], "exists and is not a folder"),
    ("out-not-empty", ["--out", "{d}/old_run"], "old_run' is not empty (a previous run's outputs?): pass --overwrite"),
    ("out-overwrite-foreign-files", ["--out", "{d}/notes", "--overwrite"],
     "notes' holds 'notes.txt', which relaxkv-generate did not write"),
    ("unknown-preset", ["--preset", "wan-14b"], "argument --preset: invalid choice: 'wan-14b'"),
    ("unknown-policy", ["--policy", "lru"], "invalid choice: 'lru'"),
    ("unknown-backend", ["--backend", "cuda-graphs"], "invalid choice: 'cuda-graphs'"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Generation raises if it starts: errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the inputs were checked")

    monkeypatch.setattr(cli, "collect", refuse)


@pytest.mark.parametrize("args, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line_before_any_work(tmp_path, capsys, no_work, args, message):
    _inputs(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    argv = [a.format(d=tmp_path) for a in args]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    code = main(["--preset", "tiny", "--policy", "relax", "--no-progress", *out, *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("relaxkv-generate: error: ") and captured.err.count("\n") == 1, captured.err
    assert message.format(d=tmp_path) in captured.err, captured.err
    assert "weights_only" not in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written, no temp folder
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert _contents(tmp_path / "old_run") == {n: f"old {n}".encode() for n in _contents(tmp_path / "old_run")}
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_out_fails_at_once(tmp_path, capsys, no_work, monkeypatch):
    """/proc passes os.access as root, but nothing can be made there: the temporary folder is made first."""
    monkeypatch.setattr(cli, "build_model", lambda *a, **k: pytest.fail("model built before --out was proven"))
    assert main(["--preset", "tiny", "--policy", "relax", "--no-progress", "--out", "/proc/relaxkv-x/out"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("relaxkv-generate: error: --out '/proc/relaxkv-x/out': ") and \
        captured.err.count("\n") == 1, captured.err
    assert "'/proc'" in captured.err and ("cannot make a folder" in captured.err or "not writable" in captured.err)
    assert captured.out == "" and not os.path.exists("/proc/relaxkv-x")


def test_temp_folder_is_made_before_the_model_and_removed_on_failure(tmp_path, capsys, monkeypatch):
    out = tmp_path / "a" / "b" / "out"  # missing parents: made for the temporary folder, removed with it
    seen = []

    def build_model(*args, **kwargs):
        seen.extend(p.name for p in out.parent.iterdir())
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "build_model", build_model)
    assert main(["--preset", "tiny", "--policy", "relax", "--no-progress", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "relaxkv-generate: error: stop here\n"
    assert len(seen) == 1 and seen[0].startswith(".out.tmp-"), seen
    assert list(tmp_path.iterdir()) == []


def test_fused_backend_on_cpu_without_triton_fails_first(tmp_path, capsys, no_work, monkeypatch):
    import relaxkv_kernels

    monkeypatch.setattr(relaxkv_kernels, "backends", lambda: {"reference": True, "triton": False})
    assert main(["--backend", "fused", "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert "--backend fused on the CPU needs triton" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_errors(tmp_path):
    """``python -m relaxkv_gen``: one line, status 2, for a usage error and for a late-found one (--out)."""
    (tmp_path / "a_file").write_text("x")
    for args, message in ((["--policy", "nope"], "invalid choice: 'nope'"),
                          (["--seconds", "inf"], "expected a number in (0, 4194304]"),
                          (["--out", str(tmp_path / "a_file" / "sub")], "is a file, not a folder")):
        proc = subprocess.run([sys.executable, "-m", "relaxkv_gen", *args], capture_output=True, text=True, env=ENV,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("relaxkv-generate: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_missing_report_module_fails_first(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setattr(cli, "find_spec", lambda name: None if name == "matplotlib" else object())
    assert main(["--preset", "tiny", "--no-progress", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("relaxkv-generate: error: matplotlib is needed for the report's figures: "
                                       "pip install matplotlib\n")
    assert list(tmp_path.iterdir()) == []


def test_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0
    assert "relaxkv-generate" in capsys.readouterr().out
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for documented in ("--overwrite", "absent or empty", "non-empty folder is refused unless --overwrite",
                       "130 interrupted", "on a GPU only (CUDA events)", "host wall time"):
        assert documented in text, documented


def test_tiny_run_all_policies_writes_report(tmp_path, capsys):
    out = tmp_path / "run" / "nested"  # missing parents are made
    # 3 s at 16 fps = 12 latent frames: 4 chunks of 3 frames, 3 chunks of 4 frames (pack)
    assert main(["--preset", "tiny", "--policy", "all", "--seconds", "3", "--seed", "5", "--no-progress",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    # 4 chunks (3 for pack): too few steady ones for a median (the table itself: test_generator_report.py)
    assert stdout.startswith("timing: wall time on the CPU (time.perf_counter): no policy has 3 steady chunks")
    assert "CPU time" not in stdout
    latents = [f"latents_{p}.pt" for p in ("dense", "sink", "relax", "pack")]
    reports = ["report.json", "report.png", "report_memory_map.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*reports, *latents])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["nested"]  # temp folder removed
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
                        "stage", "self_attn", "chunk"}
            t = c["timing_ms"]
            assert set(t) == sections
            assert t["cross_attn"] > 0 and t["ffn"] > 0
            assert (t["select"] > 0) == (name in ("relax", "pack") and c["plan"]["frames_attended"].count(-1) > 0)
            assert sum(t[s] for s in sections - {"stage", "self_attn", "chunk"}) <= t["chunk"] <= c["time_ms"]
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


def _run_tiny(out: Path, *extra: str) -> int:
    return main(["--preset", "tiny", "--policy", "relax", "--chunks", "2", "--no-progress", "--no-timing",
                 "--out", str(out), *extra])


def test_existing_empty_out_is_used(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert _run_tiny(tmp_path / "out") == 0
    assert sorted(_contents(tmp_path / "out")) == ["latents_relax.pt", "report.json", "report.png",
                                                   "report_memory_map.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_out_that_is_the_current_folder(tmp_path, capsys, monkeypatch):
    """``--out .`` in an empty folder fills it in place (the shell sitting in it keeps seeing its files: same inode);
    a non-empty current folder (or one holding it) is never replaced, even with --overwrite; ``--out ""`` is
    refused, not taken as the current folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = os.stat(".").st_ino
    assert _run_tiny(Path(".")) == 0
    assert os.stat(".").st_ino == inode and "report.json" in os.listdir(".")
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # no temporary folder beside it
    capsys.readouterr()
    for out in (".", ".."):
        assert _run_tiny(Path(out), "--overwrite") == 2
        assert "is not empty and is the current folder or holds it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--out", ""])
    assert exc.value.code == 2 and "expected a folder, got an empty path" in capsys.readouterr().err


def test_sigterm_is_one_line_and_status_143(tmp_path, capsys, monkeypatch):
    """A job scheduler's SIGTERM mid-run: the temporary folder and the parents made for it go, one line, 143."""
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(cli, "collect", terminated)
    assert _run_tiny(tmp_path / "a" / "out") == 143
    assert capsys.readouterr().err == "relaxkv-generate: terminated\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_overwrite_replaces_the_folder_as_a_whole(tmp_path, capsys):
    _previous_run(tmp_path / "out")
    assert _run_tiny(tmp_path / "out", "--overwrite") == 0
    new = _contents(tmp_path / "out")
    assert sorted(new) == ["latents_relax.pt", "report.json", "report.png", "report_memory_map.png"]  # no stale latents
    assert json.loads(new["report.json"])["meta"]["policies"] == ["relax"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folder left


def test_overwrite_keeps_the_old_folder_when_the_run_fails(tmp_path, capsys, monkeypatch):
    old = _previous_run(tmp_path / "out")
    monkeypatch.setattr(cli, "collect", lambda *a, **k: (_ for _ in ()).throw(ValueError("failed mid-run")))
    assert _run_tiny(tmp_path / "out", "--overwrite") == 2
    assert capsys.readouterr().err == "relaxkv-generate: error: failed mid-run\n"
    assert _contents(tmp_path / "out") == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out-overwrite"])
def test_interrupt_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, existing):
    out = tmp_path / "a" / "out"
    old = _previous_run(out) if existing else None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "collect", interrupted)
    assert _run_tiny(out, *(["--overwrite"] if existing else [])) == 130
    captured = capsys.readouterr()
    assert captured.err == "relaxkv-generate: interrupted\n" and captured.out == ""
    if existing:
        assert _contents(out) == old and [p.name for p in out.parent.iterdir()] == ["out"]
    else:
        assert list(tmp_path.iterdir()) == []  # the temporary folder and the parent made for it are gone


def _signal_after_progress(args: list[str], tmp_path: Path, progress: bytes, sig) -> tuple[int, str, bytes]:
    """``python -m relaxkv_gen --preset tiny ARGS`` run in ``tmp_path``, sent ``sig`` once its stderr matches
    ``progress`` (tqdm's count of finished chunks); returns its status, stderr (also in tmp_path/stderr.txt) and
    stdout."""
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaxkv_gen", "--preset", "tiny", *args],
            stdout=subprocess.PIPE, stderr=err, env=ENV, cwd=tmp_path,
            # a shell's background job inherits SIGINT ignored; the CLI under test must get the default
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 180
            while not re.search(progress, log.read_bytes()):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no progress within 180 s: " + log.read_text()
                time.sleep(0.1)
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log.read_text(), proc.stdout.read()


def test_ctrl_c_while_the_command_imports(tmp_path):
    """The relaxkv-generate command starts from a light module (relaxkv_generate): a SIGINT in its first half second,
    while torch and the packages import, is the one line and status 130, no traceback."""
    launch = "import sys, relaxkv_generate; sys.exit(relaxkv_generate.main())"
    done = subprocess.run([sys.executable, "-c", launch, "--version"], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0 and done.stdout.startswith("relaxkv-generate ")
    proc = subprocess.Popen([sys.executable, "-c", launch, "--preset", "tiny", "--chunks", "400", "--out",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr, stdout) == (130, b"relaxkv-generate: interrupted\n", b"")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out-overwrite"])
def test_ctrl_c_during_a_real_run(tmp_path, existing):
    """SIGINT to ``python -m relaxkv_gen`` once its progress bar shows a finished chunk: status 130, the last
    stderr line ``relaxkv-generate: interrupted``, no traceback, --out as it was."""
    work = tmp_path / "work"
    out = work / "out"
    old = _previous_run(out) if existing else None
    code, stderr, stdout = _signal_after_progress(
        ["--policy", "relax", "--chunks", "400", "--no-timing", "--out", str(out),
         *(["--overwrite"] if existing else [])], tmp_path, rb"\b[1-9]\d*/400\b", signal.SIGINT)
    assert code == 130, stderr
    assert stderr.endswith("\nrelaxkv-generate: interrupted\n") and "Traceback" not in stderr, stderr[-2000:]
    assert stdout == b""
    if existing:
        assert _contents(out) == old and [p.name for p in work.iterdir()] == ["out"]
    else:
        assert not work.exists()  # made for the temporary folder, removed with it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_endless_run_stops_and_writes_what_it_made(tmp_path, sig):
    """--endless: generates until stopped; a SIGINT or SIGTERM once chunks are done ends it with status 0, one line
    naming the chunks, and the outputs of those chunks (the chunk in progress dropped) moved into --out."""
    out = tmp_path / "out"
    code, stderr, stdout = _signal_after_progress(["--policy", "pack", "--endless", "--no-timing", "--out", str(out)],
                                                  tmp_path, rb"\b[2-9]\d*/\d+\b", sig)
    assert code == 0, stderr
    chunks = int(re.search(r"relaxkv-generate: stopped after (\d+) chunks\n", stderr).group(1))
    assert chunks >= 2 and "Traceback" not in stderr
    latents = torch.load(out / "latents_pack.pt", weights_only=True)
    assert latents.shape[2] == 4 * chunks
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["endless"] and len(report["policies"]["pack"]["chunks"]) == chunks
    assert b"wrote latents_pack.pt" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name != "stderr.txt"] == ["out"]


def test_endless_needs_one_policy(tmp_path, capsys):
    assert cli.main(["--preset", "tiny", "--policy", "all", "--endless", "--out", str(tmp_path / "o")]) == 2
    assert "--endless runs one policy in one process" in capsys.readouterr().err


def test_rollout_imports_relaxkv_kernels_plainly():
    """The kernels package is a hard dependency: imported once, no duck-typed loader, no ``rk`` parameters."""
    import relaxkv_kernels

    rollout_module = importlib.import_module("relaxkv_gen.rollout")  # the package's ``rollout`` is the function
    assert rollout_module.rk is relaxkv_kernels and cli.rk is relaxkv_kernels
    assert not hasattr(rollout_module, "load_kernels")
    for fn in (rollout_module.make_policy, rollout_module.make_cache, rollout_module.rollout):
        assert "rk" not in inspect.signature(fn).parameters, fn.__name__


def test_fp8_pools_report_the_memory_saved(tmp_path, capsys):
    """--kv-dtype fp8: FP8 pools with scales (tiny preset: head_dim 32, fp32 model: 1 + 4/32 bytes per element
    against 4), the memory per policy and the saving printed and in report.json; latents close to fp32 pools'."""
    assert main(["--preset", "tiny", "--policy", "relax", "--chunks", "3", "--no-progress", "--no-timing",
                 "--kv-dtype", "fp8", "--out", str(tmp_path / "fp8")]) == 0
    stdout = capsys.readouterr().out
    assert _run_tiny(tmp_path / "fp32", "--chunks", "3") == 0
    report = json.loads((tmp_path / "fp8" / "report.json").read_text())
    mem = report["policies"]["relax"]["memory"]
    assert report["meta"]["kv_dtype"] == "float8_e4m3fn" and mem["kv_dtype"] == "float8_e4m3fn"
    assert mem["ratio"] == pytest.approx((32 + 4) / (32 * 4))
    assert mem["kv_bytes_same_dtype"] - mem["kv_bytes"] == mem["pool_bytes_same_dtype"] - mem["pool_bytes"] > 0
    assert (f"KV memory, relax: {mem['kv_bytes'] / 2**20:.2f} MiB with float8_e4m3fn pools" in stdout
            and f"{mem['ratio']:.3f}x float32 pools); " in stdout and " MiB saved" in stdout), stdout
    fp8, fp32 = (torch.load(tmp_path / d / "latents_relax.pt", weights_only=True) for d in ("fp8", "fp32"))
    assert 0 < (fp8 - fp32).norm() / fp32.norm() < 2.0**-4  # e4m3's relative step bounds each stored value
    same = json.loads((tmp_path / "fp32" / "report.json").read_text())["policies"]["relax"]["memory"]
    assert same["ratio"] == 1 and same["kv_bytes"] == mem["kv_bytes_same_dtype"]


def test_host_pools_split_the_memory_by_place(tmp_path, capsys):
    """--pools host: the pools (here with FP8 scales) are the host bytes, the rest the device's, printed and in
    report.json; the latents are those of device pools, bitwise (segments mode on the CPU: the same kernels read
    the same rows)."""
    args = ["--preset", "tiny", "--policy", "relax", "--chunks", "3", "--no-progress", "--no-timing", "--kv-dtype",
            "fp8"]
    assert main([*args, "--pools", "host", "--out", str(tmp_path / "host")]) == 0
    stdout = capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "device")]) == 0
    report = json.loads((tmp_path / "host" / "report.json").read_text())
    mem = report["policies"]["relax"]["memory"]
    assert report["meta"]["pools"] == "host" and mem["pools"] == "host"
    assert mem["host_bytes"] == mem["pool_bytes"] > 0 and mem["device_bytes"] + mem["host_bytes"] == mem["kv_bytes"]
    assert (f"(device {mem['device_bytes'] / 2**20:.2f} MiB, host {mem['host_bytes'] / 2**20:.2f} MiB)"
            in stdout), stdout
    device = json.loads((tmp_path / "device" / "report.json").read_text())["policies"]["relax"]["memory"]
    assert device["host_bytes"] == 0 and device["device_bytes"] == device["kv_bytes"] == mem["kv_bytes"]
    host, dev = (torch.load(tmp_path / d / "latents_relax.pt", weights_only=True) for d in ("host", "device"))
    assert torch.equal(host, dev)
