"""Tiny denoisers with random weights, one per architecture family asyncfx targets.

Each builder returns ``(model, args, kwargs)``: a model in eval mode and example
inputs for one denoising call. They are small enough to capture and run in a
second on a CPU and are the test zoo, the demo's fallback model and the
``package.module:function`` model specs of the command line.

Example:
    >>> from asyncfx.zoo import tiny
    >>> model, args, kwargs = tiny.sd_unet()
    >>> out = model(*args, **kwargs)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

Example = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Drawn on the generator's device (the CPU), so the same seed gives the same inputs
    even under ``with torch.device("cuda"):``, where a CPU generator could not draw."""
    return torch.randn(*shape, generator=gen, device=gen.device)


def unet2d(batch: int = 2, size: int = 16, seed: int = 0) -> Example:
    """Unconditional ``UNet2DModel`` (DDPM-style pixel-space UNet)."""
    from diffusers import UNet2DModel

    gen = _seeded(seed)
    model = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    kwargs = {"sample": _randn(gen, batch, 3, size, size), "timestep": torch.tensor(10)}
    return model, (), kwargs


def sd_unet(batch: int = 2, size: int = 8, seed: int = 0, *,
            block_out_channels: tuple[int, ...] = (8, 16), cross_attention_dim: int = 8,
            layers_per_block: int = 1, heads: int | tuple[int, ...] = 2, text_len: int = 4,
            use_linear_projection: bool = False) -> Example:
    """``UNet2DConditionModel`` shaped like Stable Diffusion 1.5/2.1 (cross-attention UNet).

    The defaults are tiny; ``sd21_unet`` below gives the real SD2.1 widths.
    """
    from diffusers import UNet2DConditionModel

    gen = _seeded(seed)
    n = len(block_out_channels)
    model = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
        norm_num_groups=min(32, block_out_channels[0] // 2),
        use_linear_projection=use_linear_projection,
    ).eval()
    kwargs = {
        "sample": _randn(gen, batch, 4, size, size),
        "timestep": torch.tensor(981),
        "encoder_hidden_states": _randn(gen, batch, text_len, cross_attention_dim),
    }
    return model, (), kwargs


def sd21_unet(batch: int = 2, size: int = 64, seed: int = 0) -> Example:
    """An SD2.1-shaped UNet (320/640/1280/1280 channels, 1024-wide text, attention heads of
    width 64) with random weights."""
    # diffusers reads SD2's attention_head_dim as the number of heads per block
    return sd_unet(batch, size, seed, block_out_channels=(320, 640, 1280, 1280),
                   cross_attention_dim=1024, layers_per_block=2, heads=(5, 10, 20, 20), text_len=77,
                   use_linear_projection=True)


def sdxl_unet(batch: int = 2, size: int = 8, seed: int = 0) -> Example:
    """``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (SDXL conditioning)."""
    from diffusers import UNet2DConditionModel

    gen = _seeded(seed)
    model = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True,
    ).eval()
    return model, (), _text_time_inputs(gen, batch, size, tokens=4, width=8, pooled=8, pixels=64)


def sdxl_base_unet(batch: int = 2, size: int = 128, seed: int = 0) -> Example:
    """A UNet shaped like SDXL base 1.0 (320/640/1280 channels, 1/2/10 transformer layers,
    2048-wide text, text_time conditioning; 2.57B parameters) with random weights. Build it
    under ``with torch.device("cuda"):`` to initialise the weights on a GPU."""
    from diffusers import UNet2DConditionModel

    gen = _seeded(seed)
    model = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256, use_linear_projection=True,
    ).eval()
    return model, (), _text_time_inputs(gen, batch, size, tokens=77, width=2048, pooled=1280,
                                        pixels=8 * size)


def _text_time_inputs(gen: torch.Generator, batch: int, size: int, *, tokens: int, width: int,
                      pooled: int, pixels: int) -> dict:
    """Keyword arguments of an SDXL-conditioned UNet: latent, timestep, text states and the
    pooled text and (original size, crop, target size) of ``pixels``-square images."""
    return {
        "sample": _randn(gen, batch, 4, size, size),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": _randn(gen, batch, tokens, width),
        "added_cond_kwargs": {
            "text_embeds": _randn(gen, batch, pooled),
            "time_ids": torch.tensor([[float(pixels), float(pixels), 0.0, 0.0, float(pixels),
                                       float(pixels)]] * batch),
        },
    }


def sd3_transformer(batch: int = 2, size: int = 8, seed: int = 0) -> Example:
    """``SD3Transformer2DModel`` (MMDiT) with joint text/image attention."""
    from diffusers import SD3Transformer2DModel

    gen = _seeded(seed)
    model = SD3Transformer2DModel(
        sample_size=size, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=size,
    ).eval()
    kwargs = {
        "hidden_states": _randn(gen, batch, 4, size, size),
        "encoder_hidden_states": _randn(gen, batch, 5, 16),
        "pooled_projections": _randn(gen, batch, 12),
        "timestep": torch.tensor([700.0] * batch),
    }
    return model, (), kwargs


def flux_transformer(batch: int = 1, size: int = 4, seed: int = 0) -> Example:
    """``FluxTransformer2DModel`` with guidance embedding and rotary position ids."""
    from diffusers import FluxTransformer2DModel

    gen = _seeded(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()
    tokens, text_len = size * size, 3
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // size
    img_ids[:, 2] = torch.arange(tokens) % size
    kwargs = {
        "hidden_states": _randn(gen, batch, tokens, 8),
        "encoder_hidden_states": _randn(gen, batch, text_len, 16),
        "pooled_projections": _randn(gen, batch, 12),
        "timestep": torch.tensor([0.7] * batch),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.tensor([3.5] * batch),
    }
    return model, (), kwargs


def dit_transformer(batch: int = 2, size: int = 8, seed: int = 0) -> Example:
    """Class-conditional ``DiTTransformer2DModel`` with adaLN-Zero."""
    from diffusers import DiTTransformer2DModel

    gen = _seeded(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=size, patch_size=2, norm_num_groups=4,
    ).eval()
    kwargs = {
        "hidden_states": _randn(gen, batch, 4, size, size),
        "timestep": torch.tensor([250] * batch),
        "class_labels": torch.tensor([3, 7] * (batch // 2) + [1] * (batch % 2)),
    }
    return model, (), kwargs


def z_image_transformer(batch: int = 2, size: int = 8, seed: int = 0) -> Example:
    """``ZImageTransformer2DModel``: a list of latents, one per sample (each channels x 1
    frame x size x size), a timestep counting up from 0 to 1, and a list of captions."""
    from diffusers import ZImageTransformer2DModel

    gen = _seeded(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    ).eval()
    kwargs = {
        "x": [_randn(gen, 4, 1, size, size) for _ in range(batch)],
        "t": torch.tensor([0.1] * batch),
        "cap_feats": [_randn(gen, 5, 16) for _ in range(batch)],
    }
    return model, (), kwargs


def svd_unet(batch: int = 1, frames: int = 2, size: int = 8, seed: int = 0) -> Example:
    """``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion shaped)."""
    from diffusers import UNetSpatioTemporalConditionModel

    gen = _seeded(seed)
    model = UNetSpatioTemporalConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),  # the spatio-temporal blocks fix 32 norm groups
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=8, num_attention_heads=(2, 4), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=frames,
    ).eval()
    kwargs = {
        "sample": _randn(gen, batch, frames, 4, size, size),
        "timestep": torch.tensor(20.0),
        "encoder_hidden_states": _randn(gen, batch, 1, 8),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * batch),
    }
    return model, (), kwargs


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of a batch of timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SkipListDenoiser(nn.Module):
    """A hand-written denoiser: conv blocks, a Python list of skip tensors, its own time MLP
    and an optional conditioning vector, in the style of small research code."""

    def __init__(self, channels: int = 8, depth: int = 3, cond_dim: int = 0):
        super().__init__()
        self.time_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, self.time_dim), nn.SiLU(),
                                      nn.Linear(self.time_dim, self.time_dim))
        self.cond_proj = nn.Linear(cond_dim, self.time_dim) if cond_dim else None
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth))
        self.film = nn.ModuleList(nn.Linear(self.time_dim, channels) for _ in range(depth))
        self.up = nn.ModuleList(nn.Conv2d(2 * channels, channels, 3, padding=1) for _ in range(depth))
        self.head = nn.Conv2d(channels, 3, 3, padding=1)
        self.channels = channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None):
        emb = self.time_mlp(sinusoidal_embedding(t, self.channels))
        if self.cond_proj is not None and cond is not None:
            emb = emb + self.cond_proj(cond)
        h = self.stem(x)
        skips = []
        for conv, film in zip(self.down, self.film):
            h = torch.nn.functional.silu(conv(h) + film(emb)[:, :, None, None])
            skips.append(h)
        for conv in self.up:
            h = torch.nn.functional.silu(conv(torch.cat([h, skips.pop()], dim=1)))
        return self.head(h)


def skip_list_denoiser(batch: int = 2, size: int = 8, seed: int = 0) -> Example:
    """The hand-written ``SkipListDenoiser`` with a conditioning vector."""
    gen = _seeded(seed)
    model = SkipListDenoiser(channels=8, depth=3, cond_dim=6).eval()
    args = (_randn(gen, batch, 3, size, size), torch.tensor([5, 5] * (batch // 2) + [5] * (batch % 2)),
            _randn(gen, batch, 6))
    return model, args, {}


ZOO: dict[str, Callable[..., Example]] = {
    "unet2d": unet2d,
    "sd_unet": sd_unet,
    "sdxl_unet": sdxl_unet,
    "sd3_transformer": sd3_transformer,
    "flux_transformer": flux_transformer,
    "dit_transformer": dit_transformer,
    "svd_unet": svd_unet,
    "skip_list_denoiser": skip_list_denoiser,
}


def demo_unet(batch: int = 2, size: int = 16, seed: int = 0) -> Example:
    """A small SD-shaped UNet (32/64/64 channels, three levels) for the demo."""
    return sd_unet(batch, size, seed, block_out_channels=(32, 64, 64), cross_attention_dim=32,
                   layers_per_block=1, heads=8, text_len=8)


def vae(latent_channels: int = 4) -> nn.Module:
    """A tiny ``AutoencoderKL`` (random weights) for pipelines of the tiny denoisers."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0).eval()


def sd_pipeline(unet: nn.Module | None = None, scheduler: Any = None) -> Any:
    """A ``StableDiffusionPipeline`` of the tiny SD-shaped UNet (or ``unet``) and VAE, without
    text encoder: call it with ``prompt_embeds`` and ``negative_prompt_embeds`` (batch x 4
    tokens x 8) instead of prompts. The scheduler is DDIM unless given.

    Example:
        >>> pipe = tiny.sd_pipeline()
        >>> embeds = torch.randn(1, 4, 8)
        >>> image = pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds).images[0]
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae(), text_encoder=None, tokenizer=None,
                                   unet=unet if unet is not None else sd_unet()[0],
                                   scheduler=scheduler or DDIMScheduler(num_train_timesteps=1000,
                                                                        steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
