"""Text embeddings ψ(·): the text encoder's last hidden state over max-length padded tokens.

As the authors: ψ("") is padded to the tokenizer's max length (77) without truncation; the prompt is
padded and truncated to the same length. Unlike them, a prompt longer than the limit is an error instead of
a silent truncation (the dropped words would misalign any Prompt-to-Prompt word indices).

Padding is the tokenizer's own pad token, as ``StableDiffusionPipeline.encode_prompt``: CLIP's
<|endoftext|> for SD1.x, OpenCLIP's "!" (token 0, ≠ the end token) for SD2.x — so ψ("") of SD2 is
[start, end, !, …, !]. The length limit counts the start and end tokens, whatever the padding.
"""

from __future__ import annotations

import torch


class PromptError(ValueError):
    """A prompt that cannot be used as is; the message says why and what to do."""


def check_prompt(tokenizer, prompt: str | None, label: str = "prompt") -> str:
    if prompt is None or not isinstance(prompt, str):
        raise PromptError(f"{label}: missing caption; add a row to the captions file or set data.default_prompt")
    if not prompt.strip():
        raise PromptError(
            f"{label}: empty prompt; Null-text Inversion needs a caption describing the image "
            "(with an empty prompt the conditional and null branches coincide and guidance does nothing)"
        )
    n = len(tokenizer(prompt, truncation=False).input_ids)
    limit = tokenizer.model_max_length
    if n > limit:
        raise PromptError(
            f"{label}: prompt has {n} tokens with start/end markers, over the tokenizer's limit of {limit}; "
            "shorten it (it would otherwise be truncated silently)"
        )
    return prompt


@torch.no_grad()
def encode_text(model, prompts: list[str]) -> torch.Tensor:
    """ψ(prompts): (B,) strings → (B, L, D) last hidden states, L = tokenizer.model_max_length."""
    tok = model.tokenizer(
        prompts,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = tok.input_ids.to(model.text_encoder.device)
    return model.text_encoder(ids)[0].float()  # (B, L, D)


@torch.no_grad()
def encode_null(model, batch_size: int = 1) -> torch.Tensor:
    """ψ("") repeated: (B, L, D) — the initial null embedding ∅_T (Algorithm 1, line 6)."""
    return encode_text(model, [""]).expand(batch_size, -1, -1).clone()


def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    tok = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return tok.input_ids.to(device)  # (B, L)


@torch.no_grad()
def encode_text_sdxl(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's ψ(prompts) (StableDiffusionXLPipeline.encode_prompt, clip_skip None; Podell et al. 2023, §2.1):
    (B,) strings → the penultimate hidden states of ``text_encoder`` and ``text_encoder_2`` concatenated,
    (B, L, D₁ + D₂), and the pooled, projected ``text_embeds`` of ``text_encoder_2``, (B, D₂); each encoder
    reads its own tokenizer's ids (SDXL's second pads with "!")."""
    te1, te2 = model.text_encoder, model.text_encoder_2
    out1 = te1(_token_ids(model.tokenizer, prompts, te1.device), output_hidden_states=True)
    out2 = te2(_token_ids(model.tokenizer_2, prompts, te2.device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, D₁ + D₂)
    return hidden.float(), out2.text_embeds.float()  # (B, L, D₁ + D₂), (B, D₂)
