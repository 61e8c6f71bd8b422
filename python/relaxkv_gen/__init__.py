"""Thin reference autoregressive video generator on top of ``relaxkv_kernels``.

A Wan2.1-T2V causal DiT whose state dict matches Self-Forcing's ``CausalWanModel`` generator, the
4-step flow-matching sampler with a clean refresh pass, and a chunked rollout that uses the KV
memory policies of ``relaxkv_kernels`` only through its public API, as an outside codebase would.

Example::

    from relaxkv_gen import build_model, get_preset, random_text, rollout
    model = build_model(get_preset("tiny"), seed=0)
    res = rollout(model, "relax", random_text(model.cfg, 1, 0), num_chunks=4)
    res.latents.shape   # [1, 16, 12, 8, 8]

On P processes (``torchrun``, an initialised ``torch.distributed`` group), ``rollout(..., process_group=group)``
splits every chunk's tokens and the KV memory's heads across them (:class:`SequenceParallel`).
"""
from .checkpoint import load_checkpoint
from .config import PRESETS
from .config import ModelConfig
from .config import get_preset
from .model import CausalWanModel
from .model import build_model
from .model import sinusoidal_embedding_1d
from .model import unpatchify
from .parallel import SequenceParallel
from .rollout import POLICY_NAMES
from .rollout import Rollout
from .rollout import RolloutResult
from .rollout import denoise_chunk
from .rollout import make_cache
from .rollout import make_policy
from .rollout import random_text
from .rollout import rollout
from .sampler import FlowMatchSampler

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ModelConfig", "get_preset", "CausalWanModel", "build_model", "sinusoidal_embedding_1d",
    "unpatchify", "load_checkpoint", "FlowMatchSampler", "POLICY_NAMES", "Rollout", "RolloutResult", "denoise_chunk",
    "make_cache", "make_policy", "random_text", "rollout", "SequenceParallel", "__version__",
]
