"""Attention plumbing for Prompt-to-Prompt: a diffusers attention processor that exposes every attention map.

Prompt-to-Prompt (Hertz et al. 2022, §3) edits the attention maps M = Softmax(QKᵀ/√d) of the UNet while it
denoises. diffusers lets us change attention without touching ``forward``: every ``Attention`` module calls a
processor, and ``UNet2DConditionModel.set_attn_processor`` swaps them. ``P2PAttnProcessor`` is the stock
``AttnProcessor`` with one line added: it hands the probabilities (batch·heads, queries, keys) to a
controller, ``controller(attn, is_cross, place_in_unet) -> attn``, and multiplies V by what comes back.

What the maps mean here (the layout ``sampling.ddim_sample`` uses): the UNet batch is [∅ rows | C rows], each
half with one row per prompt; a map tensor is (2B·heads, HW, 77) for cross attention and (2B·heads, HW, HW)
for self attention, batch-major (row b, head h at index b·heads + h).

Editing rules live in ``controllers.py``; this file knows nothing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Controller = Callable[[torch.Tensor, bool, str], torch.Tensor]
"""(attn (batch·heads, queries, keys), is_cross, place_in_unet ∈ {"down", "mid", "up"}) → attn, same shape."""

PLACES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def place_in_unet(processor_name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor' → 'down' (likewise 'mid', 'up')."""
    prefix = processor_name.split(".", 1)[0]
    if prefix not in PLACES:
        raise ValueError(f"attention module {processor_name!r} is not in a down, mid or up block of the UNet")
    return PLACES[prefix]


class P2PAttnProcessor:
    """diffusers' ``AttnProcessor`` (explicit softmax, same operations in the same order) + a controller.

    With a controller that returns its input unchanged the output is bit-identical to ``AttnProcessor``'s.
    (The default ``AttnProcessor2_0`` uses fused scaled-dot-product attention and differs from both by
    float rounding, ~1e-6.)
    """

    def __init__(self, controller: Controller, place: str):
        self.controller = controller
        self.place = place

    def __call__(
        self,
        attn,  # diffusers.models.attention_processor.Attention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (2B, HW, inner)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (2B, keys, inner)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)  # (2B·heads, HW, d)
        key = attn.head_to_batch_dim(key)  # (2B·heads, keys, d)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)  # M: (2B·heads, HW, keys)
        attention_probs = self.controller(attention_probs, is_cross, self.place)  # M̂ (P2P, Algorithm 1, line 9)
        hidden_states = torch.bmm(attention_probs, value)  # (2B·heads, HW, d)
        hidden_states = attn.batch_to_head_dim(hidden_states)  # (2B, HW, inner)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def register_attention_control(unet, controller: Controller) -> dict:
    """Gives every attention module of ``unet`` a ``P2PAttnProcessor`` calling ``controller``.

    Returns the processors it replaced (``{name: processor}``), for ``unet.set_attn_processor`` to restore.
    """
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: P2PAttnProcessor(controller, place_in_unet(name)) for name in original})
    return original


@contextmanager
def attention_control(unet, controller: Controller | None) -> Iterator[None]:
    """``with attention_control(unet, controller): ...`` — P2P processors inside, the original ones after
    (also on error). ``controller=None`` leaves the UNet untouched."""
    if controller is None:
        yield
        return
    original = register_attention_control(unet, controller)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given
