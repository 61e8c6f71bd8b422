"""Generator weights between the original Wan / Self-Forcing / LongLive names and diffusers' ``WanTransformer3DModel``.

The name map is diffusers' own converter (``convert_wan_transformer_to_diffusers``) applied to the names of
:class:`relaxkv_gen.CausalWanModel` (Wan's ``WanModel`` names) for the checkpoint's number of blocks, and checked
to land exactly on ``WanTransformer3DModel``'s names; :func:`diffusers_to_wan` is its inverse. Tensors are passed
through untouched (the same objects), so a round trip is bit-exact.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

import torch

from ..checkpoint import name_listing
from ..checkpoint import normalize_state_dict
from ..config import ModelConfig
from ..config import get_preset
from ..model import CausalWanModel

BLOCK = re.compile(r"blocks\.(\d+)\.")


def diffusers_config(cfg: ModelConfig) -> dict:
    """``WanTransformer3DModel(**diffusers_config(cfg))`` is the architecture of ``CausalWanModel(cfg)``."""
    return {
        "patch_size": tuple(cfg.patch_size), "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
    }


def check_diffusers_config(config, cfg: ModelConfig) -> None:
    """ValueError naming every field where a ``WanTransformer3DModel`` config differs from ``CausalWanModel(cfg)``."""
    want = diffusers_config(cfg)
    got = {k: tuple(config[k]) if k == "patch_size" else config[k] for k in want}
    differ = [f"{k} {got[k]!r} (preset: {want[k]!r})" for k in want if got[k] != want[k]]
    if differ:
        raise ValueError(f"the diffusers transformer is not preset {cfg.name!r}: " + ", ".join(differ))


def _check_dict(state_dict, what: str) -> None:
    if not isinstance(state_dict, dict):
        raise TypeError(f"{what}: state_dict: expected a dict of tensors (e.g. from relaxkv_gen.load_checkpoint or "
                        f"a model's state_dict()), got {type(state_dict).__name__}")


def _num_blocks(names, what: str) -> int:
    indices = {int(m.group(1)) for name in names if (m := BLOCK.match(name))}
    if not indices:
        raise ValueError(f"{what}: no transformer blocks (no 'blocks.<i>.' names) in {len(names)} tensors")
    return max(indices) + 1


@lru_cache(maxsize=8)
def name_map(num_layers: int) -> dict[str, str]:
    """Wan name -> diffusers name for a model of ``num_layers`` blocks (diffusers' converter, checked)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = dataclasses.replace(get_preset("tiny"), num_layers=num_layers)
    wan = list(CausalWanModel(cfg, device="meta").state_dict())
    converted = convert_wan_transformer_to_diffusers({name: name for name in wan})  # values: the original names
    with torch.device("meta"):
        target = set(WanTransformer3DModel(**diffusers_config(cfg)).state_dict())
    mapping = {original: new for new, original in converted.items()}
    if set(mapping.values()) != target or len(mapping) != len(wan):
        raise RuntimeError("diffusers' convert_wan_transformer_to_diffusers no longer maps Wan's names onto "
                           "WanTransformer3DModel's (a diffusers change?): " + name_listing(
                               "unmatched", sorted(set(mapping.values()) ^ target)))
    return mapping


def _rename(state_dict: dict, mapping: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    unknown = sorted(set(state_dict) - set(mapping))
    missing = sorted(set(mapping) - set(state_dict))
    if unknown or missing:
        problems = [name_listing(title, items) for title, items in (("unknown", unknown), ("missing", missing))
                    if items]
        raise ValueError(f"{what}: not a Wan2.1 text-to-video transformer of {_num_blocks(mapping, what)} blocks: "
                         + "; ".join(problems))
    return {mapping[name]: tensor for name, tensor in state_dict.items()}


def wan_to_diffusers(state_dict: dict) -> dict[str, torch.Tensor]:
    """Original Wan / Self-Forcing / LongLive generator weights -> ``WanTransformer3DModel`` state dict.

    Accepts what :func:`relaxkv_gen.load_checkpoint` reads: a flat Wan state dict, or a Self-Forcing training
    checkpoint (``generator_ema`` preferred, ``model.`` prefixes and wrapper components stripped). ValueError
    listing unknown and missing names; TypeError for anything but a dict of tensors.
    """
    _check_dict(state_dict, "wan_to_diffusers")
    sd, _ = normalize_state_dict(state_dict)
    return _rename(sd, name_map(_num_blocks(sd, "wan_to_diffusers")), "wan_to_diffusers")


def diffusers_to_wan(state_dict: dict) -> dict[str, torch.Tensor]:
    """``WanTransformer3DModel`` state dict -> Wan names (``CausalWanModel``, Self-Forcing's generator).
    ValueError listing unknown and missing names; TypeError for anything but a dict of tensors."""
    _check_dict(state_dict, "diffusers_to_wan")
    n = _num_blocks(state_dict, "diffusers_to_wan")
    inverse = {new: original for original, new in name_map(n).items()}
    return _rename(state_dict, inverse, "diffusers_to_wan")
