"""``relaxkv-generate`` / ``python -m relaxkv_gen``: AR rollout with one or all memory policies.

Everything is validated and generated before anything is written: files go to a temporary folder
next to ``--out`` and are moved in at the end, so a failed run leaves ``--out`` untouched.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import load_checkpoint
from .config import PRESETS, get_preset, latent_frames_for_seconds
from .model import build_model
from .report import build_report, format_timing_table, plot_memory_map, plot_report, write_json
from .rollout import POLICY_NAMES, default_backend, load_kernels, make_policy, random_text, rollout

PROG = "relaxkv-generate"
DEFAULT_CHUNKS = 7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)")
    p.add_argument("--policy", choices=[*POLICY_NAMES, "all"], default="relax", help="KV memory policy (default: relax)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=int, help=f"chunks to generate per policy (default: {DEFAULT_CHUNKS})")
    length.add_argument("--seconds", type=float, help="video length at 16 fps, 4 video frames per latent frame")
    p.add_argument("--backend", choices=["reference", "fused"], help="KV memory backend (default: fused on CUDA, else reference)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="samples per rollout (default: 1)")
    p.add_argument("--checkpoint", type=Path, help="Self-Forcing generator checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("--text-embeds", type=Path, help="text encoder states [L, text_dim] (or [B, L, text_dim]), .pt or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder (default: out/generate)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-timing", action="store_true", help="skip the per-section timing breakdown")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def load_text_embeds(path: Path, cfg, batch: int) -> torch.Tensor:
    """[batch, L, text_dim] float32 from a saved tensor; ValueError on anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings {str(path)!r}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"text embeddings {str(path)!r}: unreadable safetensors file ({exc})") from exc
        if len(tensors) != 1:
            raise ValueError(f"text embeddings {str(path)!r}: expected exactly one tensor, got {sorted(tensors)}")
        obj = next(iter(tensors.values()))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"text embeddings {str(path)!r}: torch.load(weights_only=True) failed ({exc})") from exc
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        raise ValueError(f"text embeddings {str(path)!r}: expected a floating-point tensor, got {type(obj).__name__}"
                         + (f" of {obj.dtype}" if isinstance(obj, torch.Tensor) else ""))
    if obj.dim() == 2:
        obj = obj.unsqueeze(0)
    if obj.dim() != 3 or obj.shape[-1] != cfg.text_dim:
        raise ValueError(f"text embeddings {str(path)!r}: expected [L, {cfg.text_dim}] (width = text_dim of preset "
                         f"{cfg.name!r}), got {list(obj.shape) if obj.dim() != 3 else list(obj.shape[1:])}")
    if not 0 < obj.shape[1] <= cfg.text_len:
        raise ValueError(f"text embeddings {str(path)!r}: expected 1..{cfg.text_len} rows, got {obj.shape[1]}")
    if obj.shape[0] not in (1, batch):
        raise ValueError(f"text embeddings {str(path)!r}: batch {obj.shape[0]} does not match --batch {batch}")
    if not torch.isfinite(obj).all():
        raise ValueError(f"text embeddings {str(path)!r}: contains NaN or Inf")
    return obj.float().expand(batch, -1, -1).contiguous()


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available")
    return dev


def plan_chunks(args, chunk_frames: int) -> int:
    if args.seconds is not None:
        return math.ceil(latent_frames_for_seconds(args.seconds) / chunk_frames)
    n = DEFAULT_CHUNKS if args.chunks is None else args.chunks
    if n < 1:
        raise ValueError(f"--chunks: expected >= 1, got {n}")
    return n


def write_outputs(out: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write every file into a temp folder beside ``out``, then move them in (all or nothing)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> int:
    cfg = get_preset(args.preset)
    if args.batch < 1:
        raise ValueError(f"--batch: expected >= 1, got {args.batch}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} exists and is not a folder")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend or default_backend()
    if backend == "fused" and device.type != "cuda" and "triton" not in sys.modules:
        # relaxkv_kernels runs its Triton kernels on CPU only under the interpreter (slow; for checking)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    policies = list(POLICY_NAMES) if args.policy == "all" else [args.policy]
    plan_chunks(args, 1)  # --chunks / --seconds range check, before any heavy work

    # Validate all inputs before any compute or write.
    text = load_text_embeds(args.text_embeds, cfg, args.batch) if args.text_embeds else random_text(cfg, args.batch, args.seed)
    if args.checkpoint is not None:
        model = build_model(cfg, dtype=dtype, init=False)
        info = load_checkpoint(model, args.checkpoint, device=device)
        weights = f"checkpoint {info['path']} ({info['source'] or 'flat'}, {info['num_tensors']} tensors)"
    else:
        model = build_model(cfg, seed=args.seed, device=device, dtype=dtype)
        weights = f"random init (seed {args.seed})"
    rk = load_kernels()
    chunks = {name: plan_chunks(args, int(make_policy(name, rk).chunk_frames)) for name in policies}

    results = []
    for name in policies:
        results.append(rollout(model, name, text, num_chunks=chunks[name], seed=args.seed, backend=backend,
                               timing=not args.no_timing, progress=not args.no_progress, rk=rk))
    timing = "off" if args.no_timing else ("CUDA events" if device.type == "cuda" else "CPU time (perf_counter)")
    report = build_report(results, {
        "preset": cfg.name, "model": cfg.to_dict(), "policies": policies, "backend": backend,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "seed": args.seed,
        "weights": weights, "text": str(args.text_embeds) if args.text_embeds else f"random (seed {args.seed})",
        "timing": timing, "passes_per_chunk": 5,
    })
    if not args.no_timing:
        print(format_timing_table(report))

    files = {f"latents_{r.policy}.pt": (lambda p, t=r.latents: torch.save(t, p)) for r in results}
    files["report.json"] = lambda p: write_json(report, p)
    files["report.png"] = lambda p: plot_report(report, p)
    files["report_memory_map.png"] = lambda p: plot_memory_map(report, p)
    write_outputs(args.out, files)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
