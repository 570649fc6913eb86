"""Train the embedded default models and the classifier (seeded, reproducible, CPU).

    python -m asyncfx.zoo.train_digits [--model unet|dit] [--steps 3000] [--out asyncfx/zoo/weights]

``--model unet`` (the default) trains the digit classifier (held-out accuracy printed
and stored) and then the UNet; ``--model dit`` trains the transformer and reads the
classifier already in ``--out``. A denoiser learns with 10% null-class dropout for
classifier-free guidance and an exponential moving average of its weights; the script
then picks the guidance scale whose sequential samples the classifier recognises best,
and writes float16 safetensors and a JSON file of facts. With the defaults each model
takes 15-25 minutes on two CPU cores (``train_seconds`` in its JSON file).
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

from asyncfx.quality import class_accuracy
from asyncfx.zoo.digits_model import (DIT_CONFIG, KINDS, NULL_CLASS, WEIGHTS, ClassPrompt, DigitClassifier,
                                      Digits, UNET_CONFIG, SCHEDULE, digits_classifier, digits_dataset,
                                      held_out_split, make_dit, make_scheduler, make_unet, sample_digits,
                                      weight_files)

SEED = 0
TRAINING_STEPS = {"unet": 3000, "dit": 4000}
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)


@torch.enable_grad()
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
    return classifier, held_out_accuracy(classifier, images, labels)


def held_out_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The classifier's accuracy on the digits it was not trained on."""
    _, held_out = held_out_split(len(images))
    return class_accuracy(classifier, images[held_out], labels[held_out])


def untrained(kind: str) -> Digits:
    """A fresh denoiser of this kind, in training mode, with its class prompts if it has them."""
    if kind == "unet":
        return Digits(make_unet(), ClassPrompt(), None, {}, kind)
    dit = make_dit()
    for name, module in dit.named_modules():
        if hasattr(module, "token_drop"):  # labels are dropped once per sample below, not in every block
            module.dropout_prob = 0.0
        if name.endswith("norm1.linear") or name == "proj_out_2":
            nn.init.zeros_(module.weight)  # adaLN-Zero: each block starts as the identity, the output at 0
            nn.init.zeros_(module.bias)
    return Digits(dit, None, None, {}, kind)


@torch.enable_grad()
def train_denoiser(kind: str, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 64,
                   lr: float = 2e-3, ema_decay: float = 0.999) -> tuple[Digits, float]:
    torch.manual_seed(SEED)
    live = untrained(kind)
    modules = [m for m in (live.denoiser, live.prompt) if m is not None]
    parameters = [p for m in modules for p in m.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    noise = make_scheduler("ddpm")
    ema = copy.deepcopy(live)
    ema_parameters = [p for m in (ema.denoiser, ema.prompt) if m is not None for p in m.parameters()]
    generator = torch.Generator().manual_seed(SEED)
    bar = tqdm(range(steps), desc=kind, unit="step")
    running = None
    for step in bar:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch, generator=generator) < 0.1] = NULL_CLASS
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        predicted = live.denoiser(noise.add_noise(x0, eps, t), t, **live.condition(y, 1.0)).sample
        loss = nn.functional.mse_loss(predicted, eps)
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for average, current in zip(ema_parameters, parameters):
                average.lerp_(current, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    for module in (ema.denoiser, ema.prompt):
        if module is not None:
            module.eval()
    ema.scheduler = make_scheduler()
    return ema, running


def best_guidance(model: Digits, classifier: DigitClassifier, scales: tuple[float, ...], per_class: int,
                  steps: int = 50) -> tuple[float, dict[str, float]]:
    """The guidance scale whose sequential samples the classifier recognises best, and the
    class accuracy at each scale."""
    labels = torch.arange(10).repeat(per_class)
    accuracy = {}
    with torch.no_grad():
        for scale in scales:
            images = sample_digits(model.denoiser, model, labels, steps=steps, guidance=scale, seed=1)
            accuracy[str(scale)] = round(class_accuracy(classifier, images, labels), 4)
    best = max(scales, key=lambda scale: accuracy[str(scale)])
    return best, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=KINDS, default="unet", help="which denoiser to train")
    parser.add_argument("--steps", type=int, default=None, help="denoiser training steps (default: "
                        + ", ".join(f"{steps} for {kind}" for kind, steps in TRAINING_STEPS.items()) + ")")
    parser.add_argument("--classifier-epochs", type=int, default=40, help="with --model unet")
    parser.add_argument("--out", default=WEIGHTS, help="folder for the weights")
    parser.add_argument("--guidance", type=float, default=None, help="the guidance scale to ship "
                        f"(default: the best of {', '.join(map(str, GUIDANCE_SCALES))})")
    parser.add_argument("--check-per-class", type=int, default=10,
                        help="sequential samples of each digit that measure class accuracy")
    parser.add_argument("--check-steps", type=int, default=50,
                        help="sampling steps of the samples that measure class accuracy")
    options = parser.parse_args(argv)
    options.steps = options.steps or TRAINING_STEPS[options.model]
    os.makedirs(options.out, exist_ok=True)
    start = time.time()
    images, labels = digits_dataset()
    classifier, accuracy = classifier_for(options.model, images, labels, options.out,
                                          options.classifier_epochs)
    model, loss = train_denoiser(options.model, images, labels, options.steps)
    scales = GUIDANCE_SCALES if options.guidance is None else (options.guidance,)
    guidance, accuracies = best_guidance(model, classifier, scales, options.check_per_class,
                                         options.check_steps)
    print(f"sequential class accuracy by guidance scale: {accuracies}; chosen {guidance}")
    config = UNET_CONFIG if options.model == "unet" else DIT_CONFIG
    info = {"seed": SEED, "denoiser_steps": options.steps, "batch": 64, "final_loss": round(loss, 5),
            "classifier_accuracy": round(accuracy, 4), "guidance": guidance,
            "sequential_accuracy": accuracies[str(guidance)], "accuracy_by_guidance": accuracies,
            "train_seconds": round(time.time() - start), "torch": torch.__version__,
            f"{options.model}_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    save_denoiser(model, info, options.out)
    print(f"wrote {options.out} in {time.time() - start:.0f} s")


def classifier_for(kind: str, images: torch.Tensor, labels: torch.Tensor, folder: str,
                   epochs: int) -> tuple[DigitClassifier, float]:
    """The classifier and its held-out accuracy: trained and written with the UNet, read
    from ``folder`` for the other models."""
    path = os.path.join(folder, "digits_classifier.safetensors")
    if kind == "unet":
        classifier, accuracy = train_classifier(images, labels, epochs)
        print(f"classifier held-out accuracy: {accuracy:.4f}")
        save_safetensors(classifier.state_dict(), path)
        return classifier, accuracy
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: train the classifier first with --model unet --out {folder}.")
    classifier = digits_classifier(folder)
    return classifier, held_out_accuracy(classifier, images, labels)


def save_denoiser(model: Digits, info: dict, folder: str) -> None:
    """Write the denoiser (and its class prompts) in float16 and its facts, as ``digits()`` reads them."""
    tensors, facts = weight_files(model.kind)
    state = {f"{model.kind}.{k}": v.half() for k, v in model.denoiser.state_dict().items()}
    if model.prompt is not None:
        state.update({f"prompt.{k}": v.half() for k, v in model.prompt.state_dict().items()})
    save_safetensors(state, os.path.join(folder, tensors))
    with open(os.path.join(folder, facts), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


def save_safetensors(state: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path)


if __name__ == "__main__":
    main()
