"""The embedded default models: class-conditional digit diffusion, trained on
scikit-learn's bundled 8x8 digits (upsampled to 16x16), and a digit classifier.

Two denoisers learn the same task, both predicting epsilon under a DDPM schedule and
sampled with DDIM, with class 10 as the null class of classifier-free guidance:

- ``"unet"`` (the default): a diffusers ``UNet2DConditionModel`` that cross-attends to
  a short learned "prompt" embedding of the class, like Stable Diffusion at a tiny scale;
- ``"dit"``: a diffusers ``DiTTransformer2DModel`` (patches of 2x2 pixels, adaLN-Zero
  blocks) that embeds the class label itself, like DiT at a tiny scale.

``python -m asyncfx.zoo.train_digits [--model dit]`` trains them from a fixed seed;
their weights ship in ``asyncfx/zoo/weights``.

Example:
    >>> digits = asyncfx.zoo.digits()
    >>> images = sample_digits(digits.denoiser, digits, torch.arange(10), steps=50)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import torch
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")
NULL_CLASS = 10
IMAGE_SIZE = 16
PROMPT_TOKENS = 2
PROMPT_DIM = 32
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=PROMPT_DIM, attention_head_dim=8, norm_num_groups=8,
)
DIT_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, patch_size=2, num_layers=6,
    num_attention_heads=4, attention_head_dim=24, num_embeds_ada_norm=NULL_CLASS,
)
KINDS = ("unet", "dit")
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                prediction_type="epsilon")
DEFAULT_GUIDANCE = 1.5  # best class accuracy of the trained UNet (2.0: 77%, 3.0: 12%)


class ClassPrompt(nn.Module):
    """A learned prompt per class: labels (B,) -> (B, PROMPT_TOKENS, PROMPT_DIM)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(NULL_CLASS + 1, PROMPT_TOKENS * PROMPT_DIM)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(-1, PROMPT_TOKENS, PROMPT_DIM)


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 digits; ``features`` is the penultimate layer (64 values)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclasses.dataclass
class Digits:
    """A trained digits denoiser with what sampling it needs: its conditioning,
    sampler and training facts (``info``, which may name the guidance scale)."""

    denoiser: nn.Module
    prompt: ClassPrompt | None  # the UNet's class prompts; None where the denoiser embeds labels
    scheduler: Any
    info: dict[str, Any]
    kind: str = "unet"

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale the samples are made with."""
        return float(self.info.get("guidance", DEFAULT_GUIDANCE))

    def condition(self, labels: torch.Tensor, guidance: float) -> dict[str, torch.Tensor]:
        """The conditioning keywords of one batched call: null class first when guiding."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if guidance != 1.0:
            labels = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
        if self.prompt is None:
            return {"class_labels": labels}
        return {"encoder_hidden_states": self.prompt(labels)}

    def timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The timestep argument of one call: one for the batch for the UNet, one per sample
        for the transformer (whose timestep embedding takes a vector)."""
        return t if self.kind == "unet" else t.expand(batch)


def make_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIT_CONFIG)


def make_scheduler(kind: str = "ddim") -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler if kind == "ddim" else DDPMScheduler)(**SCHEDULE)


def weight_files(kind: str) -> tuple[str, str]:
    """The names of a denoiser's safetensors and facts files in the weights folder."""
    check_kind(kind)
    return (("digits_unet.safetensors", "digits.json") if kind == "unet"
            else (f"digits_{kind}.safetensors", f"digits_{kind}.json"))


def check_kind(kind: str) -> str:
    """``kind`` if a digits denoiser of that kind ships, else a ValueError naming those that do."""
    if kind not in KINDS:
        raise ValueError(f"no digits denoiser {kind!r}: choose one of {', '.join(KINDS)}.")
    return kind


def digits(weights: str = WEIGHTS, *, kind: str = "unet") -> Digits:
    """Load a shipped digits denoiser, ``"unet"`` or ``"dit"`` (offline, float32, eval mode).

    Example:
        >>> model = asyncfx.zoo.digits(kind="dit")
        >>> model.info["sequential_accuracy"] >= 0.95
        True
    """
    from safetensors.torch import load_file

    tensors, facts = weight_files(kind)
    state = load_file(os.path.join(weights, tensors))
    denoiser = make_unet() if kind == "unet" else make_dit()
    prefix = f"{kind}."  # the file keeps the denoiser's tensors under its kind, the prompt's under "prompt."
    denoiser.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})
    prompt = None
    if kind == "unet":
        prompt = ClassPrompt()
        prompt.load_state_dict({k[7:]: v.float() for k, v in state.items() if k.startswith("prompt.")})
        prompt.eval()
    with open(os.path.join(weights, facts), encoding="utf-8") as f:
        info = json.load(f)
    return Digits(denoiser.eval(), prompt, make_scheduler(), info, kind)


def digits_classifier(weights: str = WEIGHTS) -> DigitClassifier:
    """Load the shipped digit classifier (eval mode)."""
    from safetensors.torch import load_file

    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(os.path.join(weights, "digits_classifier.safetensors")))
    return classifier.eval()


def digits_dataset(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as (N, 1, size, size) images in [-1, 1], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def held_out_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and held-out parts of a dataset of ``n`` items."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - fraction))
    return order[:cut], order[cut:]


def sample_digits(denoiser: Callable[..., Any], model: Digits, labels: torch.Tensor, *,
                  steps: int = 50, guidance: float | None = None, seed: int = 0,
                  scheduler: Any = None, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """DDIM samples of the given classes, (B, 1, 16, 16) in [-1, 1].

    ``denoiser`` is called like ``model.denoiser`` (itself, or an asyncfx partition of
    it); with guidance (``model.guidance`` unless given) each step is one call on a
    doubled batch.
    """
    guidance = model.guidance if guidance is None else guidance
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(steps)
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        condition = model.condition(labels, guidance)
        for t in scheduler.timesteps:
            batch = x if guidance == 1.0 else torch.cat([x, x])
            eps = denoiser(batch, model.timestep(t, len(batch)), **condition).sample
            if guidance != 1.0:
                unconditional, conditional = eps.chunk(2)
                eps = unconditional + guidance * (conditional - unconditional)
            x = scheduler.step(eps, t, x).prev_sample
            if on_step is not None:
                on_step()
    return x.clamp(-1, 1)
