"""``relaxkv-generate`` / ``python -m relaxkv_gen``: AR rollout with one or all memory policies.

Every input is checked before any work, and a bad one is reported as one line
``relaxkv-generate: error: ...`` with exit status 2. Before any file is read or the model is built, a
temporary folder is made next to ``--out`` (an unwritable location fails there); everything is written
into it and it is moved into place at the end, so a failed or interrupted run (Ctrl-C: one line
``relaxkv-generate: interrupted``, exit status 130) leaves ``--out`` as it was.

Several processes (Ulysses sequence parallelism over a head-parallel KV memory, :mod:`relaxkv_gen.parallel`)::

    torchrun --nproc-per-node P -m relaxkv_gen --preset tiny --policy relax --chunks 12 --out DIR

Under torchrun (WORLD_SIZE > 1) every rank runs the same rollout (gloo on the CPU; NCCL on CUDA, rank i on
cuda:LOCAL_RANK) and gets the same latents as one process; rank 0 alone checks, stages and writes ``--out``
(its verdict on ``--out`` is shared, so a bad one fails every rank with the same line, as every other bad input
does), prints, and records ``"ranks": P`` in report.json (whose KV bytes are rank 0's share of the heads).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import threading
from importlib.util import find_spec
from pathlib import Path

import torch

import relaxkv_kernels as rk
from relaxkv_kernels import CollectiveError
from relaxkv_kernels import run_collective

from . import __version__
from .checkpoint import load_checkpoint
from .checkpoint import read_tensor_file
from .config import MAX_LATENT_FRAMES
from .config import PRESETS
from .config import get_preset
from .config import latent_frames_for_seconds
from .model import build_model
from .output import OutputFolder
from .parallel import check_ranks
from .report import build_report
from .report import format_memory
from .report import format_timing_table
from .report import plot_memory_map
from .report import plot_report
from .report import write_json
from .rollout import POLICY_NAMES
from .rollout import Rollout
from .rollout import clock_label
from .rollout import collect
from .rollout import default_backend
from .rollout import make_policy
from .rollout import random_text

PROG = "relaxkv-generate"
DEFAULT_CHUNKS = 7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {"fp8": torch.float8_e4m3fn}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143  # 128 + SIGINT / SIGTERM, as a shell reports them
RANKS_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting this long for another rank fails
EPILOG = ("Exit status: 0 done; 2 an error, reported as one line 'relaxkv-generate: error: ...' (bad inputs before any "
          "work); 130 interrupted (Ctrl-C), reported as 'relaxkv-generate: interrupted'. A failed or interrupted "
          "run leaves --out as it was. Several processes (sequence parallel, rank 0 writes --out): torchrun "
          "--nproc-per-node P -m relaxkv_gen ...")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``relaxkv-generate: error: ...``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {n}" if high is not None
                                         else f"expected >= {low}, got {n}")
    return n


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def seed_int(text: str) -> int:
    """argparse type: an integer torch.manual_seed accepts."""
    return _integer(text, *SEED_RANGE)


def seconds_float(text: str) -> float:
    """argparse type: a finite video length in (0, MAX_SECONDS] (NaN, infinities and overflows refused)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    try:
        latent_frames_for_seconds(seconds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return seconds


def out_arg(text: str) -> Path:
    """argparse type: a folder path (not empty: ``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path (the current folder: pass '.')")
    return Path(text)


def schedule_arg(text: str) -> dict[int, str]:
    """``--prompt-schedule``: ``{chunk: value}`` from ``"0:a;40:b"`` or a file of ``CHUNK:VALUE`` lines."""
    path = Path(text)
    entries = path.read_text().splitlines() if path.is_file() else text.split(";")
    schedule = {}
    for entry in filter(str.strip, entries):
        chunk, sep, value = entry.partition(":")
        try:
            chunk = int(chunk)
        except ValueError:
            chunk = -1
        if not sep or chunk < 0 or not value.strip():
            raise argparse.ArgumentTypeError(f"expected CHUNK:VALUE entries (a chunk index >= 0, a non-empty text "
                                             f"embeds file or prompt), got {entry.strip()!r}")
        if chunk in schedule:
            raise argparse.ArgumentTypeError(f"chunk {chunk} is scheduled twice")
        schedule[chunk] = value.strip()
    if not schedule:
        raise argparse.ArgumentTypeError(f"expected CHUNK:VALUE entries, got {text!r}")
    return schedule


def device_arg(text: str) -> torch.device:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N`` for a GPU that exists here."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], epilog=EPILOG)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)")
    p.add_argument("--policy", choices=[*POLICY_NAMES, "all"], default="relax",
                   help="KV memory policy (default: relax)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=positive_int,
                        help=f"chunks to generate per policy (default: {DEFAULT_CHUNKS})")
    length.add_argument("--seconds", type=seconds_float, help="video length at 16 fps, 4 video frames per latent frame")
    length.add_argument("--endless", action="store_true",
                        help="no fixed length: generate until Ctrl-C or SIGTERM (or the longest video), then write "
                             "what was generated and exit 0; the cache's memory stays constant (one policy, one "
                             "process)")
    p.add_argument("--backend", choices=["reference", "fused"],
                   help="KV memory backend (default: fused on CUDA, else reference)")
    p.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                   help="K/V pool dtype: fp8 = float8_e4m3fn codes with an fp32 scale per row and head, about half the "
                        "KV memory (default: the model dtype)")
    p.add_argument("--pools", choices=["device", "host"], default="device",
                   help="where the K/V pools live: host = pinned host memory, read in place by the kernels over PCIe "
                        "(the GPU keeps windows, tables and prototypes; default: device)")
    p.add_argument("--batch", type=positive_int, default=1, help="samples per rollout (default: 1)")
    p.add_argument("--checkpoint", type=Path, help="Self-Forcing generator checkpoint (.pt/.pth/.safetensors)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text-embeds", type=Path,
                      help="text encoder states [L, text_dim] (or [B, L, text_dim]), .pt or .safetensors")
    text.add_argument("--prompt", help="with --diffusers: a prompt for the folder's text encoder (needs transformers)")
    p.add_argument("--prompt-schedule", type=schedule_arg, metavar="SPEC",
                   help="prompt switches: 'CHUNK:VALUE;CHUNK:VALUE' or a file of CHUNK:VALUE lines, chunks counted "
                        "from 0; VALUE is a text-embeds file (as --text-embeds), or with --diffusers --prompt a "
                        "prompt. From each chunk on the model reads that text (chunk 0's replaces --prompt / "
                        "--text-embeds)")
    p.add_argument("--recache", choices=rk.RECACHE, default="none",
                   help="at each switch, the stored K/V re-computed under the new text before the chunk: none (the "
                        "cross-attention text alone changes), recent (the last chunk's frames the memory reads; a "
                        "dense window: its whole window, as LongLive), attended (every frame the next chunk may read "
                        "at full resolution); default: none")
    p.add_argument("--first-latent", type=Path, metavar="FILE",
                   help="image-to-video / video extension: clean latent frames [1 or B, C, n, h, w] (.pt or "
                        ".safetensors) the video starts with; the written latents begin with them")
    p.add_argument("--image", type=Path, metavar="PATH",
                   help="with --diffusers: image-to-video, the video starts with this image (of the video's size), "
                        "encoded by the folder's VAE")
    p.add_argument("--diffusers", type=Path, metavar="FOLDER",
                   help="run diffusers instead of relaxkv_gen's model: a diffusers-format Wan2.1 T2V folder "
                        "(transformer/, vae/; e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) whose transformer is --preset's "
                        "architecture, through relaxkv_gen.diffusers.ChunkwiseWanPipeline; writes video_<policy>.mp4 "
                        "and report.json (needs the diffusers extra). --checkpoint loads Self-Forcing-style weights "
                        "into its transformer")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=out_arg, default=Path("out/generate"),
                   help="output folder (default: out/generate): absent or empty (an existing, non-empty folder is "
                        "refused unless --overwrite). Outputs are written to a temporary folder made beside it "
                        "before any work, and moved in at the end")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing, non-empty --out as a whole, once the new run has succeeded (nothing "
                        "of the old run remains); only a folder of relaxkv-generate's own outputs is replaced")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-timing", action="store_true",
                   help="no timing. Timing is per policy: each section's median [q1, q3] over the steady chunks "
                        "(those doing the last chunk's work), printed; report.png plots it on a GPU only (CUDA "
                        "events): on a CPU the clock is host wall time, which a busy machine inflates unevenly "
                        "across policies run one after another")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _one_tensor(path: Path, kind: str) -> torch.Tensor:
    """The one floating-point tensor saved in ``path`` (.pt or .safetensors); ValueError naming ``kind`` otherwise."""
    what = f"{kind} {str(path)!r}"
    obj = read_tensor_file(path, kind)
    if isinstance(obj, dict):  # a safetensors file, or a saved dict
        if len(obj) != 1:
            raise ValueError(f"{what}: expected exactly one tensor, got {sorted(map(str, obj))}")
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got {type(obj).__name__}"
                         + (f" of {obj.dtype}" if isinstance(obj, torch.Tensor) else ""))
    if not torch.isfinite(obj).all():
        raise ValueError(f"{what}: contains NaN or Inf")
    return obj


def load_image(path: Path):
    """``--image``: the picture as an RGB PIL image (FileNotFoundError / ValueError naming the file otherwise)."""
    from PIL import Image
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"--image {str(path)!r}: not an image PIL can read") from None


def load_first_latent(path: Path, cfg, batch: int) -> torch.Tensor:
    """``--first-latent``: clean latent frames [1 or batch, in_dim, n, latent_height, latent_width] (or without the
    batch dim) as float32; FileNotFoundError / ValueError on anything else."""
    what = f"--first-latent {str(path)!r}"
    obj = _one_tensor(path, "--first-latent")
    if obj.dim() == 4:
        obj = obj.unsqueeze(0)
    want = (cfg.in_dim, cfg.latent_height, cfg.latent_width)
    if obj.dim() != 5 or (obj.shape[1], *obj.shape[3:]) != want or obj.shape[2] < 1:
        raise ValueError(f"{what}: expected clean latent frames [1 or {batch}, {want[0]}, n, {want[1]}, {want[2]}] "
                         f"(preset {cfg.name!r}), got {list(obj.shape)}")
    if obj.shape[0] not in (1, batch):
        raise ValueError(f"{what}: batch {obj.shape[0]} does not match --batch {batch}")
    return obj.float()


def load_text_embeds(path: Path, cfg, batch: int) -> torch.Tensor:
    """[batch, L, text_dim] float32 from a saved tensor; FileNotFoundError / ValueError on anything else."""
    what = f"text embeddings {str(path)!r}"
    obj = _one_tensor(path, "text embeddings")
    if obj.dim() == 2:
        obj = obj.unsqueeze(0)
    if obj.dim() != 3 or obj.shape[-1] != cfg.text_dim:
        raise ValueError(f"{what}: expected [L, {cfg.text_dim}] (width = text_dim of preset "
                         f"{cfg.name!r}), got {list(obj.shape) if obj.dim() != 3 else list(obj.shape[1:])}")
    if not 0 < obj.shape[1] <= cfg.text_len:
        raise ValueError(f"{what}: expected 1..{cfg.text_len} rows, got {obj.shape[1]}")
    if obj.shape[0] not in (1, batch):
        raise ValueError(f"{what}: batch {obj.shape[0]} does not match --batch {batch}")
    return obj.float().expand(batch, -1, -1).contiguous()


def plan_chunks(args, chunk_frames: int) -> int:
    """Chunks of ``chunk_frames`` latent frames for ``--chunks`` / ``--seconds``; ValueError past MAX_LATENT_FRAMES."""
    if args.endless:
        return MAX_LATENT_FRAMES // chunk_frames
    if args.seconds is not None:
        n = math.ceil(latent_frames_for_seconds(args.seconds) / chunk_frames)
    else:
        n = DEFAULT_CHUNKS if args.chunks is None else args.chunks
    if n * chunk_frames > MAX_LATENT_FRAMES:
        raise ValueError(f"{n} chunks of {chunk_frames} latent frames exceed the longest video, {MAX_LATENT_FRAMES} "
                         "latent frames (frame positions must stay exact in float32)")
    return n


def check_modules(progress: bool) -> None:
    """ImportError now, not after the run, for a module the outputs need (installed with the package)."""
    needed = [("matplotlib", "the report's figures")] + ([("tqdm", "the progress bar")] if progress else [])
    for module, what in needed:
        if find_spec(module) is None:
            raise ImportError(f"{module} is needed for {what}: pip install {module}"
                              + (" (or pass --no-progress)" if module == "tqdm" else ""))


def _env_int(name: str, low: int) -> int:
    """The integer >= ``low`` in environment variable ``name`` (set by torchrun); ValueError otherwise."""
    text = os.environ.get(name)
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = None
    if n is None or n < low:
        raise ValueError(f"environment variable {name}: expected an integer >= {low} (set by torchrun), got {text!r}")
    return n


def launched_ranks() -> int:
    """P, the processes torchrun launched (``WORLD_SIZE``; 1 when it is not set)."""
    return 1 if os.environ.get("WORLD_SIZE") is None else _env_int("WORLD_SIZE", 1)


def rank_device(requested: torch.device | None, ranks: int) -> torch.device:
    """--device for this process: as asked (default cuda if available, else cpu); with several ranks a CUDA
    device is cuda:LOCAL_RANK (ValueError for an explicit cuda:N, or a LOCAL_RANK with no GPU here)."""
    device = requested or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ranks == 1 or device.type == "cpu":
        return device
    if device.index is not None:
        raise ValueError(f"--device {device}: with {ranks} ranks each rank uses cuda:LOCAL_RANK; pass --device cuda")
    local = _env_int("LOCAL_RANK", 0)
    if local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(ranks: int, device: torch.device):
    """torchrun's ``ranks`` processes joined into one group (gloo on the CPU, NCCL on CUDA) for the block, or
    None for one process; destroyed at the end."""
    if ranks == 1:
        yield None
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=RANKS_TIMEOUT)
    try:
        yield dist.group.WORLD
        # every rank done (rank 0 has written --out) before any of them tears the group down
        run_collective(dist.get_rank(), ranks, "barrier (end of the run)", dist.barrier)
    finally:
        dist.destroy_process_group()


def on_rank0(group, fn):
    """``fn()`` on rank 0 of ``group`` (every process when None), None elsewhere; a ValueError there is raised
    on every rank, with rank 0's message."""
    if group is None:
        return fn()
    import torch.distributed as dist

    result, error = None, [None]
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except ValueError as exc:
            error[0] = str(exc)
    dist.broadcast_object_list(error, src=0, group=group)
    if error[0] is not None:
        raise ValueError(error[0])
    return result


def run(args) -> int:
    """Validate every input (cheapest first), make the temporary output folder, generate with each policy,
    write everything into the folder and move it into place (with several ranks: rank 0 does the folder)."""
    cfg = get_preset(args.preset)
    ranks = launched_ranks()
    if ranks > 1 and args.diffusers is not None:
        raise ValueError(f"--diffusers runs on one process, not {ranks} ranks: run it without torchrun")
    device = rank_device(args.device, ranks)
    with process_group(ranks, device) as group:
        return run_ranks(args, cfg, device, group)


def run_ranks(args, cfg, device: torch.device, group) -> int:
    """:func:`run` in each of the ranks of ``group`` (None: one process); ``out`` is None on ranks other than 0."""
    out = on_rank0(group, lambda: OutputFolder(args.out, overwrite=args.overwrite))  # checks: absent, empty, ...
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend or default_backend()
    if backend == "fused" and device.type != "cuda" and "triton" not in sys.modules:
        # relaxkv_kernels runs its Triton kernels on CPU only under the interpreter (slow; for checking)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if backend == "fused" and device.type != "cuda" and not rk.backends()["triton"]:
        raise ValueError("--backend fused on the CPU needs triton, run under TRITON_INTERPRET=1 (set before triton "
                         "is imported); use --backend reference")
    policies = list(POLICY_NAMES) if args.policy == "all" else [args.policy]
    if args.endless and (len(policies) > 1 or group is not None):
        raise ValueError("--endless runs one policy in one process (a stop ends the run): pick --policy, no torchrun")
    chunks = {name: plan_chunks(args, int(make_policy(name).chunk_frames)) for name in policies}
    if group is not None:
        for name in policies:
            check_ranks(cfg, int(make_policy(name).chunk_frames), group.size())
    check_modules(progress=not args.no_progress)
    if args.prompt is not None and args.diffusers is None:
        raise ValueError("--prompt needs --diffusers (a folder with the text encoder)")
    if args.image is not None and args.diffusers is None:
        raise ValueError("--image needs --diffusers (a folder with the VAE that encodes it); relaxkv_gen's model "
                         "takes clean latents: --first-latent")
    if args.recache != "none" and args.prompt_schedule is None:
        raise ValueError(f"--recache {args.recache} needs --prompt-schedule (it re-computes the K/V at a switch)")
    if args.first_latent is not None and args.diffusers is not None:
        raise ValueError("--first-latent is for relaxkv_gen's model; with --diffusers pass the image (--image)")
    first = None if args.first_latent is None else load_first_latent(args.first_latent, cfg, args.batch)
    if args.diffusers is not None:
        from .diffusers.generate import check_folder  # ImportError naming the extra when diffusers is missing

        check_folder(args.diffusers, prompt=args.prompt is not None)
    try:
        # before any file is read or the model built: an unwritable --out fails here (on every rank)
        staging = on_rank0(group, lambda: out.stage())
        if args.diffusers is not None:
            files = generate_with_diffusers(args, cfg, staging, device=device, dtype=dtype, backend=backend,
                                            policies=policies, chunks=chunks)
        else:
            files = generate(args, cfg, staging, device=device, dtype=dtype, backend=backend, policies=policies,
                             chunks=chunks, group=group, first=first)
        if out is not None:
            out.commit()
    finally:
        if out is not None:
            out.discard()  # a failure or an interrupt: the temporary folder and the parents made for it go
    if out is not None:
        print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def pool_device(args) -> str | None:
    """``KVCache``'s ``pool_device`` for ``--pools``."""
    return "cpu" if args.pools == "host" else None


def load_text(args, cfg) -> torch.Tensor:
    """``--text-embeds`` as [batch, L, text_dim], or seeded random stand-in states."""
    return (load_text_embeds(args.text_embeds, cfg, args.batch) if args.text_embeds
            else random_text(cfg, args.batch, args.seed))


def load_schedule(args, cfg) -> tuple[torch.Tensor | list[str], dict]:
    """The first text and ``--prompt-schedule``'s switches: prompts (``--prompt``: B copies of each) or text states
    [batch, L, text_dim] (each VALUE a text-embeds file); chunk 0's entry replaces the first text."""
    prompts = args.prompt is not None
    schedule = {chunk: [value] * args.batch if prompts else load_text_embeds(Path(value), cfg, args.batch)
                for chunk, value in (args.prompt_schedule or {}).items()}
    first = [args.prompt] * args.batch if prompts else load_text(args, cfg)
    return schedule.pop(0, first), schedule


def generate(args, cfg, staging: Path | None, *, device, dtype, backend, policies, chunks, group=None,
             first: torch.Tensor | None = None) -> list[str]:
    """relaxkv_gen's own model: latents, report.json and the figures into ``staging``; returns the names.
    ``first``: ``--first-latent``'s clean latent frames, which the video starts with (None: text-to-video).

    With a process ``group`` every rank generates, and only rank 0 (``staging`` None elsewhere) prints and writes.
    """
    text, schedule = load_schedule(args, cfg)
    ranks = 1 if group is None else group.size()
    if args.checkpoint is not None:
        model = build_model(cfg, dtype=dtype, init=False)
        info = load_checkpoint(model, args.checkpoint, device=device)
        weights = f"checkpoint {info['path']} ({info['source'] or 'flat'}, {info['num_tensors']} tensors)"
    else:
        model = build_model(cfg, seed=args.seed, device=device, dtype=dtype)
        weights = f"random init (seed {args.seed})"

    results = []
    kv_dtype = KV_DTYPES.get(args.kv_dtype)
    for name in policies:
        run = Rollout(model, name, text, num_chunks=chunks[name], seed=args.seed, backend=backend,
                      timing=not args.no_timing, progress=staging is not None and not args.no_progress,
                      process_group=group, kv_dtype=kv_dtype, pool_device=pool_device(args), context=first,
                      prompts=schedule or None, recache=args.recache)
        results.append(collect(run, lambda count: until_stopped(args.endless, count)))
    if staging is None:
        return []
    report = build_report(results, {
        "preset": cfg.name, "model": cfg.to_dict(), "policies": policies, "backend": backend,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "seed": args.seed,
        "weights": weights, "text": str(args.text_embeds) if args.text_embeds else f"random (seed {args.seed})",
        "timing": "off" if args.no_timing else clock_label(device), "passes_per_chunk": 5, "ranks": ranks,
        "kv_dtype": str(kv_dtype or dtype).replace("torch.", ""), "pools": args.pools,
        "first_latent": None if first is None else {"path": str(args.first_latent), "frames": first.shape[2]},
        "prompt_schedule": args.prompt_schedule, "recache": args.recache, "endless": args.endless,
    })
    if not args.no_timing:
        print(format_timing_table(report))
    print(format_memory(report))

    files = {f"latents_{r.policy}.pt": (lambda p, t=r.latents: torch.save(t, p)) for r in results}
    files["report.json"] = lambda p: write_json(report, p)
    files["report.png"] = lambda p: plot_report(report, p)
    files["report_memory_map.png"] = lambda p: plot_memory_map(report, p)
    for name, write in files.items():
        write(staging / name)
    return list(files)


def generate_with_diffusers(args, cfg, staging: Path, *, device, dtype, backend, policies, chunks) -> list[str]:
    """``--diffusers``: the chunk-wise diffusers pipeline; mp4s and report.json into ``staging``."""
    from .diffusers.generate import load_pipeline
    from .diffusers.generate import load_weights
    from .diffusers.generate import write_videos

    prompt = args.prompt is not None
    first, schedule = load_schedule(args, cfg)
    text = {"prompt": first} if prompt else {"prompt_embeds": first}
    pipe = load_pipeline(args.diffusers, cfg, device=device, dtype=dtype, prompt=prompt)
    weights = load_weights(pipe, args.checkpoint) if args.checkpoint is not None else f"{args.diffusers}/transformer"
    info = {"mode": "diffusers", "folder": str(args.diffusers), "preset": cfg.name, "weights": weights,
            "backend": backend, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
            "seed": args.seed, "text": args.prompt if prompt else
            (str(args.text_embeds) if args.text_embeds else f"random (seed {args.seed})"),
            "kv_dtype": str(KV_DTYPES.get(args.kv_dtype, dtype)).replace("torch.", ""), "pools": args.pools,
            "image": None if args.image is None else str(args.image), "prompt_schedule": args.prompt_schedule,
            "recache": args.recache, "endless": args.endless}
    return write_videos(pipe, cfg, staging, policies=policies, chunks=chunks, text=text, seed=args.seed,
                        backend=backend, progress=not args.no_progress, info=info,
                        kv_dtype=KV_DTYPES.get(args.kv_dtype), pool_device=pool_device(args),
                        image=None if args.image is None else load_image(args.image),
                        prompt_schedule=schedule or None, recache=args.recache,
                        until_stopped=lambda count: until_stopped(args.endless, count))


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA, Python, or the CPU allocator's RuntimeError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


class Terminated(Exception):
    """SIGTERM arrived during the run (raised by the handler :func:`main` installs, so clean-ups run)."""


def _terminate(signum, frame):
    raise Terminated


@contextlib.contextmanager
def until_stopped(endless: bool, count):
    """``--endless``: a Ctrl-C or SIGTERM inside ends the run's loop, not the run, once ``count()`` chunks are done
    (a line says how many; the chunk in progress is dropped); otherwise, or with none done, they go on up."""
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        if not endless or not count():
            raise
        print(f"{PROG}: stopped after {count()} chunks", file=sys.stderr)


def main(argv=None) -> int:
    """Entry point: 0 on success; 2 with one line ``relaxkv-generate: error: ...`` on stderr; 130 with one line
    ``relaxkv-generate: interrupted`` on a Ctrl-C, 143 with ``relaxkv-generate: terminated`` on a SIGTERM (a job
    scheduler's stop). Anything but 0 leaves ``--out`` as it was, with no temporary folder beside it."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version (0), or a usage error (2, its line already printed)
        return exc.code
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except (ValueError, OSError, ImportError) as exc:  # OSError: FileNotFoundError, a full disk, ...
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except CollectiveError as exc:  # another rank stopped: its own line says why
        message = str(exc)
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        message = (f"out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                   "try a smaller --batch or preset")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.stderr.write(f"{PROG}: error: {message}\n")  # one write: the lines of several ranks do not interleave
    return EXIT_ERROR
