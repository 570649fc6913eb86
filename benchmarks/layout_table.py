"""Which layout of batch groups x stages the compiler chooses, for real model shapes.

    python benchmarks/layout_table.py [--models sd21,sdxl,sd3] [--devices 4,8] [--steps 50] [--warmup 3]
                                      [--measured --latent 64] [--write benchmarks/RESULTS.md]

Each model is built on the meta device (no weights, no memory) at its real size with a
classifier-free-guidance batch of 2: an SD2.1-shaped UNet at 512 px (latent 64x64), an
SDXL-base-shaped UNet at 1024 px (latent 128x128) and an SD3-medium-shaped transformer
at 1024 px (24 joint blocks, 1536 wide, 154 text tokens). It is captured at the batch of
2 and at a group's batch of 1; every node's FLOPs and bytes are estimated on fake
tensors (``passes/estimate_cost.py``) and priced by each link preset's roofline (its
device's dense throughput and memory bandwidth, its link for the boundary transfers):
predicted times, not measured ones (this machine has no GPU). For each device count the
compiler's candidates ``1xN`` and ``2x(N/2)`` are cut and predicted over a generation
(``partitioner.layouts``), and the row says which it chooses and the speedups over the
whole batch on one device.

With ``--measured`` the models are built with (random) weights and every node is timed
on this CPU at both batches (``asyncfx.profile``'s node timing, the median of three
runs after two untimed), and each preset prices a node at its measured CPU seconds times its roofline
time on the preset over its roofline time on the ``cpu`` preset: what the CPU shows of a
node beyond its FLOPs and bytes (a batch of 1 running at less than half the cost of 2,
per-op overheads) is carried over, scaled to the device. ``--latent`` sets the latent
size of every model (a CPU times SDXL at 1024 px for minutes a call).
"""
from __future__ import annotations

import argparse

import torch
import torch.utils._pytree as pytree

import asyncfx
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.device import PRESETS
from asyncfx.partitioner.layouts import LayoutOption, choose_layout, predicted_generation
from asyncfx.partitioner.make_plan import plan_from_cuts
from asyncfx.partitioner.profile import profile_captured
from asyncfx.partitioner.search import search_cuts
from asyncfx.program import Layout
from asyncfx.zoo import tiny

LINKS = ("nvlink", "pcie4")


def sd3_medium(batch: int, size: int):
    """An SD3-medium-shaped MMDiT (weights on the meta device) and one call of it."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=16, num_layers=24,
                                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                  caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                  pos_embed_max_size=192).eval()
    kwargs = {"hidden_states": torch.randn(batch, 16, size, size), "encoder_hidden_states":
              torch.randn(batch, 154, 4096), "pooled_projections": torch.randn(batch, 2048),
              "timestep": torch.full((batch,), 700.0)}
    return model, (), kwargs


#: name, builder of (model, args, kwargs) at a latent size, the real model's latent size
MODELS = {
    "sd21": ("SD2.1 UNet", lambda size: tiny.sd21_unet(batch=2, size=size), 64),
    "sdxl": ("SDXL-base UNet", lambda size: tiny.sdxl_base_unet(batch=2, size=size), 128),
    "sd3": ("SD3-medium transformer", lambda size: sd3_medium(2, size), 128),
}


def cost_graphs(builder, size: int, measured: bool) -> list[CostGraph]:
    """The cost graphs of the whole batch of 2 and of one group's batch of 1, their nodes
    timed on this CPU if ``measured``."""
    if measured:
        torch.manual_seed(0)
        model, args, kwargs = builder(size)
    else:
        with torch.device("meta"):
            model, args, kwargs = builder(size)
        kwargs = pytree.tree_map_only(  # shapes are all the estimate reads
            torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t, kwargs)
    half = pytree.tree_map_only(torch.Tensor, lambda t: t[:1] if t.dim() and t.shape[0] == 2 else t, kwargs)
    graphs = []
    for call in (kwargs, half):
        captured = asyncfx.capture(model, args, call)
        if measured:
            with torch.no_grad():
                flat = captured.interface.flatten(args, call)
                graphs.append(profile_captured(captured, flat, warmup=2, repeats=3).graph)
        else:
            graphs.append(build_cost_graph(captured))
    return graphs


def measured_scale(graph: CostGraph) -> list[float] | None:
    """Each node's measured CPU seconds over its roofline seconds on the ``cpu`` preset
    (None for a graph not timed)."""
    if any(n.measured_seconds is None for n in graph.nodes):
        return None
    cpu = CostModel(graph, PRESETS["cpu"], "flops").own
    return [n.measured_seconds / predicted if predicted > 0 else 1.0
            for n, predicted in zip(graph.nodes, cpu)]


def rows(name: str, graphs, devices: list[int], steps: int, warmup: int) -> list[str]:
    whole, half = graphs
    lines = []
    for link in LINKS:
        models = [CostModel(graph, PRESETS[link], "flops", scale=measured_scale(graph))
                  for graph in (whole, half)]
        one_device = models[0].sequential() * steps
        for n in devices:
            options = []
            for layout, model in ((Layout(1, n), models[0]), (Layout(2, n // 2), models[1])):
                plan = plan_from_cuts(model, search_cuts(model, layout.stages))
                options.append(LayoutOption(layout, plan, predicted_generation(plan, warmup, steps)))
            chosen, _ = choose_layout(options, one_device)
            speeds = " | ".join(f"{one_device / o.seconds:.2f}x" for o in options)
            lines.append(f"| {name} | {n} | {link} | {speeds} | {chosen.layout} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd21,sdxl,sd3")
    parser.add_argument("--devices", default="4,8")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--measured", action="store_true", help="time every node on this CPU (see above)")
    parser.add_argument("--latent", type=int, help="latent size of every model (default: the real model's)")
    parser.add_argument("--write", help="append the table to this markdown file")
    options = parser.parse_args()
    devices = [int(n) for n in options.devices.split(",")]
    source = ("node times measured on this CPU, scaled to each preset by its roofline" if options.measured
              else "each preset's roofline on estimated FLOPs and bytes")
    lines = [f"{options.steps} steps, warm-up {options.warmup}, a guidance batch of 2; predicted speedup "
             f"over the whole batch on one device ({source}).", "",
             "| model | devices | link | 1xN | 2x(N/2) | chosen |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for key in options.models.split(","):
        name, builder, size = MODELS[key]
        size = options.latent or size
        graphs = cost_graphs(builder, size, options.measured)
        for line in rows(f"{name}, {8 * size} px", graphs, devices, options.steps, options.warmup):
            print(line, flush=True)
            lines.append(line)
    if options.write:
        with open(options.write, "a", encoding="utf-8") as f:
            command = "python benchmarks/layout_table.py" + (" --measured" if options.measured else "")
            f.write(f"\n## Layouts chosen for real model shapes (`{command}`)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
