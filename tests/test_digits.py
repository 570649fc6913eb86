"""The embedded digits models (UNet and DiT): shipped weights, accuracy, and exactness
under asyncfx."""
from __future__ import annotations

import os

import pytest
import torch

import asyncfx
from asyncfx.quality import class_accuracy
from asyncfx.zoo import train_digits
from asyncfx.zoo.digits_model import (KINDS, WEIGHTS, digits, digits_classifier, digits_dataset,
                                      held_out_split, sample_digits, weight_files)
from conftest import zoo_captured


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return digits(kind=request.param)


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier()


def test_shipped_files_are_small_and_load_offline(model, classifier):
    sizes = {name: os.path.getsize(os.path.join(WEIGHTS, name)) for name in os.listdir(WEIGHTS)}
    tensors, facts = weight_files(model.kind)
    assert sizes[tensors] <= 5_000_000
    assert {tensors, facts, "digits_classifier.safetensors"} <= set(sizes)
    assert model.info["seed"] == 0 and model.info["denoiser_steps"] > 0
    assert not model.denoiser.training and next(model.denoiser.parameters()).dtype == torch.float32
    assert type(model.denoiser).__name__ == {"unet": "UNet2DConditionModel", "dit": "DiTTransformer2DModel"}[
        model.kind]


def test_unknown_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="no digits denoiser 'vit': choose one of unet, dit"):
        digits(kind="vit")


def test_classifier_reaches_its_documented_held_out_accuracy(model, classifier):
    images, labels = digits_dataset()
    _, held_out = held_out_split(len(images))
    accuracy = class_accuracy(classifier, images[held_out], labels[held_out])
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(model.info["classifier_accuracy"], abs=2e-3)


def test_generated_digits_are_recognised(model, classifier):
    labels = torch.arange(30) % 10
    images = sample_digits(model.denoiser, model, labels, steps=50, seed=1)
    assert class_accuracy(classifier, images, labels) >= 0.9
    if model.kind == "dit":  # measured by the training script on 100 samples at the shipped guidance
        assert model.info["sequential_accuracy"] >= 0.95
        assert model.info["accuracy_by_guidance"][str(model.guidance)] == model.info["sequential_accuracy"]


def test_async_sample_with_warmup_covering_the_steps_equals_sequential(model):
    labels = torch.arange(10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each local worker
    try:
        sequential = sample_digits(model.denoiser, model, labels, steps=10)
        for executor in ("serial", "local"):
            denoiser = asyncfx.partition(model.denoiser, 2, layout="1x2", warmup=10, executor=executor)
            torch.testing.assert_close(sample_digits(denoiser, model, labels, steps=10), sequential,
                                       rtol=0, atol=0)
            denoiser.close()
    finally:
        torch.set_num_threads(threads)


def test_training_script_writes_loadable_weights(tmp_path):
    quick = ["--steps", "3", "--out", str(tmp_path), "--guidance", "2.0", "--check-per-class", "1",
             "--check-steps", "5"]
    with pytest.raises(SystemExit, match="digits_classifier.safetensors is missing: train the classifier "
                                         "first with --model unet"):
        train_digits.main(["--model", "dit", *quick])
    assert os.listdir(tmp_path) == []
    train_digits.main(["--classifier-epochs", "1", *quick])
    train_digits.main(["--model", "dit", *quick])
    for kind in KINDS:
        trained = digits(str(tmp_path), kind=kind)
        assert trained.info["denoiser_steps"] == 3 and trained.guidance == 2.0
        assert set(trained.info["accuracy_by_guidance"]) == {"2.0"}
    digits_classifier(str(tmp_path))


def test_speed_quality_sweep_rows():
    from asyncfx.app.sweep import speed_quality_sweep

    model, classifier = asyncfx.zoo.digits(), asyncfx.zoo.digits_classifier()
    # medians of five timings: the suite's other worker computes meanwhile
    rows = speed_quality_sweep(model, classifier, torch.arange(4), stages=(2,), strides=(1,),
                               warmups=(1, 6), steps=6, repeats=5)
    assert [(r.n_stages, r.stride, r.warmup) for r in rows] == [(2, 1, 1), (2, 1, 6)]
    stale, exact = rows
    assert exact.psnr == float("inf") and exact.ssim == pytest.approx(1.0)   # warm-up covers every step
    assert stale.psnr < 60 and stale.predicted_speedup > 1.0
    assert exact.predicted_speedup == pytest.approx(1.0) and exact.ideal_speedup == pytest.approx(1.0)


def test_speed_quality_sweep_refuses_a_capture_of_another_model():
    from asyncfx.app.sweep import speed_quality_sweep

    refused = r"input 'sample' of UNet2DConditionModel is float32\[8, 1, 16, 16\] but the graph was captured "
    with pytest.raises(asyncfx.AsyncFXError, match=refused + r"for float32\[2, 4, 8, 8\]"):
        speed_quality_sweep(asyncfx.zoo.digits(), asyncfx.zoo.digits_classifier(), torch.arange(4),
                            captured=zoo_captured("sd_unet"))
