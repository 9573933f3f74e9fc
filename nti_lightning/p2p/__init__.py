"""Prompt-to-Prompt editing (Hertz et al. 2022) of Null-text inversions (Mokady et al. 2023).

- ``attention``: the diffusers attention processor that hands every attention map to a controller;
- ``controllers``: the controllers (base, store, the edit controller applying P2P Algorithm 1, the per-mode ones);
- ``rules``: one ``TargetEdit`` per target prompt (word swap, adding a phrase, re-weighting, step windows);
- ``local_blend``: confining a change to the region of chosen words; ``maps``: attention-map geometry;
- ``alignment``: words ↔ token positions and the token alignments between source and target prompts;
- ``edit``: ``edit(model, inversion, target_prompt, …)`` and the batched ``edit_batch``;
- ``figures``: the labelled strip and the attention figure; ``outputs``: an edit's files and their names;
- ``edit_file`` and ``cli``: ``nti edit`` (its settings: ``nti_lightning.edit_config.EditConfig``).
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
)
from nti_lightning.p2p.edit import EditResult, EditSpec, edit, edit_batch
from nti_lightning.p2p.local_blend import LocalBlend

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
