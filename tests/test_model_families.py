"""More diffusers denoiser families, partitioned as they come (tiny configs, random weights).

The test zoo covers the model kinds every test runs on; these are the other image and
video transformers users bring, each checked once: the warm-up step equals the model,
the next one reads stale values, and the local workers compute what the serial
reference does.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import pytest
import torch
from diffusers import (AuraFlowTransformer2DModel, ChromaTransformer2DModel, CogVideoXTransformer3DModel,
                       CogView4Transformer2DModel, Flux2Transformer2DModel, GlmImageTransformer2DModel,
                       HunyuanDiT2DModel, HunyuanVideoFramepackTransformer3DModel,
                       HunyuanVideoTransformer3DModel, LTX2VideoTransformer3DModel,
                       LTXVideoTransformer3DModel, Lumina2Transformer2DModel, MochiTransformer3DModel,
                       NucleusMoEImageTransformer2DModel, PixArtTransformer2DModel,
                       QwenImageTransformer2DModel, SanaTransformer2DModel, StableAudioDiTModel, UNet1DModel,
                       UNet3DConditionModel, WanTransformer3DModel, WanVACETransformer3DModel)
from diffusers.models.embeddings import get_1d_rotary_pos_embed, get_2d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor, Flux2KVCache, Flux2KVLayerCache, Flux2KVParallelSelfAttnProcessor)
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache, GlmImageLayerKVCache
from torch import nn

import asyncfx
from asyncfx.zoo import tiny
from conftest import leaves


def _inputs(seed: int = 0, **shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def pixart():
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    return model, {**_inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 8, 32)),
                   "added_cond_kwargs": {"aspect_ratio": None, "resolution": None}}, 1000.0


def wan():
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return model, _inputs(hidden_states=(1, 4, 2, 8, 8), encoder_hidden_states=(1, 12, 16)), 1000.0


def cogvideox():  # at its config's size: other sizes write a table through .data (refused)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)
    return model, _inputs(hidden_states=(2, 2, 4, 8, 8), encoder_hidden_states=(2, 8, 8)), 1000.0


def ltx_video():
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                       caption_channels=16)
    return model, {**_inputs(hidden_states=(2, 32, 4), encoder_hidden_states=(2, 8, 16)),
                   "encoder_attention_mask": torch.ones(2, 8), "num_frames": 2, "height": 4,
                   "width": 4}, 1000.0


def hunyuan_video():
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    return model, {**_inputs(hidden_states=(1, 4, 1, 8, 8), encoder_hidden_states=(1, 12, 16),
                             pooled_projections=(1, 8)),
                   "encoder_attention_mask": torch.ones(1, 12), "guidance": torch.tensor([3.5])}, 1000.0


def auraflow():
    model = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        out_channels=4, pos_embed_max_size=256)
    return model, _inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 8, 32)), 1000.0


def sana():
    model = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
        cross_attention_dim=8, caption_channels=8, sample_size=32)
    return model, _inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 8, 8)), 1000.0


def qwen_image():
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    return model, {**_inputs(hidden_states=(1, 16, 16), encoder_hidden_states=(1, 7, 16)),
                   "encoder_hidden_states_mask": torch.ones(1, 7), "img_shapes": [(1, 4, 4)]}, 1.0


def cogview4():
    model = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                       num_attention_heads=4, out_channels=4, text_embed_dim=8,
                                       time_embed_dim=8, condition_dim=4)
    sizes = torch.tensor([[64, 64]] * 2)
    return model, {**_inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 6, 8)),
                   "original_size": sizes, "target_size": sizes, "crop_coords": torch.zeros(2, 2)}, 1000.0


def chroma():
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1)
    return model, {**_inputs(hidden_states=(1, 16, 4), encoder_hidden_states=(1, 7, 32)),
                   "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3)}, 1.0


def flux2(guidance_embeds: bool = True):
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    ids = torch.Generator().manual_seed(1)
    return model, {**_inputs(hidden_states=(1, 16, 16), encoder_hidden_states=(1, 7, 32)),
                   "img_ids": torch.randint(0, 4, (1, 16, 4), generator=ids),
                   "txt_ids": torch.randint(0, 4, (1, 7, 4), generator=ids),
                   **({"guidance": torch.tensor([3.5])} if guidance_embeds else {})}, 1.0


def wan_vace():  # Wan with control video latents added in its VACE layers
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8)
    return model, {**_inputs(hidden_states=(1, 4, 2, 8, 8), encoder_hidden_states=(1, 12, 16),
                             control_hidden_states=(1, 8, 2, 8, 8)),
                   "control_hidden_states_scale": torch.ones(1)}, 1000.0


def unet3d():  # text-to-video UNet (ModelScope-shaped)
    model = UNet3DConditionModel(
        block_out_channels=(4, 8), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8, attention_head_dim=2,
        in_channels=4, out_channels=4, layers_per_block=1, sample_size=16)
    return model, _inputs(sample=(2, 4, 3, 8, 8), encoder_hidden_states=(2, 4, 8)), 1000.0


def unet1d():  # a 1-D UNet (trajectories, audio)
    model = UNet1DModel(
        block_out_channels=(8, 8, 16, 16), in_channels=14, out_channels=14, time_embedding_type="positional",
        use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1.0, out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D", act_fn="swish",
        down_block_types=("DownResnetBlock1D",) * 4, up_block_types=("UpResnetBlock1D",) * 3)
    return model, _inputs(sample=(4, 14, 16)), 1000.0


def mochi():  # picks each prompt's valid tokens with nonzero: sizes that depend on the mask
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=16)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0  # the second prompt is shorter
    return model, {**_inputs(hidden_states=(2, 4, 2, 8, 8), encoder_hidden_states=(2, 7, 16)),
                   "encoder_attention_mask": mask}, 1000.0


def glm_image():  # zeroes the dropped prior tokens' embeddings through a boolean index
    model = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=12, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=32)
    drop = torch.zeros(2, 16, dtype=torch.bool)
    drop[1] = True  # the unconditional half of the batch
    return model, {**_inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 5, 12)),
                   "prior_token_id": torch.arange(32).reshape(2, 16), "prior_token_drop": drop,
                   "target_size": torch.tensor([[64.0, 64.0]] * 2), "crop_coords": torch.zeros(2, 2)}, 1000.0


def nucleus_moe():  # routes tokens to experts by value: per-expert sizes read with tolist()
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), num_experts=4, moe_intermediate_dim=8,
        dense_moe_strategy="all_moe", capacity_factors=1.0)
    for parameter in model.parameters():  # its experts' weights are made with torch.empty
        nn.init.normal_(parameter, std=0.2)
    return model, {**_inputs(hidden_states=(1, 16, 16), encoder_hidden_states=(1, 5, 16)),
                   "img_shapes": [(1, 4, 4)],
                   "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.bool)}, 1.0


def hunyuan_dit():  # two text encoders, style and image-size embeddings, rotary tables as inputs
    model = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=2, cross_attention_dim=24, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=5, text_len_t5=6)
    return model, {**_inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 5, 24),
                             encoder_hidden_states_t5=(2, 6, 32)),
                   "text_embedding_mask": torch.ones(2, 5, dtype=torch.long),
                   "text_embedding_mask_t5": torch.ones(2, 6, dtype=torch.long),
                   "image_meta_size": torch.tensor([[64, 64, 64, 64, 0, 0]] * 2),
                   "style": torch.zeros(2, dtype=torch.long),
                   "image_rotary_emb": get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))}, 1000.0


def stable_audio():  # a 1-D audio latent, global conditioning and rotary tables
    model = StableAudioDiTModel(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=16, cross_attention_input_dim=12)
    rotary = get_1d_rotary_pos_embed(4, 17, use_real=True, repeat_interleave_real=False)
    return model, {**_inputs(hidden_states=(2, 4, 16), encoder_hidden_states=(2, 5, 12),
                             global_hidden_states=(2, 1, 16)), "rotary_embedding": rotary}, 1.0


def framepack():  # keeps the valid prompt tokens (a count read from the mask) next to the latent's
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=12,
        has_clean_x_embedder=True)
    latents = _inputs(hidden_states=(1, 4, 2, 8, 8), latents_clean=(1, 4, 1, 8, 8),
                      latents_history_2x=(1, 4, 2, 8, 8), latents_history_4x=(1, 4, 4, 8, 8))
    return model, {**latents, **_inputs(1, encoder_hidden_states=(1, 6, 16), pooled_projections=(1, 8),
                                        image_embeds=(1, 3, 12)),
                   "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   "indices_latents": torch.arange(2),
                   "indices_latents_clean": torch.tensor([0]), "indices_latents_history_2x": torch.arange(2),
                   "indices_latents_history_4x": torch.arange(4), "guidance": torch.tensor([6000.0])}, 1000.0


FAMILIES = {f.__name__: f for f in (pixart, wan, cogvideox, ltx_video, hunyuan_video, auraflow, sana,
                                    qwen_image, cogview4, chroma, flux2, wan_vace, unet3d, unet1d, mochi,
                                    glm_image, nucleus_moe, hunyuan_dit, stable_audio, framepack)}


@contextlib.contextmanager
def _serial_and_local(model: Any, warmup: int) -> Iterator[dict[str, asyncfx.AsyncDenoiser]]:
    """``model`` partitioned in two for the serial and the local executor, with every worker
    and the serial run on one thread and the same plan (never re-cut from timings), so that
    the two are bitwise equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {executor: asyncfx.partition(model, 2, layout="1x2", warmup=warmup, executor=executor,
                                       rebalance=False)
            for executor in ("serial", "local")}
    try:
        yield runs
    finally:
        torch.set_num_threads(threads)
        runs["local"].close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_family_partitions_into_stale_stages(family):
    torch.manual_seed(0)
    model, kwargs, scale = FAMILIES[family]()
    model.eval()
    latent = "sample" if "sample" in kwargs else "hidden_states"
    batch = kwargs[latent].shape[0]
    calls = [{**kwargs, latent: kwargs[latent] * (1 - 0.1 * step),
              "timestep": torch.full((batch,), scale * (0.9 - 0.1 * step))} for step in range(3)]
    captured = asyncfx.capture(model, (), calls[0])
    with _serial_and_local(captured, warmup=1) as runs, torch.no_grad():
        for step, call in enumerate(calls):
            expected = leaves(model(**call))[0]
            serial, local = (leaves(runs[e](**call))[0] for e in ("serial", "local"))
            torch.testing.assert_close(local, serial, rtol=0, atol=0)
            assert torch.equal(serial, expected) == (step == 0), step  # warm-up, then stale


def test_a_latent_passed_as_a_list_is_one_latent_per_sample():
    """Z-Image takes a list of latents, one per sample (and returns a list): each is a latent
    input, read stale by the later stages like any latent value, none of them conditioning."""
    model, _, kwargs = tiny.z_image_transformer()
    calls = [{**kwargs, "x": [latent * (1 - 0.1 * step) for latent in kwargs["x"]],
              "t": torch.full((2,), 0.1 + 0.1 * step)} for step in range(3)]
    captured = asyncfx.capture(model, (), calls[0])
    roles = [(i.name, str(i.role)) for i in captured.inputs]
    assert roles[:3] == [("x[0]", "latent"), ("x[1]", "latent"), ("t", "timestep")]
    with _serial_and_local(captured, warmup=1) as runs, torch.no_grad():
        for step, call in enumerate(calls):
            expected = leaves(model(**call))
            serial, local = (leaves(runs[e](**call)) for e in ("serial", "local"))
            torch.testing.assert_close(local, serial, rtol=0, atol=0)
            assert [torch.equal(s, e) for s, e in zip(serial, expected)] == [step == 0] * 2, step


def test_a_table_the_model_makes_at_its_first_call_is_not_an_edit():
    model, _, kwargs = tiny.z_image_transformer()  # its rotary embedder keeps a table made at the first call
    den = asyncfx.partition(model, 2, warmup=2, executor="serial")
    captures = set()
    for _ in range(2):
        for step in range(3):
            den(**{**kwargs, "t": torch.full((2,), 0.1 + 0.1 * step)})
        captures.add(id(den.interface))
    assert len(captures) == 1  # the second generation did not capture again
    assert model.rope_embedder.freqs_cis is not None


def ltx2():
    """LTX-2 denoises a video and an audio latent together and predicts both."""
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=1, caption_channels=16, base_height=64, base_width=64).eval()
    frames, height, width, audio_frames = 2, 2, 2, 5
    inputs = _inputs(hidden_states=(1, frames * height * width, 4), audio_hidden_states=(1, audio_frames, 4),
                     encoder_hidden_states=(1, 6, 16), audio_encoder_hidden_states=(1, 6, 16))
    return model, {**inputs, "num_frames": frames, "height": height, "width": width,
                   "audio_num_frames": audio_frames, "return_dict": False}


def test_several_latent_arguments_can_be_named():
    model, kwargs = ltx2()
    latents = ["hidden_states", "audio_hidden_states"]
    calls = [{**kwargs, **{name: kwargs[name] * (1 - 0.1 * step) for name in latents},
              "timestep": torch.full((1,), 0.9 - 0.1 * step), "sigma": torch.full((1,), 0.9 - 0.1 * step)}
             for step in range(3)]
    unnamed = (r"returns a tensor shaped like its input\(s\) \['audio_hidden_states'\], which are taken "
               r"as conditioning.*latent=\['hidden_states', 'audio_hidden_states'\]")
    with pytest.warns(UserWarning, match=unnamed):
        asyncfx.capture(model, (), calls[0])  # the audio latent not named: its prediction tells
    with pytest.raises(asyncfx.CaptureError, match="latent='audio_latents' names no argument of LTX2"):
        asyncfx.partition(model, 2, latent=["hidden_states", "audio_latents"])
    with pytest.raises(asyncfx.CaptureError, match=r"latent=\[\] must name the noisy-sample argument"):
        asyncfx.partition(model, 2, latent=[])
    den = asyncfx.partition(model, 2, warmup=1, executor="serial", latent=latents)
    with torch.no_grad():
        for step, call in enumerate(calls):
            expected, got = leaves(model(**call)), leaves(den(**call))
            assert [torch.equal(g, e) for g, e in zip(got, expected)] == [step == 0] * 2, step
    roles = {name: role for name, role in zip(den.interface.names, den.interface.roles)}
    assert [roles[name] for name in latents] == ["latent", "latent"] and roles["timestep"] == "timestep"


def test_a_mask_with_another_count_of_valid_tokens_runs_in_the_same_graph():
    """Mochi's valid prompt tokens are picked by value inside the graph, so prompts of other
    lengths need no new capture; a generation with them warms up exactly as before."""
    torch.manual_seed(0)
    model, inputs, _ = mochi()
    model.eval()
    den, interfaces = asyncfx.partition(model, 2, warmup=1, executor="serial"), []
    with torch.no_grad():
        for valid in (7, 3):  # one generation each
            mask = inputs["encoder_attention_mask"].clone()
            mask[1, valid:] = 0
            for step in range(2):
                call = {**inputs, "encoder_attention_mask": mask,
                        "timestep": torch.full((2,), 900.0 - 100 * step)}
                expected, got = leaves(model(**call))[0], leaves(den(**call))[0]
                assert torch.equal(got, expected) == (step == 0), (valid, step)
            interfaces.append(den.interface)
    assert interfaces[0] is interfaces[1]  # the shorter prompt was not a new capture


def test_a_family_that_reads_tensor_values_into_python_is_refused_clearly():
    """Lumina 2 reads the prompt lengths into Python: it has no one graph for every input
    of a shape."""
    torch.manual_seed(0)
    lumina = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128), cap_feat_dim=8).eval()
    inputs = {**_inputs(hidden_states=(2, 4, 8, 8), encoder_hidden_states=(2, 5, 8)),
              "timestep": torch.tensor([0.1, 0.1]),
              "encoder_attention_mask": torch.ones(2, 5, dtype=torch.bool)}
    # the line export stops at differs between torch releases; it is always in Lumina 2's forward
    with pytest.raises(asyncfx.CaptureError, match=r"(?s)transformer_lumina2.py:\d+ in forward: `.*"
                                                   r"x.tolist\(\)"):
        asyncfx.capture(lumina, (), inputs)


def _flux2_klein_kv_generation(model, reference: torch.Tensor, steps: int = 5) -> list[torch.Tensor]:
    """Flux.2 Klein's KV pipeline: the first call takes the reference image's tokens before the
    latent's and returns a cache of their keys and values, which every later call reads."""
    _, inputs, _ = flux2(guidance_embeds=False)
    latent, latent_ids = inputs.pop("hidden_states"), inputs.pop("img_ids")
    reference_ids = torch.zeros(1, reference.shape[1], 4, dtype=latent_ids.dtype)
    predictions, cache = [], None
    for step in range(steps):
        timestep = torch.full((1,), 1.0 - step / steps)
        if cache is None:
            noise, cache = model(hidden_states=torch.cat([reference, latent], 1), timestep=timestep,
                                 img_ids=torch.cat([reference_ids, latent_ids], 1), kv_cache_mode="extract",
                                 num_ref_tokens=reference.shape[1], return_dict=False, **inputs)
        else:
            noise = model(hidden_states=latent, timestep=timestep, img_ids=latent_ids, kv_cache=cache,
                          kv_cache_mode="cached", return_dict=False, **inputs)[0]
        predictions.append(noise)
        latent = latent - 0.1 * noise
    return predictions


def test_a_cache_object_that_one_call_returns_and_later_calls_read():
    """The KV cache the first call returns is an output of that call's graph and the input of
    the later calls' graph once its classes are registered: each generation runs its first
    call and the later calls' warm-up as the model does, then reads stale values."""
    torch.manual_seed(0)
    model = flux2(guidance_embeds=False)[0].eval()
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    references = [torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed)) for seed in (2, 3)]
    den = asyncfx.partition(model, 2, warmup=2, executor="serial")
    with torch.no_grad(), pytest.raises(asyncfx.CaptureError, match=r"returns a Flux2KVCache .*"
                                        r"asyncfx.register_tensor_container\(Flux2KVCache\)"):
        _flux2_klein_kv_generation(den, references[0])
    asyncfx.register_tensor_container(Flux2KVCache)
    asyncfx.register_tensor_container(Flux2KVLayerCache)
    with _serial_and_local(model, warmup=2) as runs, torch.no_grad():
        for reference in references:  # two generations, each with its own cache
            expected = _flux2_klein_kv_generation(model, reference)
            serial, local = (_flux2_klein_kv_generation(runs[e], reference) for e in ("serial", "local"))
            for got_serial, got_local in zip(serial, local):
                torch.testing.assert_close(got_local, got_serial, rtol=0, atol=0)
            # the extract call, then the cached calls' two warm-up steps, then stale reads
            assert [torch.equal(g, e) for g, e in zip(serial, expected)] == [True] * 3 + [False] * 2
    interface = runs["serial"].interface  # of the capture of the cached calls, by placeholder
    roles = dict(zip(interface.names, interface.roles))
    assert {name: role for name, role in roles.items() if name.startswith("kv_cache")} == {
        f"kv_cache_{blocks}_0__{key}": "condition"
        for blocks in ("double_block_caches", "single_block_caches") for key in ("k_ref", "v_ref")}


def _glm_image_kv_generation(model, reference: torch.Tensor, steps: int = 4) -> list[torch.Tensor]:
    """GLM-Image's pipeline with a reference image: one call at timestep 0 fills the KV cache
    with the reference's keys and values, then each step makes a conditional call that reads
    the cache and an unconditional one that skips it."""
    generator = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(1, 5, 12, generator=generator) for _ in range(2))
    prior = torch.randint(0, 32, (1, 16), generator=generator)
    sizes = {"target_size": torch.tensor([[64.0, 64.0]]), "crop_coords": torch.zeros(1, 2)}
    caches = GlmImageKVCache(num_layers=2)
    caches.set_mode("write")
    model(hidden_states=reference, encoder_hidden_states=prompt[:, :0], prior_token_id=prior,
          prior_token_drop=torch.zeros_like(prior, dtype=torch.bool), timestep=torch.zeros(1),
          kv_caches=caches, **sizes)
    caches.next_sample()
    latents, predictions = torch.randn(1, 4, 8, 8, generator=generator), []
    for step in range(steps):
        timestep = torch.full((1,), 1000.0 * (1 - step / steps))
        noise = []
        for mode, embeds, drop in (("read", prompt, False), ("skip", negative, True)):
            caches.set_mode(mode)
            noise.append(model(hidden_states=latents, encoder_hidden_states=embeds, prior_token_id=prior,
                               prior_token_drop=torch.full_like(prior, drop, dtype=torch.bool),
                               timestep=timestep, kv_caches=caches, return_dict=False, **sizes)[0])
        predictions.append(noise[1] + 2.0 * (noise[0] - noise[1]))
        latents = latents - 0.1 * predictions[-1]
    return predictions


def test_a_call_that_fills_a_cache_it_is_given_runs_the_original_model():
    """GLM-Image's first call appends each layer's keys and values to the cache it is given:
    a graph cannot write into its arguments, so that call runs the original model, and is no
    step of the generation. The three kinds of call are three captures, kept for the next
    generation."""
    torch.manual_seed(0)
    model = glm_image()[0].eval()
    reference = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pytest.raises(asyncfx.CaptureError, match=(
            r"argument 'kv_caches' of GlmImageTransformer2DModel is a GlmImageKVCache, an object of a class "
            r"torch.export does not know.*register_tensor_container\(GlmImageKVCache\); "
            r"asyncfx.register_tensor_container\(GlmImageLayerKVCache\)")):
        _glm_image_kv_generation(asyncfx.partition(model, 2, warmup=2, executor="serial"), reference)
    asyncfx.register_tensor_container(GlmImageKVCache)
    asyncfx.register_tensor_container(GlmImageLayerKVCache)
    with _serial_and_local(model, warmup=2) as runs, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".* writes into")  # one timestep: it prepares
        expected = _glm_image_kv_generation(model, reference)
        for generation in range(2):
            serial, local = (_glm_image_kv_generation(runs[e], reference) for e in ("serial", "local"))
            for got_serial, got_local in zip(serial, local):
                torch.testing.assert_close(got_local, got_serial, rtol=0, atol=0)
            # two warm-up steps, then stale reads: the filling call is no step
            assert [torch.equal(g, e) for g, e in zip(serial, expected)] == [True] * 2 + [False] * 2
            builds = runs["serial"].captures()
            if generation == 0:
                first, captures = serial, {id(build) for build in builds}
        for got, before in zip(serial, first):  # the next generation: no new capture, same values
            torch.testing.assert_close(got, before, rtol=0, atol=0)
        assert {id(build) for build in builds} == captures
    assert sorted(build.call.written_arguments for build in builds) == [(), (), ("kv_caches",)]


def test_a_capture_of_a_call_that_fills_its_argument_refuses_to_run():
    torch.manual_seed(0)
    model = glm_image()[0].eval()
    asyncfx.register_tensor_container(GlmImageKVCache)
    asyncfx.register_tensor_container(GlmImageLayerKVCache)
    caches = GlmImageKVCache(num_layers=2)
    caches.set_mode("write")
    call = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 0, 12),
            "prior_token_id": torch.zeros(1, 16, dtype=torch.long),
            "prior_token_drop": torch.zeros(1, 16, dtype=torch.bool), "timestep": torch.zeros(1),
            "target_size": torch.tensor([[64.0, 64.0]]), "crop_coords": torch.zeros(1, 2),
            "kv_caches": caches}
    captured = asyncfx.capture(model, (), call)
    assert captured.interface.written_arguments == ("kv_caches",)
    assert caches[0].k_caches == []  # the trace wrote into torch.export's copy, not into the caller's cache
    with pytest.raises(asyncfx.CaptureError, match=r"GlmImageTransformer2DModel.forward writes into its "
                       r"argument\(s\) 'kv_caches' \(a cache it fills\).*call the original model"):
        captured(**call)
    assert caches[0].k_caches == []  # refused before anything ran
