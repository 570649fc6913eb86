"""Which layout of batch groups x stages the compiler chooses, for real model shapes.

    python benchmarks/layout_table.py [--models sd21,sdxl,sd3] [--devices 4,8] [--steps 50] [--warmup 3]
                                      [--write benchmarks/RESULTS.md]

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
"""
from __future__ import annotations

import argparse

import torch
import torch.utils._pytree as pytree

import asyncfx
from asyncfx.partitioner.cost_graph import build_cost_graph
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.device import PRESETS
from asyncfx.partitioner.layouts import LayoutOption, choose_layout, predicted_generation
from asyncfx.partitioner.make_plan import plan_from_cuts
from asyncfx.partitioner.search import search_cuts
from asyncfx.program import Layout
from asyncfx.zoo import tiny

LINKS = ("nvlink", "pcie4")


def sd3_medium(batch: int, size: int = 128):
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


MODELS = {
    "sd21": ("SD2.1 UNet, 512 px", lambda: tiny.sd21_unet(batch=2, size=64)),
    "sdxl": ("SDXL-base UNet, 1024 px", lambda: tiny.sdxl_base_unet(batch=2, size=128)),
    "sd3": ("SD3-medium transformer, 1024 px", lambda: sd3_medium(2)),
}


def cost_graphs(builder):
    """The cost graphs of the whole batch of 2 and of one group's batch of 1."""
    with torch.device("meta"):
        model, args, kwargs = builder()
    kwargs = pytree.tree_map_only(  # shapes are all the estimate reads
        torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t, kwargs)
    half = pytree.tree_map_only(torch.Tensor, lambda t: t[:1] if t.dim() and t.shape[0] == 2 else t, kwargs)
    return [build_cost_graph(asyncfx.capture(model, args, call)) for call in (kwargs, half)]


def rows(name: str, graphs, devices: list[int], steps: int, warmup: int) -> list[str]:
    whole, half = graphs
    lines = []
    for link in LINKS:
        models = [CostModel(graph, PRESETS[link], "flops") for graph in (whole, half)]
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
    parser.add_argument("--write", help="append the table to this markdown file")
    options = parser.parse_args()
    devices = [int(n) for n in options.devices.split(",")]
    lines = [f"{options.steps} steps, warm-up {options.warmup}, a guidance batch of 2; predicted speedup "
             "over the whole batch on one device (roofline of each preset on estimated FLOPs and bytes).", "",
             "| model | devices | link | 1xN | 2x(N/2) | chosen |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for key in options.models.split(","):
        name, builder = MODELS[key]
        for line in rows(name, cost_graphs(builder), devices, options.steps, options.warmup):
            print(line, flush=True)
            lines.append(line)
    if options.write:
        with open(options.write, "a", encoding="utf-8") as f:
            f.write("\n## Layouts chosen for real model shapes (`python benchmarks/layout_table.py`)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
