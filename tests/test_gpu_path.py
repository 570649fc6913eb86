"""CUDA graphs per stage and SM-partition emulation: the guards on CPU, the real thing on GPUs."""
from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import asyncfx
from asyncfx.api import DeviceError
from asyncfx.errors import AsyncFXError
from asyncfx.runtime.cuda_graphs import GraphedStage
from asyncfx.runtime.green import PartitionError, parse_sm_partitions, sm_partitions
from conftest import ddim, load_benchmark, on_cuda, sample, zoo_example


def test_parse_sm_partitions():
    assert parse_sm_partitions("sm-partitions:4") == (4, torch.device("cuda", 0))
    assert parse_sm_partitions("sm-partitions:2@cuda:1") == (2, torch.device("cuda", 1))
    assert parse_sm_partitions(["cuda:0"]) is None and parse_sm_partitions("cpu") is None
    with pytest.raises(PartitionError, match="not understood"):
        parse_sm_partitions("sm-partitions:four")
    with pytest.raises(PartitionError, match="ask for 1 or more"):
        parse_sm_partitions("sm-partitions:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_sm_partitions_without_cuda_say_so():
    model, args, kwargs = zoo_example("sd_unet")
    with pytest.raises(PartitionError, match="need a CUDA GPU, and torch sees none"):
        asyncfx.partition(model, 2, devices="sm-partitions:2", example_inputs=(args, kwargs))
    with pytest.raises(PartitionError, match="not cpu"):
        sm_partitions(2, "cpu")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"devices": "sm-partitions:3"}, DeviceError, "needs 2 .* write 'sm-partitions:2'"),
    ({"devices": "sm-partitions:2", "executor": "serial"}, DeviceError, "use executor='local'"),
    ({"devices": "cuda:0"}, DeviceError, "is a string; pass a list"),
    ({"cuda_graphs": "yes"}, AsyncFXError, "cuda_graphs must be True, False or None"),
])
def test_device_option_errors(kwargs, error, match):
    model, _, _ = zoo_example("sd_unet")
    with pytest.raises(error, match=match):
        asyncfx.partition(model, 2, **kwargs)


def test_the_serial_executor_needs_no_device_per_stage_on_a_one_gpu_machine(monkeypatch):
    """The serial executor computes every stage in the calling thread where the weights
    are, so a machine with fewer GPUs than stages runs it; the local executor says why not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model, _, kwargs = zoo_example("sd_unet")
    with pytest.raises(DeviceError, match="2 devices are needed and this machine has 1 CUDA device"):
        asyncfx.partition(model, 2)
    den = asyncfx.partition(model, 2, layout="1x2", warmup=2, executor="serial", example_inputs=((), kwargs))
    with torch.no_grad():
        torch.testing.assert_close(den(**kwargs).sample, model(**kwargs).sample, rtol=0, atol=0)


def test_cuda_graphs_option_is_inert_on_cpu_workers():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, warmup=2, cuda_graphs=True, devices=["cpu", "cpu"])
    got = sample(den, kwargs, "sample", steps=5)
    assert den.executor.graphed_slots() == [False, False]
    expected = sample(asyncfx.partition(model, 2, warmup=2, executor="serial"), kwargs, "sample", steps=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    den.close()


class _Affine(nn.Module):
    """Returns a tuple, like every stage module."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return (nn.functional.gelu(self.linear(x)),)


class _Syncing(nn.Module):
    """Reads a value back to the host mid-forward: cannot be captured."""

    def forward(self, x):
        return (x * float(x.sum()),)


@pytest.mark.parametrize("module, graphed", [(_Affine(), True), (_Syncing(), False)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_stage_replays_or_falls_back(module, graphed):
    module = module.cuda()
    stream = torch.cuda.Stream()
    stage = GraphedStage(module, name="stage 0", stream=stream)
    inputs = [torch.randn(4, 8, device="cuda") for _ in range(5)]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), torch.cuda.stream(stream):
        warnings.simplefilter("always")
        outputs = [stage([x]) for x in inputs]
        torch.cuda.synchronize()
    assert stage.graphed is graphed
    assert any("stage 0 cannot be captured" in str(w.message) for w in caught) is not graphed
    with torch.no_grad():
        for x, out in zip(inputs, outputs):  # earlier outputs were not overwritten by later replays
            torch.testing.assert_close(out[0], module(x)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], "sm-partitions:2"])
def test_cuda_graphs_and_partitions_match_serial(devices):
    model, _, kwargs = zoo_example("sd_unet")
    model = copy.deepcopy(model).cuda()
    try:
        den = asyncfx.partition(model, 2, warmup=2, devices=devices)
    except PartitionError as exc:
        pytest.skip(f"this GPU or driver cannot make SM partitions: {exc}")
    cuda_kwargs = on_cuda(kwargs)
    got = sample(den, cuda_kwargs, "sample", steps=8)
    assert all(den.executor.graphed_slots())
    # the same kernels in the caller's thread (TF32 convolutions would part from a CPU run)
    serial = asyncfx.partition(model, 2, warmup=2, executor="serial")
    torch.testing.assert_close(got, sample(serial, cuda_kwargs, "sample", steps=8), rtol=1e-3, atol=1e-3)
    den.close()


def _stride_two_on(devices, device, steps=8):
    """A stride-2 sampling of the tiny SD UNet, weights and inputs on ``device``, with the
    local executor on ``devices`` and with the serial executor."""
    model, _, kwargs = zoo_example("sd_unet")
    model = copy.deepcopy(model).to(device)
    inputs = on_cuda(kwargs) if device.startswith("cuda") else kwargs
    den = asyncfx.partition(model, 2, warmup=2, stride=2, scheduler=ddim(steps), devices=devices)
    got = sample(den, inputs, "sample", steps=steps)
    serial = asyncfx.partition(model, 2, warmup=2, stride=2, scheduler=ddim(steps), executor="serial")
    return den, got, sample(serial, inputs, "sample", steps=steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stride_two_on_sm_partitions_matches_serial():
    """Stride 2 on N + 1 partitions (the extra one computes the last stage of each round's
    first step), every slot replayed as a CUDA graph, gives what the serial executor gives."""
    try:
        den, got, expected = _stride_two_on("sm-partitions:3", "cuda:0")
    except PartitionError as exc:
        pytest.skip(f"this GPU or driver cannot make SM partitions: {exc}")
    assert den.executor.graphed_slots() == [True] * 3
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    den.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_workers_capturing_at_the_same_step_all_end_up_graphed():
    """Four workers reach their capture call in the same step; torch.cuda.graph empties
    the allocator's cache first, which it does not support while another capture is under
    way, so captures take turns and none falls back to eager."""
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(copy.deepcopy(model).cuda(), 4, warmup=2, devices=["cuda:0"] * 4)
    cuda_kwargs = on_cuda(kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(den, cuda_kwargs, "sample", steps=8)
    assert not [w for w in caught if "cannot be captured" in str(w.message)]
    assert den.executor.graphed_slots() == [True] * 4
    den.close()


class _TimedChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, sample, timestep):
        for layer in self.layers:
            sample = torch.tanh(layer(sample)) + timestep / 1000
        return sample


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_stages_wait_for_inputs_the_caller_is_still_writing(cuda_graphs):
    """The latent is written on the caller's stream after a long kernel; with a CPU
    timestep nothing synchronises the host, so only the stage streams' wait keeps them
    from reading it early."""
    model = _TimedChain().cuda()
    example = (torch.randn(2, 64, device="cuda"), torch.tensor(999.0))
    latents = [torch.randn(2, 64, device="cuda") for _ in range(6)]

    def run(denoiser):
        outputs = []
        for step, latent in enumerate(latents):
            torch.cuda._sleep(20_000_000)   # the caller's stream stays busy for milliseconds,
            x = latent * 1.0                # then writes the latent: the host does not wait
            outputs.append(denoiser(x, torch.tensor(999.0 - step)).cpu())
        return outputs

    den = asyncfx.partition(model, 2, warmup=1, example_inputs=(example, {}), devices=["cuda:0"] * 2,
                            cuda_graphs=cuda_graphs)
    expected = run(asyncfx.partition(model, 2, warmup=1, example_inputs=(example, {}), executor="serial"))
    for got, want in zip(run(den), expected):  # an early read would be off by O(1), not 1e-4
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    den.close()


class _EarlyAndLate(nn.Module):
    """One output made at once, then a long chain of matrix products (milliseconds on a GPU)."""

    def __init__(self, size: int = 2048, depth: int = 48):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size, size) / size ** 0.5)
        self.depth = depth

    def forward(self, x):
        early = x * 2
        late = early
        for _ in range(self.depth):
            late = torch.tanh(late @ self.weight)
        return early, late


def _early_and_late_stage() -> tuple[torch.fx.GraphModule, list[str]]:
    module = torch.fx.symbolic_trace(_EarlyAndLate().cuda())
    return module, [node.name for node in module.graph.output_node().args[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_worker_copies_every_boundary_output_eagerly_and_from_its_cuda_graph():
    from asyncfx.runtime.local import _Round, _Worker
    from asyncfx.schedule import StageRun

    module, names = _early_and_late_stage()
    device = torch.device("cuda:0")
    # the executor only copies to other devices; to the same one the copy path runs alike
    worker = _Worker(0, module, device, 1, destinations={name: [device] for name in names},
                     cuda_graph=True, name="stage 0")
    worker.start()
    try:
        for step in range(5):  # eager, eager, captured, replayed, replayed
            x = torch.randn(2048, 2048, device=device)
            run, handed = StageRun(0, step, step, step, None, 0), _Round(1)
            worker.tasks.put((handed, run, [x], [], None, ()))
            handed.wait()
            assert handed.error is None, handed.error
            outputs, copies = handed.made[run]
            with torch.no_grad():
                expected = module(x)
            for name, out, want in zip(names, outputs, expected):
                copied = copies[f"{name}@{device}"]
                assert copied.data_ptr() != out.data_ptr()
                torch.testing.assert_close(copied, out, rtol=0, atol=0)
                torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        assert worker.graphed is not None and worker.graphed.graphed
    finally:
        worker.tasks.put(None)
        worker.join(timeout=10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copies_start_when_the_stage_makes_the_tensor_not_when_it_ends():
    from asyncfx.runtime.cuda_graphs import EAGER_CALLS_BEFORE_CAPTURE
    from asyncfx.runtime.hooks import with_send_hooks
    from asyncfx.runtime.local import _Sender

    module, (early, _) = _early_and_late_stage()
    compute, copier = torch.cuda.Stream(), torch.cuda.Stream()
    sender = _Sender({early: [torch.device("cuda:0")]}, copier)
    stage = GraphedStage(with_send_hooks(module, [early], sender.made), name="stage 0", stream=compute)
    x = torch.randn(2048, 2048, device="cuda")
    margins = []
    for _ in range(EAGER_CALLS_BEFORE_CAPTURE + 3):  # eager calls, the capture, replays
        sender.begin(stores=True)
        with torch.no_grad(), torch.cuda.stream(compute):
            outputs = stage([x])
            if stage.graphed:
                sender.replayed()
            finished = torch.cuda.Event(enable_timing=True)
            finished.record(compute)
        copied = torch.cuda.Event(enable_timing=True)
        copied.record(copier)
        torch.cuda.synchronize()
        torch.testing.assert_close(sender.end()[f"{early}@cuda:0"], outputs[0], rtol=0, atol=0)
        margins.append(copied.elapsed_time(finished))  # ms from the copy's end to the stage's end
    assert stage.graphed
    assert min(margins) > 0.5, margins  # each copy was done while the matrix products still ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sm_partitions_are_disjoint_groups():
    try:
        parts = sm_partitions(2)
    except PartitionError as exc:
        pytest.skip(f"this GPU or driver cannot make SM partitions: {exc}")
    total = torch.cuda.get_device_properties(0).multi_processor_count
    assert len(parts) == 2 and parts[0].sm_count == parts[1].sm_count
    assert sum(p.sm_count for p in parts) <= total
    x = torch.randn(256, 256, device="cuda")
    with torch.cuda.stream(parts[1].stream):
        y = x @ x
    parts[1].stream.synchronize()
    torch.testing.assert_close(y, x @ x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stage_times_are_measured_on_the_current_streams_partition():
    """Refinement's CUDA graphs are captured on the current stream, so under an SM
    partition's stream they run on its quarter of the SMs: a compute-bound model is much
    slower there than on the whole GPU."""
    from asyncfx.partitioner.refine import measure_stages

    try:
        quarter = sm_partitions(4)[0]
    except PartitionError as exc:
        pytest.skip(f"this GPU or driver cannot make SM partitions: {exc}")
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)]).cuda().half()
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.half)
    captured = asyncfx.capture(model, (x,))
    plan = asyncfx.compile(captured, 2, cost="uniform")
    whole = measure_stages(captured, copy.deepcopy(plan), (x,)).measured_sequential
    with torch.cuda.stream(quarter.stream):
        on_quarter = measure_stages(captured, copy.deepcopy(plan), (x,)).measured_sequential
    assert on_quarter > 2 * whole


def _gpu_benchmark():
    return load_benchmark("gpu")


def test_gpu_benchmark_dry_run_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    assert _gpu_benchmark().main(["--dry-run", "--models", "sd21", "--steps", "5", "--warmup", "2",
                                  "--refine-rounds", "0", "--write", str(results)]) == 0
    text = results.read_text()
    assert "## GPU: emulated devices on CPU (dry run)" in text
    rows = [line for line in text.splitlines() if line.startswith("| sd21 |")]
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert {r.count("|") for r in rows} == {header.count("|")}
    assert all(float(r.split(" | ")[-1].rstrip(" |")) < 1e-4 for r in rows)  # as the serial executor
    assert [r.split(" | ")[1] for r in rows] == ["N=2, stride 1", "N=4, stride 1", "N=3, stride 2"]
    assert all("CPU workers" in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_benchmark_refuses_to_run_without_a_gpu(capsys):
    assert _gpu_benchmark().main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the parts failing on a machine without CUDA")
def test_gpu_check_runs_every_part_and_records_each_status(tmp_path):
    """The one-run GPU check keeps going after a failing part, so a single GPU session
    returns every result it could get."""
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["sh", str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable}, cwd=script.parent.parent)
    statuses = dict(line.split() for line in (tmp_path / "status.txt").read_text().splitlines())
    assert list(statuses) == ["environment", "sm-partitions", "gpu-tests", "benchmark"]
    assert statuses["sm-partitions"] == "1" and statuses["benchmark"] == "2"
    assert statuses["gpu-tests"] == "0"  # every GPU test skips here
    assert done.returncode != 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "SM partitions need a CUDA GPU" in log and "no CUDA device here" in log
    assert log == done.stdout


def _sm_resource(count, alignment=0, minimum=0):
    return SimpleNamespace(sm=SimpleNamespace(smCount=count, smCoscheduledAlignment=alignment,
                                              minSmPartitionSize=minimum))


@pytest.mark.parametrize("total, count, major, reported, expected", [
    (132, 4, 9, (0, 0), 32),      # H100 SXM: 4 x 32 SMs (the design notes' emulation)
    (132, 2, 9, (0, 0), 64),
    (132, 3, 9, (0, 0), 40),
    (108, 4, 8, (0, 0), 26),      # A100: granularity 2
    (132, 4, 9, (16, 8), 32),     # a driver that reports its own alignment
])
def test_sm_group_size_respects_the_partition_granularity(total, count, major, reported, expected):
    from asyncfx.runtime.green import _group_size

    assert _group_size(total, count, _sm_resource(total, *reported), major) == expected


def test_too_many_sm_partitions_is_a_clear_error():
    from asyncfx.runtime.green import _group_size

    with pytest.raises(PartitionError,
                       match="too few for 20 partitions of at least 8 SMs; ask for at most 16"):
        _group_size(132, 20, _sm_resource(132), 9)


def test_driver_failures_name_the_call_and_the_cuda_error():
    from asyncfx.runtime.green import _call

    class Status(int):
        name = "CUDA_ERROR_NOT_SUPPORTED"

    driver = SimpleNamespace(
        CUresult=SimpleNamespace(CUDA_SUCCESS=0),
        cuGetErrorString=lambda status: (0, b"operation not supported"),
        cuGreenCtxCreate=lambda *args: (Status(801), None),
        cuDeviceGet=lambda ordinal: (0, ordinal + 10))
    assert _call(driver, "cuDeviceGet", 1) == 11
    with pytest.raises(PartitionError, match=r"cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED "
                                             r"\(operation not supported\)"):
        _call(driver, "cuGreenCtxCreate", None, 0, 0)


@pytest.mark.parametrize("name, billions", [("sd21", 0.866), ("sdxl", 2.567)])
def test_gpu_benchmark_models_have_the_real_sizes_and_run_on_their_inputs(name, billions):
    """Built by gpu.py's own build() on the meta device (no memory, no arithmetic), as a GPU
    run builds them under ``torch.device("cuda")``: the shapes and dtypes it will see."""
    benchmark = _gpu_benchmark()
    label, factory = benchmark.MODELS[name]
    model, kwargs = benchmark.build(SimpleNamespace(device=torch.device("meta")), factory, torch.float16)
    with torch.no_grad():
        out = model(**kwargs).sample
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)
    assert out.shape == kwargs["sample"].shape and out.dtype == torch.float16 and out.is_meta
    assert f"latent {kwargs['sample'].shape[-1]}" in label and kwargs["sample"].shape[0] == 2


def test_tiny_inputs_are_drawn_on_the_cpu_under_any_default_device():
    """A CPU generator cannot draw CUDA tensors: the zoo draws on the CPU, so building under
    ``with torch.device("cuda"):`` works and gives the same inputs as on a CPU."""
    from asyncfx.zoo import tiny

    _, _, on_cpu = tiny.sd_unet()
    with torch.device("meta"):
        _, _, elsewhere = tiny.sd_unet()
    assert elsewhere["sample"].device.type == "cpu"
    torch.testing.assert_close(elsewhere["sample"], on_cpu["sample"], rtol=0, atol=0)
