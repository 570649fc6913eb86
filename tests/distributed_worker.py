"""What every rank of the distributed tests runs (started by test_distributed.py)."""
from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
# the model classes the ranks build, imported with this module, which the server the ranks
# are forked from imports once for all of them
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401

import asyncfx
from asyncfx.zoo.tiny import ZOO
from conftest import ddim, mispriced_example, sample, with_step_cache

LATENT = {"sd_unet": "sample", "sd3_transformer": "hidden_states", "flux_transformer": "hidden_states",
          "mispriced": "sample"}


def example(model_name: str, cache: str | None = None):
    """The model and its call: a tiny zoo model, or the one the FLOP estimate misprices;
    ``cache``: with that step cache (``with_step_cache``)."""
    if model_name == "mispriced":
        return mispriced_example()
    model, _, kwargs = ZOO[model_name]()
    return (with_step_cache(model, cache) if cache else model), kwargs


class _ExitAt:
    """Wraps the denoiser; the rank that should die exits at the given call."""

    def __init__(self, denoiser, exit_at: int | None):
        self.denoiser, self.exit_at, self.calls = denoiser, exit_at, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.exit_at:
            os._exit(0)
        self.calls += 1
        return self.denoiser(*args, **kwargs)


def empty_copy(model):
    """The model built again without weights (on the meta device), as from_pretrained does
    with low_cpu_mem_usage: its buffers stay real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return type(model).from_config(model.config).eval()


def refusals(denoiser, model, kwargs, latent: str) -> dict[str, str]:
    """What a model whose weights were released says when it is called, converted or would
    be captured again (other shapes)."""
    attempts = {"call": lambda: model(**kwargs), "convert": lambda: denoiser.to(torch.float64),
                "other shapes": lambda: denoiser(**{**kwargs, latent: torch.cat([kwargs[latent]] * 2)})}
    refused = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            refused[what] = ""
        except asyncfx.AsyncFXError as exc:
            refused[what] = f"{type(exc).__name__}: {exc}"
    return refused


def refill(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank runs its stage of a plan cut as early as it can be, releases the model's
    other weights, then builds its stage of a plan cut as late as it can be: rank 0's
    new stage reads weights only rank 1 holds, which it must receive intact."""
    from asyncfx.partitioner import lower
    from asyncfx.partitioner.compile import compile_with_costs
    from asyncfx.partitioner.make_plan import plan_from_cuts
    from asyncfx.partitioner.search import Cut
    from asyncfx.runtime.distributed import DistributedExecutor
    from asyncfx.runtime.original_model import release
    from asyncfx.runtime.stage_weights import stage_tensors

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, kwargs = example("mispriced")
        values = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        captured = asyncfx.capture(model, (), kwargs)
        compiled = compile_with_costs(captured, world)
        positions = compiled.model.graph.cut_positions
        early, late = (lower(captured, plan_from_cuts(compiled.model, [Cut(p, "test")]))
                       for p in (positions[0], positions[-1]))
        first = DistributedExecutor(early, torch.device("cpu"))
        release(model, [s.module for s in early.stages], first.modules())
        held_first = sum(t.untyped_storage().nbytes() for t in model.parameters())
        second = DistributedExecutor(late, torch.device("cpu"))
        intact = all(torch.equal(tensor, values[name]) for name, tensor in stage_tensors(second.module))
        release(model, [s.module for s in late.stages], second.modules(), refuse_calls=False)
        facts = {"held first": held_first, "received": second.received_bytes, "intact": intact,
                 "held last": sum(t.untyped_storage().nbytes() for t in model.parameters()),
                 "stage bytes": [[s.param_bytes for s in p.plan.stages] for p in (early, late)]}
        with open(os.path.join(out_dir, f"facts{rank}.json"), "w") as f:
            json.dump(facts, f)
    except Exception as exc:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def run_scenarios(rank: int, out_root: str, scenarios: list[tuple], steps: int) -> None:
    """One process for many scenarios ``(model_name, world, stride, guided_at, rebalance, source,
    forecast, groups[, step cache])``, each with a process group of its own (ranks beyond a scenario's
    world skip it), so that the interpreters, imports and zoo models are made once; results
    go to ``out_root/<i>``.
    ``source``: "captured" partitions a capture made once per model, "model" the model
    itself (whose weights other ranks' stages read are then released), "meta" the model
    built without weights, loading each rank's from ``out_root/weights/<model>``; "refill"
    moves weights between ranks (``refill``)."""
    captures: dict[str, asyncfx.Captured] = {}  # each model captured once by this rank
    for index, scenario in enumerate(scenarios):
        model_name, world, stride, guided_at, rebalance, source, forecast, groups, *cache = scenario
        if rank < world:
            out_dir = os.path.join(out_root, str(index))
            os.makedirs(out_dir, exist_ok=True)
            if source == "captured" and model_name not in captures:
                model, kwargs = example(model_name)
                captures[model_name] = asyncfx.capture(model, (), kwargs)
            if source == "refill":
                refill(rank, world, os.path.join(out_root, f"init{index}"), out_dir)
                continue
            run(rank, world, os.path.join(out_root, f"init{index}"), out_dir, model_name, steps,
                stride=stride, guided_at=guided_at, captured=captures.get(model_name) if source == "captured"
                else None, rebalance=rebalance, forecast=forecast, groups=groups, cache=(cache or [None])[0],
                weights=os.path.join(out_root, "weights", model_name) if source == "meta" else None)


def run(rank: int, world: int, init_file: str, out_dir: str, model_name: str, steps: int,
        dying_rank: int | None = None, timeout_s: float = 60.0, stride: int = 1,
        guided_at: tuple[int, ...] = (), captured: asyncfx.Captured | None = None,
        rebalance: bool = False, weights: str | None = None, forecast: float = 0.0, groups: int = 1,
        cache: str | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)
    try:
        model, kwargs = example(model_name, cache)
        if weights is not None:
            model = empty_copy(model)
        stages = world // groups - (stride - 1)
        denoiser = asyncfx.partition(captured or model, groups * stages, layout=f"{groups}x{stages}",
                                     warmup=3 if rebalance else 2, executor="distributed", stride=stride,
                                     rebalance=rebalance,
                                     scheduler=ddim(steps) if stride == 2 else None, weights=weights,
                                     forecast=forecast)
        caller = _ExitAt(denoiser, 4 if rank == dying_rank else None)
        results, plans, received, first_bytes, substituted = [], [], 0, None, []
        with torch.no_grad():  # two generations: the second starts while the first's last messages fly
            if rebalance:  # the stages are built at step 0: the bytes of the rank's first stage
                caller(**kwargs)
                denoiser.reset()
                first_bytes = denoiser.plan.stages[min(rank % (world // groups), stages - 1)].param_bytes
            for _ in range(2):
                results.append(sample(caller, kwargs, LATENT[model_name], steps=steps, guided_at=guided_at))
                plans.append(json.dumps(denoiser.plan.to_dict()))  # the plan its parallel steps ran
                received += denoiser.executor.received_bytes  # weights a re-cut brought from the other ranks
                streams = denoiser.captures()[0].streams.values()
                substituted += [stream.store.cache_memory.log for stream in streams]
        module = denoiser.executor.module
        facts = {"held": sum(t.nbytes for t in [*module.parameters(), *module.buffers()]),
                 "stage buffers": sum(t.nbytes for t in module.buffers()),
                 "model holds": sum(t.untyped_storage().nbytes() for t in
                                    {t.untyped_storage().data_ptr(): t for t in
                                     [*model.parameters(), *model.buffers()] if not t.is_meta}.values()),
                 "loaded": denoiser.program.weights.loaded_bytes if weights is not None else None,
                 "received": received, "first stage bytes": first_bytes, "substituted": substituted,
                 "refused": None if captured is not None or weights is not None
                 else refusals(denoiser, model, kwargs, LATENT[model_name])}
        denoiser.close()
        torch.save((results, plans), os.path.join(out_dir, f"rank{rank}.pt"))
        with open(os.path.join(out_dir, f"facts{rank}.json"), "w") as f:
            json.dump(facts, f)
    except Exception as exc:  # the test reads what each rank saw
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
