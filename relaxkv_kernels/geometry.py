"""Wan2.1 geometry and the numeric conventions that kernels, references and planners share.

One copy of every rule that more than one implementation needs: the 3D RoPE (pair split, inverse
frequencies, token positions, the exact float64 rotation), the PackForcing compressed grid and its
window-centre positions, and the prototype normalisation epsilon. Library code; the op references
import it like the kernels do.

Wan 3D RoPE: the D/2 complex pairs of a head, formed from *adjacent* real elements (x[2i], x[2i+1]),
are split into three axes, in this order:

    temporal  c - 2 * (c // 3) pairs   (c = D / 2; 22 of 64 for D = 128)
    height    c // 3 pairs             (21 of 64)
    width     c // 3 pairs             (21 of 64)

For an axis with ``d`` real dims, pair ``j`` rotates by ``position * theta ** (-2 j / d)``,
theta = 10000. A token at (t, y, x) rotates its temporal pairs by t, its height pairs by y and its
width pairs by x. Positions may be fractional (compressed tokens sit at window centres).

Rotations compose: a key stored rotated at temporal position t and rotated again by a temporal-only
``delta`` equals the key rotated at t + delta. This is how the cache re-indexes frames (hybrid RoPE of
Relax Forcing, incremental RoPE of PackForcing).
"""
from __future__ import annotations

import torch

ROPE_THETA = 10000.0
POOL_T, POOL_Y, POOL_X = 2, 4, 4  # PackForcing compression window (t, y, x)
PROTO_EPS = 1e-12  # F.normalize eps of Relax Forcing prototypes


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs per axis (temporal, height, width) for ``head_dim``."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even number, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_inv_freq(head_dim: int, device=None) -> torch.Tensor:
    """Inverse frequency of every complex pair, float64 [D/2], axes concatenated (t, h, w)."""
    parts = []
    for pairs in rope_pair_split(head_dim):
        d = 2 * pairs
        parts.append(1.0 / ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    return torch.cat(parts)


def token_positions(frame_pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Positions (t, y, x) of every token of consecutive frames, row-major inside a frame.

    Args:
        frame_pos: [U] temporal position of each frame (any real dtype).
        height, width: token grid of one frame (F = height * width).

    Returns:
        float64 [U * F, 3].
    """
    frame_pos = frame_pos.to(torch.float64)
    dev = frame_pos.device
    t = frame_pos.view(-1, 1, 1).expand(-1, height, width)
    y = torch.arange(height, dtype=torch.float64, device=dev).view(1, -1, 1).expand_as(t)
    x = torch.arange(width, dtype=torch.float64, device=dev).view(1, 1, -1).expand_as(t)
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def rope_angles(pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotation angle of every pair of every token: float64 [N, D/2] from positions [N, 3]."""
    n_t, n_h, _ = rope_pair_split(head_dim)
    inv = rope_inv_freq(head_dim, device=pos.device)
    axis = torch.zeros(head_dim // 2, dtype=torch.long, device=pos.device)
    axis[n_t:] = 1
    axis[n_t + n_h:] = 2
    return pos.to(torch.float64)[:, axis] * inv


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x [..., N, H, D] by angles [N, D/2] (or [N, P] on the first P pairs)."""
    p = angles.shape[-1]
    xf = x.to(torch.float64)
    pairs = xf[..., : 2 * p].unflatten(-1, (p, 2))
    cos = angles.cos()[:, None, :]  # [N, 1, P], broadcast over heads
    sin = angles.sin()[:, None, :]
    a, b = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([rot, xf[..., 2 * p:]], dim=-1).to(x.dtype)


def apply_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Wan 3D RoPE, exact (float64 math, result cast back to x.dtype).

    Args:
        x: [..., N, H, D], any float dtype.
        pos: [N, 3] positions (t, y, x), fractional allowed.

    Returns:
        [..., N, H, D], same dtype as x.
    """
    return _rotate(x, rope_angles(pos, x.shape[-1]))


def apply_delta_rope(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Rotate only the temporal pairs of x [..., N, H, D] by a temporal shift delta [N] (per token), float64 math."""
    n_t, _, _ = rope_pair_split(x.shape[-1])
    angles = delta.to(torch.float64)[:, None] * rope_inv_freq(x.shape[-1], device=x.device)[:n_t]
    return _rotate(x, angles)


def compressed_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Compressed token grid (t, y, x) of a PackForcing block: floors of frames/2, height/4, width/4."""
    return frames // POOL_T, height // POOL_Y, width // POOL_X


def compressed_positions(t0: float, frames: int, height: int, width: int) -> torch.Tensor:
    """Window-centre positions of a block's compressed tokens, row-major (t, y, x): float64 [Nc, 3]."""
    nt, ny, nx = compressed_grid(frames, height, width)
    t = t0 + POOL_T * torch.arange(nt, dtype=torch.float64) + (POOL_T - 1) / 2
    y = POOL_Y * torch.arange(ny, dtype=torch.float64) + (POOL_Y - 1) / 2
    x = POOL_X * torch.arange(nx, dtype=torch.float64) + (POOL_X - 1) / 2
    return torch.cartesian_prod(t, y, x)
