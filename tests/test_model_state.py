"""state_signature: what counts as an edit of a model after it was captured."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from asyncfx.runtime.model_state import state_signature
from asyncfx.zoo.tiny import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_calling_a_model_does_not_change_its_signature(name):
    model, args, kwargs = ZOO[name]()
    before = state_signature(model)
    model(*args, **kwargs)
    model(*args, **kwargs)
    assert state_signature(model) == before


class ScaledProcessor(AttnProcessor):
    """An attention processor with a setting, like IP-Adapter's scale."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = [scale]

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return super().__call__(attn, hidden_states, *args, **kwargs) * self.scale[0]


EDITS = {
    "FreeU switched on": lambda unet: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
    "other attention processors": lambda unet: unet.set_attn_processor(AttnProcessor()),
    "train mode": lambda unet: unet.train(),
    "a weight written in place": lambda unet: unet.conv_in.weight.mul_(2),  # as load_state_dict does
    "a weight replaced": lambda unet: setattr(unet.conv_in, "weight",
                                              torch.nn.Parameter(unet.conv_in.weight.detach() * 2)),
    "weight.data replaced": lambda unet: setattr(unet.conv_in.weight, "data", unet.conv_in.weight * 2),
    "converted without the denoiser": lambda unet: unet.to(torch.float64),
    "a module replaced": lambda unet: setattr(unet, "conv_act", torch.nn.ReLU()),
    "a forward hook": lambda unet: unet.mid_block.register_forward_hook(lambda *_: None),
    "a buffer registered": lambda unet: unet.conv_in.register_buffer("scale", torch.ones(1)),
    "a plain attribute": lambda unet: setattr(unet.down_blocks[0], "gradient_checkpointing", True),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edits_change_the_signature(edit):
    model, _, _ = ZOO["sd_unet"]()
    model = copy.deepcopy(model)
    before = state_signature(model)
    with torch.no_grad():
        EDITS[edit](model)
    assert state_signature(model) != before


def test_a_setting_inside_an_attention_processor_changes_the_signature():
    model, _, _ = ZOO["sd_unet"]()
    model = copy.deepcopy(model)
    processor = ScaledProcessor(1.0)
    model.set_attn_processor(processor)  # one processor object shared by every attention
    before = state_signature(model)
    assert state_signature(model) == before
    processor.scale[0] = 0.5  # e.g. pipe.set_ip_adapter_scale(0.5)
    assert state_signature(model) != before
