"""The classify pass: latent / step / static on hand-made graphs and on the zoo."""
from __future__ import annotations

import pytest
import torch
from torch import fx

import asyncfx
from asyncfx.passes.meta import module_path
from asyncfx.passes import classify
from asyncfx.passes.meta import VALUE_CLASS, ValueClass
from conftest import zoo_captured

LATENT, STEP, STATIC = ValueClass.LATENT, ValueClass.STEP, ValueClass.STATIC


def test_hand_made_graph_has_the_known_classes():
    graph = fx.Graph()
    x, t, cond = graph.placeholder("x"), graph.placeholder("t"), graph.placeholder("cond")
    weight = graph.get_attr("weight")
    time_embedding = graph.call_function(torch.sin, (t,))
    text_projection = graph.call_function(torch.matmul, (cond, weight))
    modulation = graph.call_function(torch.add, (time_embedding, text_projection))
    hidden = graph.call_function(torch.mul, (x, modulation))
    constant = graph.call_function(torch.ones, ((2,),))
    scaled_constant = graph.call_function(torch.mul, (constant, 2.0))
    noise = graph.call_function(torch.ops.aten.randn.default, ([2],))
    graph.output((hidden, scaled_constant, noise))

    counts = classify(graph, {"x": LATENT, "t": STEP, "cond": STATIC})

    expected = {x: LATENT, t: STEP, cond: STATIC, weight: STATIC, time_embedding: STEP,
                text_projection: STATIC, modulation: STEP, hidden: LATENT, constant: STATIC,
                scaled_constant: STATIC, noise: LATENT}
    assert {n: n.meta[VALUE_CLASS] for n in expected} == expected
    assert graph.output_node().meta[VALUE_CLASS] is LATENT
    assert counts == {LATENT: 4, STEP: 3, STATIC: 5}


def test_unclassified_input_is_an_error():
    graph = fx.Graph()
    graph.output(graph.placeholder("x"))
    with pytest.raises(ValueError, match="placeholder 'x' has no class"):
        classify(graph, {})


def classes_by_module(captured: asyncfx.Captured, fragment: str) -> set[ValueClass]:
    """Classes of the compute nodes whose module path contains ``fragment``."""
    found = {n.meta[VALUE_CLASS] for n in captured.graph.nodes
             if n.op == "call_function" and fragment in module_path(n)}
    assert found, f"no node from a module matching {fragment!r}"
    return found


def test_hand_written_denoiser():
    captured = zoo_captured("skip_list_denoiser")
    assert classes_by_module(captured, "time_mlp") == {STEP}
    assert classes_by_module(captured, "cond_proj") == {STATIC}
    assert classes_by_module(captured, "film") == {STEP}       # time + conditioning
    assert classes_by_module(captured, "stem") == {LATENT}
    assert classes_by_module(captured, "head") == {LATENT}


def test_sd_unet_time_mlp_is_step_and_cross_attention_kv_static():
    captured = zoo_captured("sd_unet")
    assert classes_by_module(captured, "time_embedding") == {STEP}
    assert classes_by_module(captured, "attn2.to_k") == {STATIC}
    assert classes_by_module(captured, "attn2.to_v") == {STATIC}
    assert classes_by_module(captured, "attn2.to_q") == {LATENT}
    assert classes_by_module(captured, "attn1.to_k") == {LATENT}   # self-attention
    assert classes_by_module(captured, "conv_out") == {LATENT}


def test_sdxl_added_conditioning_is_static_until_it_meets_the_timestep():
    captured = zoo_captured("sdxl_unet")
    assert classes_by_module(captured, "add_embedding") == {STATIC}
    assert classes_by_module(captured, "time_embedding") == {STEP}
    assert classes_by_module(captured, "time_emb_proj") == {STEP}


def test_transformers_text_paths_static_and_modulation_step():
    flux = zoo_captured("flux_transformer")
    assert classes_by_module(flux, "context_embedder") == {STATIC}
    assert classes_by_module(flux, "pos_embed") == {STATIC}       # rotary ids
    assert classes_by_module(flux, "time_text_embed.timestep_embedder") == {STEP}
    assert classes_by_module(flux, "time_text_embed.guidance_embedder") == {STATIC}
    assert classes_by_module(flux, "time_text_embed.text_embedder") == {STATIC}  # pooled text
    assert classes_by_module(flux, "norm1.linear") == {STEP}      # AdaLN modulation
    sd3 = zoo_captured("sd3_transformer")
    assert classes_by_module(sd3, "context_embedder") == {STATIC}
    assert classes_by_module(sd3, "time_text_embed.timestep_embedder") == {STEP}
    assert classes_by_module(sd3, "time_text_embed.text_embedder") == {STATIC}
    dit = zoo_captured("dit_transformer")
    assert classes_by_module(dit, "class_embedder") == {STATIC}
    assert classes_by_module(dit, "timestep_embedder") == {STEP}


def test_every_zoo_node_is_classified_and_values_flow_upward():
    for name in ("sd_unet", "svd_unet", "flux_transformer"):
        captured = zoo_captured(name)
        for node in captured.graph.nodes:
            inputs = [i.meta[VALUE_CLASS] for i in node.all_input_nodes]
            assert node.meta[VALUE_CLASS] >= max(inputs, default=STATIC), node.format_node()
