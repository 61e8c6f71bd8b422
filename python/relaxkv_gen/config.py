"""Model presets of the reference generator.

``wan-1.3b`` is Wan2.1-T2V-1.3B as used by Self-Forcing / Relax Forcing (832x480, 16 fps);
``tiny`` keeps every structural detail (patch 1x2x2, freq_dim 256, text_dim 4096, interleaved 3D
RoPE split) at toy sizes so a 20-chunk rollout runs on two CPU cores in seconds.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from dataclasses import dataclass

VIDEO_FPS = 16
VIDEO_FRAMES_PER_LATENT = 4  # Wan VAE: 4x temporal compression (the first frame's 1-frame special case is ignored)
# Longest video: the kernels take the temporal RoPE angles in fp64, tested exact to 2e-7 rad up to 2**24 latent
# frames = 4,194,304 s (about 48 days) of 16 fps video
MAX_LATENT_FRAMES = 2**24


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Wan2.1-style causal DiT (names follow Wan's ``WanModel``)."""

    name: str
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    text_len: int
    latent_height: int
    latent_width: int
    freq_dim: int = 256
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"{self.name}: freq_dim must be even, got {self.freq_dim}")
        if self.patch_size[0] != 1:
            raise ValueError(f"{self.name}: only a temporal patch of 1 is supported, got {self.patch_size}")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ValueError(
                f"{self.name}: latent {self.latent_height}x{self.latent_width} is not divisible by "
                f"patch {self.patch_size[1]}x{self.patch_size[2]}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid_height(self) -> int:
        """Token rows per latent frame (h)."""
        return self.latent_height // self.patch_size[1]

    @property
    def grid_width(self) -> int:
        """Token columns per latent frame (w)."""
        return self.latent_width // self.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        """F = h * w."""
        return self.grid_height * self.grid_width

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_len=8,
        latent_height=8, latent_width=8,
    ),
    "wan-1.3b": ModelConfig(
        name="wan-1.3b", dim=1536, num_heads=12, num_layers=30, ffn_dim=8960, text_len=512,
        latent_height=60, latent_width=104,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` called ``name``; ValueError listing the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}") from None


MAX_SECONDS = MAX_LATENT_FRAMES * VIDEO_FRAMES_PER_LATENT / VIDEO_FPS


def latent_frames_for_seconds(seconds: float) -> int:
    """Latent frames covering ``seconds`` of 16 fps video at 4 video frames per latent frame.

    ValueError unless ``0 < seconds <= MAX_SECONDS`` (NaN and infinities included).
    """
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds: expected a number in (0, {MAX_SECONDS:.0f}] ({MAX_LATENT_FRAMES} latent frames "
                         f"at most), got {seconds}")
    return math.ceil(seconds * VIDEO_FPS / VIDEO_FRAMES_PER_LATENT - 1e-9)
