"""Train the embedded default model and its classifier (seeded, reproducible, CPU).

    python -m asyncfx.zoo.train_digits [--steps 3000] [--out asyncfx/zoo/weights]

Trains the digit classifier (held-out accuracy printed and stored), then the
class-conditional denoiser with 10% null-prompt dropout for classifier-free guidance
and an exponential moving average of its weights, and writes float16 safetensors and
a JSON file of facts. About 15 minutes on two CPU cores with the defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from asyncfx.zoo.digits_model import (NULL_CLASS, WEIGHTS, ClassPrompt, DigitClassifier, UNET_CONFIG,
                                      SCHEDULE, digits_dataset, held_out_split, make_scheduler, make_unet)

SEED = 0


def train_classifier(images: torch.Tensor, labels: torch.Tensor,
                     epochs: int = 40) -> tuple[DigitClassifier, float]:
    torch.manual_seed(SEED)
    train, held_out = held_out_split(len(images))
    classifier = DigitClassifier()
    optimiser = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(SEED)
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch"):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            x = images[train[batch]]
            x = x + 0.1 * torch.randn(x.shape, generator=generator)  # robust to sampler noise
            loss = nn.functional.cross_entropy(classifier(x), labels[train[batch]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    return classifier, accuracy


def train_denoiser(images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 64,
                   lr: float = 2e-3, ema_decay: float = 0.999) -> tuple[nn.Module, ClassPrompt, float]:
    torch.manual_seed(SEED)
    unet, prompt = make_unet(), ClassPrompt()
    parameters = [*unet.parameters(), *prompt.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    noise = make_scheduler("ddpm")
    ema_unet, ema_prompt = copy.deepcopy(unet), copy.deepcopy(prompt)
    generator = torch.Generator().manual_seed(SEED)
    bar = tqdm(range(steps), desc="denoiser", unit="step")
    running = None
    for step in bar:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch, generator=generator) < 0.1] = NULL_CLASS
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        predicted = unet(noise.add_noise(x0, eps, t), t, encoder_hidden_states=prompt(y)).sample
        loss = nn.functional.mse_loss(predicted, eps)
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for ema, live in zip([*ema_unet.parameters(), *ema_prompt.parameters()], parameters):
                ema.lerp_(live, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    return ema_unet.eval(), ema_prompt.eval(), running


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="denoiser training steps")
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--out", default=WEIGHTS, help="folder for the weights")
    options = parser.parse_args()
    os.makedirs(options.out, exist_ok=True)
    start = time.time()
    images, labels = digits_dataset()
    classifier, accuracy = train_classifier(images, labels, options.classifier_epochs)
    print(f"classifier held-out accuracy: {accuracy:.4f}")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
              os.path.join(options.out, "digits_classifier.safetensors"))
    unet, prompt, loss = train_denoiser(images, labels, options.steps)
    state = {f"unet.{k}": v.half().contiguous() for k, v in unet.state_dict().items()}
    state.update({f"prompt.{k}": v.half().contiguous() for k, v in prompt.state_dict().items()})
    save_file(state, os.path.join(options.out, "digits_unet.safetensors"))
    info = {"seed": SEED, "denoiser_steps": options.steps, "batch": 64, "final_loss": round(loss, 5),
            "classifier_accuracy": round(accuracy, 4), "train_seconds": round(time.time() - start),
            "torch": torch.__version__, "unet_config": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in UNET_CONFIG.items()}}
    with open(os.path.join(options.out, "digits.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"wrote {options.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
