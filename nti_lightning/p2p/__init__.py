"""Prompt-to-Prompt editing (Hertz et al. 2022) of Null-text inversions (Mokady et al. 2023).

- ``attention``: the diffusers attention processor that hands every attention map to a controller;
- ``controllers``: the paper's edits (word swap, adding a phrase, re-weighting, local blend) and the store;
- ``alignment``: words ↔ token positions and the token alignments between source and target prompts;
- ``edit``: ``edit(model, inversion, target_prompt, …)`` and the batched ``edit_batch``;
- ``cli``: ``nti edit``.
"""

from nti_lightning.p2p.alignment import AlignmentError, WordNotInPromptError
from nti_lightning.p2p.attention import P2PAttnProcessor, attention_control, register_attention_control
from nti_lightning.p2p.controllers import (
    AttentionControl,
    AttentionControlEdit,
    AttentionRefine,
    AttentionReplace,
    AttentionReweight,
    AttentionStore,
    EmptyControl,
    LocalBlend,
)
from nti_lightning.p2p.edit import EditResult, EditSpec, edit, edit_batch

__all__ = [
    "AlignmentError",
    "AttentionControl",
    "AttentionControlEdit",
    "AttentionRefine",
    "AttentionReplace",
    "AttentionReweight",
    "AttentionStore",
    "EditResult",
    "EditSpec",
    "EmptyControl",
    "LocalBlend",
    "P2PAttnProcessor",
    "WordNotInPromptError",
    "attention_control",
    "edit",
    "edit_batch",
    "register_attention_control",
]
