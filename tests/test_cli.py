"""The command line: the demo that the README runs, and its errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import asyncfx

from asyncfx.app.cli import main


@pytest.mark.parametrize("model, denoiser", [(None, "UNet2DConditionModel"),
                                             ("dit", "DiTTransformer2DModel")])
def test_demo_samples_a_digits_model_and_writes_the_grids(tmp_path, capsys, model, denoiser):
    out = tmp_path / "demo.png"
    chosen = ["--model", model] if model else []
    argv = ["demo", *chosen, "--steps", "4", "--warmup", "2", "--per-class", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model: digits {denoiser}" in printed and f"StagePlan for {denoiser}: " in printed
    assert "layout 1x2 chosen" in printed or "layout 2x1 chosen" in printed  # for the guidance batch
    assert "speedup" in printed and "class accuracy" in printed and "PSNR" in printed
    from PIL import Image

    with Image.open(out) as image:  # three grids of 10 rows, 2 pixels apart, under their captions
        assert image.size == ((3 * 16 + 2 * 8) * 4, (10 * 16 + 9 * 2) * 4 + 18)


def test_bad_options_are_one_line_usage_errors(capsys):
    for argv in (["demo", "--n-devices", "0"], ["demo", "--stride", "3"], ["demo", "--model", "vit"],
                 ["launch"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("asyncfx: error: ") and "\n" not in err


def test_demo_output_folder_must_exist(capsys):
    assert main(["demo", "--out", "no/such/folder/demo.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_refuses_a_bad_forecast_before_sampling(tmp_path, capsys):
    assert main(["demo", "--forecast", "2", "--out", str(tmp_path / "demo.png")]) == 2
    err = capsys.readouterr().err
    assert "forecast must be a number from 0 (off" in err and not (tmp_path / "demo.png").exists()


def test_module_entry_point_runs():
    """In a fresh interpreter, which imports all of asyncfx without importing torch's compiler
    (torch._dynamo, a second or more: a capture or torch.compile imports it when it runs)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "asyncfx", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert {"asyncfx.api", "asyncfx.partitioner.capture", "torch"} <= imported
    assert "torch._dynamo" not in imported


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_profile_compile_show_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("profile", "asyncfx.zoo.tiny:sd_unet", "--out", "profile.json",
                   "--batch", "1", "--height", "8", "--width", "8", "--repeats", "2") == 0
    profiled = capsys.readouterr()
    assert "wrote profile.json" in profiled.out
    assert "capturing" in profiled.err and "building the cost graph" in profiled.err  # never a silent bar
    assert run_cli("compile", "profile.json", "--n-devices", "3", "--link", "nvlink",
                   "--out", "plan.json") == 0
    compiled = capsys.readouterr().out
    assert "3 stage(s), cost=measure (seconds), link=nvlink" in compiled
    assert run_cli("show", "plan.json") == 0
    shown = capsys.readouterr().out
    assert shown.strip() in compiled
    plan = asyncfx.StagePlan.load(tmp_path / "plan.json")
    model, args, kwargs = asyncfx.zoo.tiny.sd_unet(batch=1)
    staged = asyncfx.split(asyncfx.capture(model, args, kwargs), plan)
    torch.testing.assert_close(staged(*args, **kwargs).sample, model(*args, **kwargs).sample,
                               rtol=0, atol=0)


def test_profile_of_a_diffusers_model_directory(tmp_path, capsys):
    model, _, _ = asyncfx.zoo.tiny.sdxl_unet()
    model.save_pretrained(tmp_path / "unet")
    out = tmp_path / "profile.json"
    assert run_cli("profile", str(tmp_path / "unet"), "--out", str(out), "--batch", "2",
                   "--repeats", "1", "--warmup", "0") == 0
    profile = asyncfx.Profile.load(out)
    roles = {i.name: i.role for i in profile.graph.inputs}
    assert roles["added_cond_kwargs_time_ids"] == "condition"
    shapes = {i.name: i.shape for i in profile.graph.inputs}
    assert shapes["encoder_hidden_states"] == [2, 77, 8] and shapes["sample"] == [2, 4, 8, 8]


@pytest.mark.parametrize("name, latent, timestep", [
    ("sd3_transformer", [2, 4, 8, 8], [2]),           # transformers: one timestep per sample
    ("dit_transformer", [2, 4, 8, 8], [2]),
    ("flux_transformer", [2, 1024, 8], [2]),          # packed 2x2-patch tokens of a 64x64 latent
    ("svd_unet", [2, 2, 4, 8, 8], []),                 # UNets: one timestep, as pipelines pass it
])
def test_example_inputs_of_diffusers_model_directories(tmp_path, name, latent, timestep):
    from asyncfx.app.model_spec import load_model

    model, _, _ = getattr(asyncfx.zoo.tiny, name)()
    model.save_pretrained(tmp_path / name)
    loaded, args, kwargs = load_model(str(tmp_path / name), batch=2)
    captured = asyncfx.capture(loaded, args, kwargs)
    shapes = {i.name: list(i.shape) for i in captured.inputs}
    assert shapes[captured.latent_input.name] == latent and shapes["timestep"] == timestep
    with torch.no_grad():
        torch.testing.assert_close(captured(*args, **kwargs).sample, loaded(*args, **kwargs).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["profile", "nope.module:thing", "--out", "p.json"], "cannot load 'nope.module:thing'"),
    (["profile", "missing_dir", "--out", "p.json"], "neither a directory nor package.module:function"),
    (["profile", "asyncfx.zoo.tiny:ZOO", "--out", "p.json"], "is not a function"),
    (["profile", "asyncfx.zoo.tiny:sd_unet", "--out", "no/such/folder/p.json"], "does not exist"),
    (["profile", "asyncfx.zoo.tiny:skip_list_denoiser", "--height", "8", "--width", "4",
      "--out", "p.json"], "takes one size"),
    (["profile", "asyncfx.zoo.tiny:sd_unet", "--dtype", "int8", "--out", "p.json"],
     "not a floating-point torch dtype"),
    (["compile", "missing.json", "--n-devices", "2", "--out", "plan.json"], "no profile at"),
    (["show", "missing.json"], "no stage plan at"),
])
def test_bad_paths_and_specs_give_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("asyncfx: error: ") and message in err


def test_mismatched_files_give_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("profile", "asyncfx.zoo.tiny:skip_list_denoiser", "--out", "profile.json",
                   "--repeats", "1") == 0
    assert run_cli("compile", "profile.json", "--n-devices", "2", "--out", "plan.json") == 0
    capsys.readouterr()
    assert run_cli("show", "profile.json") == 2
    assert "not an asyncfx stage plan" in capsys.readouterr().err
    assert run_cli("compile", "plan.json", "--n-devices", "2", "--out", "x.json") == 2
    assert "is not an asyncfx profile" in capsys.readouterr().err
    assert run_cli("compile", "profile.json", "--n-devices", "999", "--out", "x.json") == 2
    assert "n_devices=999 is more than" in capsys.readouterr().err
    assert run_cli("compile", "profile.json", "--layout", "2x2", "--n-devices", "3", "--out", "x.json") == 2
    assert "--layout 2x2 uses 4 devices but --n-devices is 3" in capsys.readouterr().err
    assert run_cli("compile", "profile.json", "--layout", "2by2", "--out", "x.json") == 2
    assert "a layout is written 'GxN'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert run_cli("compile", "profile.json", "--layout", "2x2", "--out", "grouped.json") == 0
    grouped = asyncfx.StagePlan.load(tmp_path / "grouped.json")
    assert (grouped.layout, grouped.n_stages, grouped.groups) == ("2x2", 2, 2)
    assert "layout 2x2: the profiled call is one group's" in grouped.notes[-1]
    assert "layout 2x2: 2 batch groups of 2 stage(s)" in capsys.readouterr().out
    assert run_cli("simulate", "grouped.json", "--link", "nvlink") == 0
    simulated = capsys.readouterr().out
    assert "2 stages in each of 2 batch groups on 4 devices" in simulated
    assert "layout 2x2: the profiled call is one group's" in simulated


class NoiseLevelDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, noise_level):
        return self.second(torch.tanh(self.first(x) * noise_level[:, None])) + x


def noise_level_denoiser():
    """An example for `asyncfx profile test_cli:noise_level_denoiser`."""
    torch.manual_seed(0)
    return NoiseLevelDenoiser().eval(), (torch.randn(2, 4), torch.full((2,), 80.0)), {}


def test_profile_takes_the_timestep_name_the_partition_is_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("profile", "test_cli:noise_level_denoiser", "--timestep", "noise_level", "--latent", "x",
                   "--out", "profile.json", "--repeats", "1") == 0
    assert run_cli("compile", "profile.json", "--n-devices", "2", "--out", "plan.json") == 0
    model, args, _ = noise_level_denoiser()
    den = asyncfx.partition(model, 2, plan="plan.json", timestep="noise_level", warmup=1, executor="serial")
    den(*args)
    assert den.plan.fingerprint == asyncfx.StagePlan.load("plan.json").fingerprint
    unnamed = asyncfx.partition(model, 2, plan="plan.json", warmup=1, executor="serial")
    with pytest.raises(asyncfx.PlanError, match=r"which inputs are the latent and the timestep "
                                                r"\(latent=, timestep=\)"):
        unnamed(*args)
    assert run_cli("profile", "test_cli:noise_level_denoiser", "--timestep", "sigma",
                   "--out", "p.json") == 2
    assert "timestep='sigma' names none of the tensor or number arguments" in capsys.readouterr().err


def test_show_draws_the_plan_views(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    assert run_cli("profile", "asyncfx.zoo.tiny:sd_unet", "--out", "profile.json",
                   "--batch", "1", "--repeats", "1") == 0
    assert run_cli("compile", "profile.json", "--n-devices", "2", "--out", "plan.json") == 0
    capsys.readouterr()
    assert run_cli("show", "plan.json", "--profile", "profile.json", "--plot", "plan.png") == 0
    assert "wrote plan.png (node costs, cut bytes)" in capsys.readouterr().out
    from PIL import Image

    with Image.open(tmp_path / "plan.png") as image:
        assert image.size == (1200, 800)  # two views of 12 x 4 inches at 100 dpi
    assert run_cli("show", "plan.json", "--profile", "profile.json") == 2
    assert "--profile only adds a view to --plot" in capsys.readouterr().err
    assert run_cli("show", "plan.json", "--plot", "no/such/dir/plan.png") == 2
    assert "does not exist" in capsys.readouterr().err


def test_sample_runs_a_saved_model_from_its_files_without_building_its_weights(tmp_path, capsys):
    model, _, _ = asyncfx.zoo.tiny.sd_unet()
    model.save_pretrained(tmp_path / "unet")
    assert run_cli("sample", str(tmp_path / "unet"), "--steps", "3", "--warmup", "1", "--height", "8",
                   "--width", "8") == 0
    first, second = capsys.readouterr().out.strip().splitlines()[-2:]
    assert first.startswith(f"UNet2DConditionModel from {tmp_path / 'unet'}: 3 steps in ")
    assert first.endswith("on 2 stage(s) (local); sample [2, 4, 8, 8], finite: True")
    params = sum(p.nbytes for p in model.parameters()) / 1e6
    assert second.startswith("weights loaded from the files: ")
    assert f"of the model's {params:.1f} MB" in second


def test_sample_outside_torchrun_says_how_to_launch_it(tmp_path, capsys):
    model, _, _ = asyncfx.zoo.tiny.sd_unet()
    model.save_pretrained(tmp_path / "unet")
    assert run_cli("sample", str(tmp_path / "unet"), "--executor", "distributed") == 2
    assert "launch the command with torchrun --nproc-per-node N -m asyncfx sample" in capsys.readouterr().err
