"""Few-step flow-matching sampler of Self-Forcing (4 steps, shift 5).

Training schedule: ``sigma_k = 1 - k / 1000`` (k = 0..999, float32), shifted
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``, timestep ``1000 * sigma'``. The denoising
step list [1000, 750, 500, 250] picks ``k = 1000 - step``, giving timesteps
[1000, 937.5, 833.33, 625.0] and sigmas [1, 0.9375, 0.8333, 0.625].

Per step: ``x0 = x_t - sigma * flow`` (float64, cast back); unless it was the last step,
``x_next = (1 - sigma_next) * x0 + sigma_next * noise`` with fresh noise. After the last step the
caller runs one clean refresh pass at t = 0 on x0 to (re)write the chunk's K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_STEPS = (1000, 750, 500, 250)
DEFAULT_SHIFT = 5.0


def shifted_sigmas(shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """float32 [num_train_timesteps]: ``shift * s / (1 + (shift - 1) * s)`` for ``s = 1 - k / N``."""
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class FlowMatchSampler:
    """Timesteps and sigmas of the denoising passes (float32, as Self-Forcing's scheduler holds them)."""

    timesteps: torch.Tensor  # [S] float32, 1000 * sigma
    sigmas: torch.Tensor  # [S] float32

    @classmethod
    def create(cls, steps=DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        given = list(steps)
        if any(isinstance(s, bool) or int(s) != s for s in given):  # 1000.5 would be truncated silently
            raise ValueError(f"steps: expected whole numbers (timesteps of the {num_train_timesteps}-step training "
                             f"schedule), got {given}")
        steps = [int(s) for s in given]
        if not steps or any(not 0 < s <= num_train_timesteps for s in steps):
            raise ValueError(f"steps: expected values in (0, {num_train_timesteps}], got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps: expected a strictly decreasing list, got {steps}")
        sig = shifted_sigmas(shift, num_train_timesteps)
        idx = torch.tensor([num_train_timesteps - s for s in steps])
        sigmas = sig[idx]
        return cls(timesteps=sigmas * num_train_timesteps, sigmas=sigmas)

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel())

    @staticmethod
    def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x_t - sigma * flow`` in float64, returned in ``flow``'s dtype."""
        return (x_t.double() - sigma.double() * flow.double()).to(flow.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * noise`` (flow-matching forward process at ``sigma``)."""
        s = sigma.to(dtype=x0.dtype, device=x0.device)
        return (1 - s) * x0 + s * noise.to(x0.dtype)
