"""diffusers pipelines with asyncfx.partition() as their denoiser, end to end.

Tiny components are built from configs with random weights; prompt embeddings are
passed directly, so no tokenizer or text encoder is needed.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import (AnimateDiffPipeline, AutoencoderKL, AutoencoderKLTemporalDecoder, AutoencoderKLWan,
                       ControlNetModel, DDIMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, HeunDiscreteScheduler, MotionAdapter,
                       PNDMScheduler, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline,
                       StableDiffusionControlNetPipeline, StableDiffusionPAGPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, StableVideoDiffusionPipeline, UNet2DConditionModel,
                       UNetMotionModel, UNetSpatioTemporalConditionModel, WanImageToVideoPipeline,
                       WanPipeline, WanTransformer3DModel, ZImagePipeline)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import asyncfx
from asyncfx.zoo import tiny
from conftest import streams

STEPS = 6


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    return tiny.vae(latent_channels)


@contextlib.contextmanager
def one_thread():
    """The serial executor on one thread sums like each single-threaded local worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def images(pipe, **kwargs) -> np.ndarray:
    result = pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                  output_type="np", **kwargs)
    return np.asarray(result.frames if hasattr(result, "frames") else result.images)


def check_drop_in(pipe, attribute: str, **kwargs) -> asyncfx.AsyncDenoiser:
    model = getattr(pipe, attribute)
    with one_thread():
        original = images(pipe, **kwargs)
        setattr(pipe, attribute, asyncfx.partition(model, 2, layout="1x2", warmup=2, executor="serial"))
        serial = images(pipe, **kwargs)
        async_denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=2)
        setattr(pipe, attribute, async_denoiser)
        local = images(pipe, **kwargs)
    async_denoiser.close()
    assert np.isfinite(local).all() and local.shape == original.shape
    np.testing.assert_array_equal(local, serial)
    difference = np.abs(local - original).mean()
    print(f"{type(pipe).__name__}: mean |async - original| = {difference:.4f} on [0, 1] pixels")
    assert difference < 0.25  # random weights; same composition, not the same pixels
    assert not np.array_equal(local, original)  # the stale steps did run
    return async_denoiser


def sd_pipeline(unet: UNet2DConditionModel, scheduler=None) -> StableDiffusionPipeline:
    return tiny.sd_pipeline(unet, scheduler or DDIMScheduler(num_train_timesteps=1000))


def test_stable_diffusion_pipeline():
    unet, _, _ = tiny.sd_unet()
    pipe = sd_pipeline(unet)
    generator = torch.Generator().manual_seed(1)
    check_drop_in(pipe, "unet", prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator))


@pytest.mark.parametrize("scheduler, second_stream", [
    (HeunDiscreteScheduler, STEPS - 1),  # a second-order correction at every timestep after the first
    (functools.partial(PNDMScheduler, skip_prk_steps=True), 1),  # SD 1.5's default: its second timestep twice
])
def test_stable_diffusion_pipeline_with_schedulers_that_call_twice_at_a_timestep(scheduler, second_stream):
    """The second call at a timestep is a stream of its own, also with stride 2, which
    walks the scheduler's timesteps listed once."""
    unet, _, _ = tiny.sd_unet()
    pipe = sd_pipeline(unet, scheduler())
    generator = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator))
    den = check_drop_in(pipe, "unet", **embeds)
    assert [(stream.start, stream.step) for stream in streams(den)] == [(0, STEPS), (1, second_stream)]
    runs = {}
    with one_thread():
        for executor in ("serial", "local"):
            pipe.unet = asyncfx.partition(unet, 2, warmup=1, stride=2, scheduler=pipe.scheduler,
                                          executor=executor)
            runs[executor] = images(pipe, **embeds)
    np.testing.assert_array_equal(runs["local"], runs["serial"])
    assert [stream.times.scheduler_index for stream in streams(pipe.unet)] == [0, 1]


def test_stable_diffusion_pag_pipeline():
    """Perturbed-attention guidance sets processors on the self-attention layers it finds
    in pipe.unet.named_modules() at each generation's start, and restores them at its end."""
    unet, _, _ = tiny.sd_unet()
    pipe = StableDiffusionPAGPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                      scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False,
                                      pag_applied_layers=["mid"])
    generator = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator))
    without_pag = images(pipe, pag_scale=0.0, **embeds)
    den = check_drop_in(pipe, "unet", pag_scale=3.0, **embeds)
    captured, first = den.interface, images(pipe, pag_scale=3.0, **embeds)
    assert den.interface is captured  # the same processors set again: no new capture
    assert not np.array_equal(first, images(pipe, pag_scale=0.0, **embeds))
    assert not np.array_equal(first, without_pag)


def controlnet_pipeline() -> tuple[StableDiffusionControlNetPipeline, dict]:
    unet, _, _ = tiny.sd_unet()
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).eval()
    with torch.no_grad():  # from_unet zeroes its output convolutions: give them weights
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    pipe = StableDiffusionControlNetPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                             controlnet=controlnet,
                                             scheduler=DDIMScheduler(num_train_timesteps=1000),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    generator = torch.Generator().manual_seed(6)
    return pipe, dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      image=torch.rand(1, 3, 16, 16, generator=generator), height=16, width=16)


def test_stable_diffusion_controlnet_pipeline():
    pipe, inputs = controlnet_pipeline()
    # the residuals change at every step; the stale steps must still run (the check asserts it)
    check_drop_in(pipe, "unet", **inputs)


def ip_adapter_weights(unet: UNet2DConditionModel, image_embed_dim: int) -> dict:
    """Random IP-Adapter weights in the layout diffusers loads: an image projection to 4
    tokens and key/value projections for each cross-attention layer, sized from the layer."""
    generator = torch.Generator().manual_seed(2)
    width = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * width, image_embed_dim, generator=generator) / 4,
                  "proj.bias": torch.zeros(4 * width), "norm.weight": torch.ones(width),
                  "norm.bias": torch.zeros(width)}
    cross_attentions = [unet.get_submodule(name.removesuffix(".processor"))
                        for name in unet.attn_processors if name.endswith("attn2.processor")]
    ip_adapter = {}
    for key, attention in zip(range(1, 2 * len(cross_attentions), 2), cross_attentions):
        for projection in ("to_k", "to_v"):
            shape = (getattr(attention, projection).out_features, width)
            ip_adapter[f"{key}.{projection}_ip.weight"] = torch.randn(shape, generator=generator) / 4
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_stable_diffusion_ip_adapter_pipeline():
    """The image embeddings are a list in added_cond_kwargs; set_ip_adapter_scale() after
    partitioning changes a number the capture made a constant, so it must re-capture."""
    unet, _, _ = tiny.sd_unet()
    unet._load_ip_adapter_weights([ip_adapter_weights(unet, image_embed_dim=6)])
    pipe = sd_pipeline(unet)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  ip_adapter_image_embeds=[torch.randn(2, 1, 6, generator=generator)])  # negative, positive
    den = check_drop_in(pipe, "unet", **inputs)
    assert "added_cond_kwargs_image_embeds_0_" in den.interface.names
    with one_thread():
        pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=2, executor="serial")
        full_scale = images(pipe, **inputs)
        pipe.set_ip_adapter_scale(0.3)
        reused = images(pipe, **inputs)
        pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=2, executor="serial")
        np.testing.assert_array_equal(reused, images(pipe, **inputs))
    assert not np.array_equal(reused, full_scale)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A LoRA for ``unet`` with random weights, keyed as ``pipe.load_lora_weights()`` takes it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    torch.manual_seed(3)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    return {f"unet.{key}": value for key, value in get_peft_model_state_dict(donor).items()}


PIPELINE_LORA_CALLS = [  # what LoRA users call on the pipeline, in order
    ("loaded", lambda pipe, lora: pipe.load_lora_weights(dict(lora), adapter_name="style")),
    ("re-weighted", lambda pipe, lora: pipe.set_adapters(["style"], adapter_weights=[0.5])),
    ("disabled", lambda pipe, lora: pipe.disable_lora()),
    ("enabled", lambda pipe, lora: pipe.enable_lora()),
    ("fused", lambda pipe, lora: pipe.fuse_lora(lora_scale=0.7)),
    ("unfused and unloaded", lambda pipe, lora: (pipe.unfuse_lora(), pipe.unload_lora_weights())),
]


def test_pipeline_lora_calls_reach_the_partitioned_model():
    """diffusers' pipeline-level LoRA calls act only on components that are a ModelMixin
    (``fuse_lora()`` and ``unload_lora_weights()`` skipped any other silently); the denoiser
    reports the model's class, so each reaches the model and is captured anew."""
    unet, _, kwargs = tiny.sd_unet()
    lora = lora_state_dict(unet)
    reference = sd_pipeline(copy.deepcopy(unet))
    pipe = sd_pipeline(unet)
    pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=2, executor="serial")
    generator = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator))
    with one_thread():
        before = images(pipe, **embeds)
        previous = unet(**kwargs).sample
        for name, call in PIPELINE_LORA_CALLS:
            call(pipe, lora)
            call(reference, lora)
            output = unet(**kwargs).sample
            torch.testing.assert_close(output, reference.unet(**kwargs).sample, msg=name)
            assert not torch.equal(output, previous), name
            previous = output
            if name == "re-weighted":
                assert pipe.get_list_adapters() == {"unet": ["style"]}
                after = images(pipe, **embeds)  # captured again: as if partitioned after the calls
                fresh = sd_pipeline(asyncfx.partition(copy.deepcopy(unet), 2, layout="1x2", warmup=2,
                                                      executor="serial"))
                np.testing.assert_array_equal(after, images(fresh, **embeds))
    assert not np.array_equal(after, before)


def test_save_pretrained_saves_the_partitioned_model(tmp_path):
    unet, _, _ = tiny.sd_unet()
    pipe = sd_pipeline(unet)
    pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=2, executor="serial")
    assert isinstance(pipe.unet, UNet2DConditionModel) and type(pipe.unet) is asyncfx.AsyncDenoiser
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None,
                                                     safety_checker=None, feature_extractor=None)
    assert type(loaded.unet) is UNet2DConditionModel
    assert loaded.unet.state_dict().keys() == unet.state_dict().keys()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_from_pipe_carries_a_partitioned_denoiser_passed_by_name():
    """from_pipe() takes over only model components of the exact annotated class; passed by
    name, the denoiser is taken over as it is."""
    unet, _, _ = tiny.sd_unet()
    pipe = sd_pipeline(unet)
    pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=2, executor="serial")
    pag = StableDiffusionPAGPipeline.from_pipe(pipe, unet=pipe.unet)
    assert pag.unet is pipe.unet


def test_animatediff_from_a_pipeline_with_a_partitioned_unet_takes_it_by_name():
    """diffusers' AnimateDiff test_from_pipe_consistent_forward_pass with the image pipeline's
    UNet partitioned: from_pipe() carries over only components whose type() is the expected
    class, so the partitioned UNet is left behind and diffusers refuses the pipeline without
    one. Passed by name, AnimateDiffPipeline builds its motion UNet from the partitioned
    one's weights, exactly as from the plain UNet; partitioned in turn, it makes the same
    frames (warm-up covering every step)."""
    unet, adapter = animatediff_parts()
    image_pipe = tiny.sd_pipeline(unet, DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    _, inputs = animatediff_pipeline()
    with one_thread():
        plain = images(AnimateDiffPipeline.from_pipe(image_pipe, motion_adapter=adapter), **inputs)
        image_pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=STEPS, executor="serial")
        with pytest.raises(ValueError, match="unet"):
            AnimateDiffPipeline.from_pipe(image_pipe, motion_adapter=adapter)
        motion = AnimateDiffPipeline.from_pipe(image_pipe, motion_adapter=adapter, unet=image_pipe.unet)
        assert type(motion.unet) is UNetMotionModel
        np.testing.assert_array_equal(images(motion, **inputs), plain)
        motion.unet = asyncfx.partition(motion.unet, 2, layout="1x2", warmup=STEPS, executor="serial")
        np.testing.assert_array_equal(images(motion, **inputs), plain)


def test_pipe_to_converts_a_partitioned_denoiser():
    unet, _, _ = tiny.sd_unet()
    generator = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(1, 4, 8, generator=generator, dtype=torch.float64),
              "negative_prompt_embeds": torch.randn(1, 4, 8, generator=generator, dtype=torch.float64)}
    with one_thread():
        expected = images(sd_pipeline(copy.deepcopy(unet)).to(torch.float64), **embeds)
        pipe = sd_pipeline(asyncfx.partition(unet, 2, layout="1x2", warmup=STEPS, executor="serial"))
        pipe.to(torch.float64)  # after partition(): the denoiser follows, as the model would
        assert pipe.unet.dtype == torch.float64
        got = images(pipe, **embeds)
    np.testing.assert_array_equal(got, expected)  # warm-up covers every step: the original run


def sdxl_pipeline() -> tuple[StableDiffusionXLPipeline, dict]:
    unet, _, _ = tiny.sdxl_unet()
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=DDIMScheduler(num_train_timesteps=1000))
    generator = torch.Generator().manual_seed(2)
    return pipe, dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=generator),
                      negative_pooled_prompt_embeds=torch.randn(1, 8, generator=generator))


def test_stable_diffusion_xl_pipeline():
    pipe, embeds = sdxl_pipeline()
    check_drop_in(pipe, "unet", **embeds)


def sd3_pipeline() -> tuple[StableDiffusion3Pipeline, dict]:
    transformer, _, _ = tiny.sd3_transformer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    generator = torch.Generator().manual_seed(3)
    return pipe, dict(prompt_embeds=torch.randn(1, 5, 16, generator=generator),
                      negative_prompt_embeds=torch.randn(1, 5, 16, generator=generator),
                      pooled_prompt_embeds=torch.randn(1, 12, generator=generator),
                      negative_pooled_prompt_embeds=torch.randn(1, 12, generator=generator))


def test_stable_diffusion_3_pipeline():
    pipe, embeds = sd3_pipeline()
    check_drop_in(pipe, "transformer", **embeds)


def test_stable_diffusion_3_skip_layer_guidance():
    pipe, embeds = sd3_pipeline()  # steps 1 to 5 add a batch-1 call that skips layer 1
    den = check_drop_in(pipe, "transformer", skip_guidance_layers=[1], skip_layer_guidance_stop=0.9,
                        **embeds)
    # each kind of call is one stream through the whole generation (start step, steps taken):
    # the guided calls from step 0, the layer-skipping ones from step 1; neither warmed up again
    streams = sorted((s.start, s.step) for build in den.captures() for s in build.streams.values())
    assert streams == [(0, STEPS), (1, STEPS - 1)]


def test_stable_diffusion_3_pag_pipeline():
    """SD3's perturbed-attention guidance builds attention masks with fill_diagonal_, an
    in-place write torch cannot functionalise as it stands."""
    _, embeds = sd3_pipeline()
    transformer, _, _ = tiny.sd3_transformer()
    pipe = StableDiffusion3PAGPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                       vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                       tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                       pag_applied_layers=["blocks.0"])
    check_drop_in(pipe, "transformer", pag_scale=3.0, **embeds)


def flux_pipeline() -> tuple[FluxPipeline, dict]:
    transformer, _, _ = tiny.flux_transformer()  # 8 packed channels: a 2-channel latent in 2x2 patches
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(latent_channels=2),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(4)
    return pipe, dict(prompt_embeds=torch.randn(1, 3, 16, generator=generator),
                      pooled_prompt_embeds=torch.randn(1, 12, generator=generator), height=16, width=16)


def test_flux_pipeline():
    pipe, inputs = flux_pipeline()
    check_drop_in(pipe, "transformer", **inputs)


def animatediff_parts() -> tuple[UNet2DConditionModel, MotionAdapter]:
    """The image UNet AnimateDiff turns into a motion UNet, and the motion adapter."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    return unet, adapter


def animatediff_pipeline() -> tuple[AnimateDiffPipeline, dict]:
    unet, adapter = animatediff_parts()
    pipe = AnimateDiffPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                               motion_adapter=adapter,
                               scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    generator = torch.Generator().manual_seed(7)
    return pipe, dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator), num_frames=4,
                      height=16, width=16)


def test_animatediff_pipeline():
    pipe, inputs = animatediff_pipeline()
    check_drop_in(pipe, "unet", **inputs)  # a UNetMotionModel


def test_stable_video_diffusion_pipeline():
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(  # 4 in = noisy latent + conditioning image latent
        sample_size=2, in_channels=4, out_channels=2, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=8, num_attention_heads=(2, 4), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=2).eval()
    vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, latent_channels=2, layers_per_block=1,
                                       down_block_types=("DownEncoderBlock2D",) * 2,
                                       block_out_channels=(32, 64)).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, intermediate_size=16)).eval()
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=EulerDiscreteScheduler(),
                                        feature_extractor=CLIPImageProcessor())
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    check_drop_in(pipe, "unet", image=image, height=16, width=16, num_frames=2, decode_chunk_size=2)


def test_z_image_pipeline_with_a_list_of_latents_and_timesteps_that_count_up():
    """Z-Image passes one latent per sample in a list, and 1 - t / 1000 as the timestep,
    and the transformer makes its rotary table at its first call: here the capture's."""
    transformer, _, _ = tiny.z_image_transformer()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                          tokenizer=None, transformer=transformer)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(prompt_embeds=[torch.randn(5, 16, generator=generator)],
                  negative_prompt_embeds=[torch.randn(5, 16, generator=generator)], height=32, width=32)
    with one_thread():
        pipe.transformer = copy.deepcopy(transformer)
        expected = images(pipe, **inputs)
        pipe.transformer = asyncfx.partition(copy.deepcopy(transformer), 2, layout="1x2", warmup=STEPS,
                                                 executor="serial")
        np.testing.assert_array_equal(images(pipe, **inputs), expected)  # the model runs after its capture
        runs = {}
        for executor in ("serial", "local"):
            pipe.transformer = asyncfx.partition(copy.deepcopy(transformer), 2, warmup=1, stride=2,
                                                 scheduler=pipe.scheduler, executor=executor)
            runs[executor] = images(pipe, **inputs)
        den = pipe.transformer
        den.close()
    np.testing.assert_array_equal(runs["local"], runs["serial"])
    assert not np.array_equal(runs["local"], expected)  # the stale steps did run
    assert np.abs(runs["local"] - expected).mean() < 0.25
    assert den.interface.roles[:3] == ["latent", "latent", "timestep"]  # CFG: two samples, two latents
    a, b = streams(den)[0].times.line.line()
    assert (round(a, 6), round(b, 6)) == (-0.001, 1.0)


def wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).eval()


def test_wan_2_2_two_experts_with_stride_two():
    """Wan 2.2 samples the noisy steps with one transformer and the rest with another, so
    the second one's generation starts part-way through the shared scheduler's timesteps."""
    experts = {"transformer": wan_transformer(1), "transformer_2": wan_transformer(2)}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(), boundary_ratio=0.7, **experts,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # timesteps not evenly spaced
    generator = torch.Generator().manual_seed(3)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=generator))
    runs = {}
    with one_thread():
        original = images(pipe, height=16, width=16, num_frames=5, **embeds)
        for executor in ("serial", "local"):
            for name, model in experts.items():
                setattr(pipe, name, asyncfx.partition(model, 2, warmup=1, stride=2, scheduler=pipe.scheduler,
                                                      executor=executor))
            runs[executor] = images(pipe, height=16, width=16, num_frames=5, **embeds)
    np.testing.assert_array_equal(runs["local"], runs["serial"])
    assert np.abs(runs["local"] - original).max() < 0.25 and not np.array_equal(runs["local"], original)
    first_low_noise_step = int((pipe.scheduler.timesteps >= 700).sum())  # 0.7 x 1000 training steps
    assert STEPS - first_low_noise_step >= 3  # the second expert's third call checks its timestep
    starts = [[stream.times.scheduler_index for stream in streams(getattr(pipe, name))] for name in experts]
    assert starts == [[0, 0], [first_low_noise_step] * 2]  # guided and unguided calls: two streams each


def test_wan_2_2_image_to_video_with_a_timestep_per_token():
    """Wan 2.2's 5B image-to-video pipeline passes a timestep per token, 0 for the
    conditioning frame's: the generation still moves on one step per timestep."""
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(),
                                   transformer=wan_transformer(1), expand_timesteps=True,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    generator = torch.Generator().manual_seed(3)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=generator).numpy() * 255).astype(np.uint8))
    den = check_drop_in(pipe, "transformer", image=image, height=16, width=16, num_frames=5,
                        prompt_embeds=torch.randn(1, 6, 16, generator=generator),
                        negative_prompt_embeds=torch.randn(1, 6, 16, generator=generator))
    assert [(stream.start, stream.step) for stream in streams(den)] == [(0, STEPS)] * 2
