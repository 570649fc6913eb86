"""The embedded default model: class-conditional digit diffusion, trained on
scikit-learn's bundled 8x8 digits (upsampled to 16x16), and a digit classifier.

The denoiser is a diffusers ``UNet2DConditionModel`` that cross-attends to a short
learned "prompt" embedding of the class (class 10 is the null prompt used for
classifier-free guidance), predicts epsilon under a DDPM schedule, and is sampled
with DDIM, like Stable Diffusion at a tiny scale. ``python -m asyncfx.zoo.train_digits``
trains both models from a fixed seed; their weights ship in ``asyncfx/zoo/weights``.

Example:
    >>> digits = asyncfx.zoo.digits()
    >>> images = sample_digits(digits.unet, digits, torch.arange(10), steps=50)
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
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                prediction_type="epsilon")
DEFAULT_GUIDANCE = 1.5  # best class accuracy of the trained model (2.0: 77%, 3.0: 12%)


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
    """The default model: denoiser, prompt table, sampler and training facts."""

    unet: nn.Module
    prompt: ClassPrompt
    scheduler: Any
    info: dict[str, Any]

    def condition(self, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """Encoder states for one batched call: null prompts first when guiding."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        with torch.no_grad():
            if guidance == 1.0:
                return self.prompt(labels)
            return self.prompt(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))


def make_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_scheduler(kind: str = "ddim") -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler if kind == "ddim" else DDPMScheduler)(**SCHEDULE)


def digits(weights: str = WEIGHTS) -> Digits:
    """Load the shipped default model (offline, float32, eval mode).

    Example:
        >>> model = asyncfx.zoo.digits()
        >>> model.info["classifier_accuracy"] >= 0.97
        True
    """
    from safetensors.torch import load_file

    unet, prompt = make_unet(), ClassPrompt()
    state = load_file(os.path.join(weights, "digits_unet.safetensors"))
    unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    prompt.load_state_dict({k[7:]: v.float() for k, v in state.items() if k.startswith("prompt.")})
    with open(os.path.join(weights, "digits.json"), encoding="utf-8") as f:
        info = json.load(f)
    return Digits(unet.eval(), prompt.eval(), make_scheduler(), info)


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
                  steps: int = 50, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                  scheduler: Any = None, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """DDIM samples of the given classes, (B, 1, 16, 16) in [-1, 1].

    ``denoiser`` is called like the UNet (``model.unet`` itself, or an asyncfx
    partition of it); with guidance each step is one call on a doubled batch.
    """
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(steps)
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    states = model.condition(labels, guidance)
    with torch.no_grad():
        for t in scheduler.timesteps:
            batch = x if guidance == 1.0 else torch.cat([x, x])
            eps = denoiser(batch, t, encoder_hidden_states=states).sample
            if guidance != 1.0:
                unconditional, conditional = eps.chunk(2)
                eps = unconditional + guidance * (conditional - unconditional)
            x = scheduler.step(eps, t, x).prev_sample
            if on_step is not None:
                on_step()
    return x.clamp(-1, 1)
