"""Wan2.1-style causal video DiT with the parameter names of Self-Forcing's ``CausalWanModel``.

The state dict of :class:`CausalWanModel` has exactly the keys and shapes of the Self-Forcing
generator (Wan2.1 ``WanModel`` naming), so a Self-Forcing / Relax-Forcing checkpoint loads without
renaming. Self-attention goes through a KV memory object (``relaxkv_kernels.KVCache``) that applies
the 3D RoPE, stores keys/values and attends; this file never rotates or caches anything itself.

Per-frame timesteps: ``t`` has one value per latent frame, so the six modulation vectors
(shift1, scale1, gate1, shift2, scale2, gate2) are ``[B, frames, 6, dim]`` and broadcast over the
tokens of their frame, as in Self-Forcing.

Sequence parallel (``forward(..., parallel=...)``, :mod:`relaxkv_gen.parallel`): each rank runs the blocks on
its share of the chunk's tokens, with the modulation cut to match, and trades tokens for heads around the KV
memory; the blocks themselves are the same code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .protocols import AttendFn
from .protocols import Timer
from .protocols import timed

if TYPE_CHECKING:
    from .parallel import SequenceParallel

TIME_EMBED_THETA = 10000.0


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: float64 [N, dim], cosines first then sines.

    ``emb[n, j] = cos(p_n * omega_j)``, ``emb[n, half + j] = sin(p_n * omega_j)`` with
    ``omega_j = 10000 ** (-j / half)``, ``half = dim / 2``.
    """
    if dim % 2:
        raise ValueError(f"dim: expected an even number, got {dim}")
    half = dim // 2
    pos = position.reshape(-1).to(torch.float64)
    omega = torch.pow(TIME_EMBED_THETA, -torch.arange(half, dtype=torch.float64, device=pos.device).div(half))
    angles = torch.outer(pos, omega)  # [N, half]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class RMSNorm(nn.Module):
    """Wan RMSNorm over the full model dim: fp32 ``x * rsqrt(mean(x^2) + eps)``, cast back, times weight."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for bf16/fp16 inputs, fp64 stays fp64
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-6, no affine unless asked) whose output keeps the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, device=None):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class _Projections(nn.Module):
    """q, k, v, o projections and the full-dim q/k RMSNorms (Wan names), shared by both attentions."""

    def __init__(self, dim: int, num_heads: int, eps: float, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, device=device)
        self.k = nn.Linear(dim, dim, device=device)
        self.v = nn.Linear(dim, dim, device=device)
        self.o = nn.Linear(dim, dim, device=device)
        self.norm_q = RMSNorm(dim, eps, device)
        self.norm_k = RMSNorm(dim, eps, device)


class SelfAttention(_Projections):
    def forward(self, x: torch.Tensor, cache: AttendFn, layer: int, timer: Timer | None = None) -> torch.Tensor:
        """x [B, U*F, dim] (exactly the chunk's tokens) -> [B, U*F, dim]; RoPE, caching and attention happen in
        ``cache.attend``. Timed sections: "qkv" (projections + q/k norms), "o_proj"."""
        b, s = x.shape[:2]
        shape = (b, s, self.num_heads, self.head_dim)
        with timed(timer, "qkv"):
            q = self.norm_q(self.q(x)).view(shape)  # [B, L, H, D], pre-RoPE
            k = self.norm_k(self.k(x)).view(shape)
            v = self.v(x).view(shape)
        out = cache.attend(layer, q, k, v)  # [B, L, H, D]; the cache times its own sections
        with timed(timer, "o_proj"):
            return self.o(out.flatten(2))


class CrossAttention(_Projections):
    """Wan t2v cross-attention: RMSNorm on q and k, no RoPE, no mask (padded text rows are attended)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], context [B, text_len, dim] -> [B, L, dim]."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d).transpose(1, 2)  # [B, H, L, D]
        k = self.norm_k(self.k(context)).view(b, -1, n, d).transpose(1, 2)  # [B, H, Lt, D]
        v = self.v(context).view(b, -1, n, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        dim, dev = cfg.dim, device
        self.norm1 = LayerNorm(dim, cfg.eps, device=dev)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, dev)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True, device=dev)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, dev)
        self.norm2 = LayerNorm(dim, cfg.eps, device=dev)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim, device=dev), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim, device=dev))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim, device=dev) / dim**0.5)

    def forward(self, x, e0, context, cache: AttendFn, layer: int, timer: Timer | None = None):
        """x [B, U*F, dim]; e0 [B, U, 6, dim]; context [B, text_len, dim] -> [B, U*F, dim].

        e0 holds one row per group of consecutive tokens, equal groups: one per frame, or under sequence
        parallelism one per run of a rank's tokens within a frame (``SequenceParallel.shard_frames``).

        Timed sections: those of the self-attention, "cross_attn" and "ffn" (the modules alone; norms,
        modulation and residual adds are not in any section).
        """
        frames = e0.shape[1]
        # [B, U, 1, dim] each
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)

        def per_frame(t):  # [B, U*F, dim] -> [B, U, F, dim]
            return t.unflatten(1, (frames, -1))

        h = (per_frame(self.norm1(x)) * (1 + scale1) + shift1).flatten(1, 2)
        y = self.self_attn(h, cache, layer, timer)
        x = x + (per_frame(y) * gate1).flatten(1, 2)
        h = self.norm3(x)
        with timed(timer, "cross_attn"):
            y = self.cross_attn(h, context)
        x = x + y
        h = (per_frame(self.norm2(x)) * (1 + scale2) + shift2).flatten(1, 2)
        with timed(timer, "ffn"):
            y = self.ffn(h)
        return x + (per_frame(y) * gate2).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, device=device)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_volume, device=device)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim, device=device) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, U*F, dim]; e [B, U, 1, dim] (time_embedding output, not the 6-way projection; one row per group
        of tokens, as ``AttentionBlock``'s e0)."""
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)  # [B, U, 1, dim]
        h = self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale) + shift
        return self.head(h).flatten(1, 2)  # [B, U*F, out_dim * prod(patch)]


def unpatchify(tokens: torch.Tensor, frames: int, grid_h: int, grid_w: int, patch_size, channels: int) -> torch.Tensor:
    """[B, frames*h*w, pt*ph*pw*c] (per token (pt, ph, pw, c), c fastest) -> [B, c, frames*pt, h*ph, w*pw]."""
    pt, ph, pw = patch_size
    b = tokens.shape[0]
    u = tokens.reshape(b, frames, grid_h, grid_w, pt, ph, pw, channels)
    u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pt, h, ph, w, pw]
    return u.reshape(b, channels, frames * pt, grid_h * ph, grid_w * pw)


class CausalWanModel(nn.Module):
    """Chunk-wise causal Wan2.1 T2V DiT (flow prediction), state-dict compatible with Self-Forcing.

    Args:
        cfg: architecture (see :mod:`relaxkv_gen.config`).

    Example::

        model = CausalWanModel(get_preset("tiny"))
        ctx = model.embed_text(torch.randn(1, 8, 4096))
        flow = model(x_chunk, t, ctx, cache)   # x_chunk [B, 16, U, 8, 8], t [B, U]
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        dim, dev = cfg.dim, device
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, device=dev)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim, device=dev), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim, device=dev))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim, device=dev), nn.SiLU(),
                                            nn.Linear(dim, dim, device=dev))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, device=dev))
        self.blocks = nn.ModuleList([AttentionBlock(cfg, dev) for _ in range(cfg.num_layers)])
        self.head = Head(cfg, dev)
        if torch.device(dev or "cpu").type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialisation, except the output head (Wan zeros it, which makes a random model's flow
        identically its bias; we use Xavier so a random-weight rollout exercises every path)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text encoder states [B, L <= text_len, text_dim] -> context [B, text_len, dim].

        Rows beyond L are zero-padded *before* the embedding (so they become non-zero), as in Wan.
        """
        cfg = self.cfg
        if text.dim() != 3 or text.shape[-1] != cfg.text_dim or text.shape[1] > cfg.text_len:
            raise ValueError(
                f"text embeddings: expected [B, L <= {cfg.text_len}, {cfg.text_dim}], got {list(text.shape)}"
            )
        pad = cfg.text_len - text.shape[1]
        if pad:
            text = torch.cat([text, text.new_zeros(text.shape[0], pad, text.shape[2])], dim=1)
        w = self.text_embedding[0].weight
        return self.text_embedding(text.to(device=w.device, dtype=w.dtype))

    def time_embed(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps t [B, U] -> (e [B, U, 1, dim], e0 [B, U, 6, dim])."""
        sin = sinusoidal_embedding_1d(self.cfg.freq_dim, t.flatten()).to(dtype)
        e = self.time_embedding(sin)  # [B*U, dim]
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim)).unflatten(0, t.shape)
        return e.unflatten(0, t.shape).unsqueeze(2), e0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache: AttendFn,
                timer: Timer | None = None, parallel: SequenceParallel | None = None) -> torch.Tensor:
        """Flow prediction for one chunk.

        Args:
            x: latents [B, in_dim, U, H, W] (H, W: latent size).
            t: per-frame timesteps [B, U] (float32; 0..1000).
            context: ``embed_text`` output [B, text_len, dim].
            cache: KV memory; ``cache.attend(layer, q, k, v)`` with q/k/v [B, U*F, heads, head_dim].
            timer: optional :class:`Timer` for the sections "qkv", "o_proj", "cross_attn" and "ffn" of every
                block (the KV memory's own sections are timed by the cache's ``profiler``), and "all_to_all"
                with ``parallel``.
            parallel: a :class:`~relaxkv_gen.parallel.SequenceParallel` of P ranks, each calling with the same
                x, t and context: the rank runs the blocks on its U*F/P tokens (ValueError unless P divides U*F),
                ``cache`` is a head-parallel KV memory taking [B, U*F, heads/P, head_dim], and every rank
                returns the whole flow.

        Returns:
            flow [B, out_dim, U, H, W] in the model's dtype.
        """
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_dim or tuple(x.shape[3:]) != (cfg.latent_height, cfg.latent_width):
            raise ValueError(
                f"x: expected [B, {cfg.in_dim}, U, {cfg.latent_height}, {cfg.latent_width}], got {list(x.shape)}"
            )
        b, _, frames = x.shape[:3]
        if tuple(t.shape) != (b, frames):
            raise ValueError(f"t: expected per-frame timesteps [{b}, {frames}], got {list(t.shape)}")
        w = self.patch_embedding.weight
        h = self.patch_embedding(x.to(dtype=w.dtype))  # [B, dim, U, h, w]
        h = h.flatten(2).transpose(1, 2)  # [B, U*F, dim], tokens row-major (f, y, x)
        e, e0 = self.time_embed(t, h.dtype)
        if parallel is not None:  # this rank's tokens, and their modulation rows
            e, e0 = (parallel.shard_frames(m, cfg.tokens_per_frame) for m in (e, e0))
            h, cache = parallel.shard(h), parallel.around(cache, timer)
        for i, block in enumerate(self.blocks):
            h = block(h, e0, context, cache, i, timer)
        out = self.head(h, e)
        if parallel is not None:
            out = parallel.gather_tokens(out)
        return unpatchify(out, frames, cfg.grid_height, cfg.grid_width, cfg.patch_size, cfg.out_dim)


def build_model(cfg: ModelConfig, *, seed: int = 0, device="cpu", dtype=torch.float32, init: bool = True,
                init_on_device: bool = False) -> CausalWanModel:
    """Random-init model under ``seed``, on ``device`` in ``dtype``.

    The random init runs on the CPU, so the weights are identical on every device; ``init_on_device=True``
    runs it on ``device`` instead (seeded, but the weights then depend on the device's RNG): for benchmarks,
    where Wan2.1-1.3B's CPU init (single-threaded RNG, about 20 s) would cost more than the measurement.
    With ``init=False`` the parameters are left on the meta device, to be filled by
    :func:`relaxkv_gen.checkpoint.load_checkpoint` without paying for a random init.
    """
    if not init:  # explicit device= everywhere: a torch.device("meta") context is not honoured by every caller
        return CausalWanModel(cfg, device="meta").to(dtype).eval().requires_grad_(False)
    where = torch.device(device if init_on_device else "cpu")
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
        torch.manual_seed(seed)
        model = CausalWanModel(cfg, device=where)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
