"""Load Self-Forcing / Relax-Forcing generator checkpoints into :class:`CausalWanModel`.

Accepted layouts (``.pt`` / ``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``):

- a flat state dict;
- a Self-Forcing training checkpoint ``{"generator_ema": sd, "generator": sd, ...}`` (EMA preferred),
  also flattened as ``generator_ema.<key>`` / ``generator.<key>`` (safetensors cannot nest);
- keys prefixed with ``model.`` (Self-Forcing's ``WanDiffusionWrapper.model``) and with wrapper
  components anywhere in the path (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
  ``_orig_mod``, ``module``).

Anything that does not match the model exactly (missing, unexpected or mis-shaped keys) raises a
one-line ValueError that lists the offenders, before a single parameter is modified.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

NESTED_KEYS = ("generator_ema", "generator", "state_dict", "model_state_dict")  # in order of preference
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module"})
STRIP_PREFIXES = ("model.",)
MAX_LISTED = 10


def read_tensor_file(path, what: str):
    """What a tensor file holds: ``.safetensors`` -> dict of tensors; anything else ->
    ``torch.load(weights_only=True)``.

    Every failure is a one-line FileNotFoundError / ValueError that starts with ``what`` and the path; an
    unreadable file says so without torch's advice to retry with ``weights_only=False`` (never done here).
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if not path.is_file():
        raise ValueError(f"{name}: not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name}: not readable (permission denied)")
    unreadable = f"{name}: not a readable PyTorch/safetensors file (corrupt, truncated, or another format)"
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception:  # safetensors raises its own error types
            raise ValueError(unreadable) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ValueError(f"{name}: holds pickled {found.group(1)} objects; only tensors, containers and numbers "
                             "are loaded (no code in a checkpoint is run)") from None
        raise ValueError(unreadable) from None
    except Exception:  # zip / EOF / OS errors of a damaged file
        raise ValueError(unreadable) from None


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Raw tensors of a checkpoint file (CPU), before any key normalisation."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"checkpoint {str(path)!r}: unsupported extension {suffix!r} "
                         "(expected .pt, .pth or .safetensors)")
    obj = read_tensor_file(path, "checkpoint")
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _select_generator(sd: dict) -> tuple[dict, str]:
    for name in NESTED_KEYS:
        if isinstance(sd.get(name), dict):
            return sd[name], name
    for name in NESTED_KEYS:  # flattened nesting: "generator_ema.blocks.0..."
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}
        if sub:
            return sub, name
    return sd, ""


def normalize_key(key: str) -> str:
    """Strip wrapper components and the ``model.`` prefix: Self-Forcing key -> our key."""
    parts = [p for p in key.split(".") if p not in WRAPPER_COMPONENTS]
    key = ".".join(parts)
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def normalize_state_dict(sd: dict) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with our key names, name of the nested entry used or "")."""
    sub, source = _select_generator(sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sub.items():
        if not isinstance(v, torch.Tensor):
            continue  # step counters, optimizer scalars, ...
        nk = normalize_key(str(k))
        if nk in out:
            raise ValueError(f"checkpoint: keys collide after normalisation: {nk!r}")
        out[nk] = v
    return out, source


def name_listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED]) + (", ..." if len(items) > MAX_LISTED else "")
    return f"{len(items)} {title}: {shown}"


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """ValueError listing missing, unexpected and mis-shaped keys (first few of each, with counts)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {list(sd[k].shape)}, model {list(expected[k].shape)})"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    problems = [
        name_listing(title, items)
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    nonfloat = sorted(k for k in set(sd) & set(expected) if not sd[k].is_floating_point())
    if nonfloat:
        problems.append(name_listing("non-floating-point", nonfloat))
    if problems:
        cfg = getattr(model, "cfg", None)
        arch = f" preset {cfg.name!r}" if cfg is not None else ""
        raise ValueError(
            f"checkpoint does not match the model{arch} (another architecture or preset?): " + "; ".join(problems)
        )


def load_checkpoint(model: nn.Module, path, *, device=None) -> dict:
    """Load generator weights from ``path`` into ``model`` (in place), cast to the model's dtypes.

    A model built with ``build_model(..., init=False)`` (meta parameters) is materialised on
    ``device`` (default CPU); otherwise parameters are copied where they already live.

    Returns:
        info dict: ``{"path", "source" (nested entry used, e.g. "generator_ema"), "num_tensors"}``.

    Raises:
        FileNotFoundError, ValueError (unreadable file, missing / unexpected / mis-shaped keys).
    """
    raw = read_state_dict(path)
    sd, source = normalize_state_dict(raw)
    check_state_dict(model, sd)
    expected = model.state_dict()
    on_meta = any(p.is_meta for p in expected.values())
    if on_meta:
        device = torch.device(device or "cpu")
        converted = {k: sd[k].to(device=device, dtype=expected[k].dtype) for k in expected}
        model.load_state_dict(converted, strict=True, assign=True)
    else:
        converted = {k: sd[k].to(device=expected[k].device, dtype=expected[k].dtype) for k in expected}
        model.load_state_dict(converted, strict=True)
    model.eval().requires_grad_(False)
    return {"path": str(path), "source": source, "num_tensors": len(sd)}
