"""Prompt conditioning for the single-frame UNet (CLIP text encoder, last hidden state).

``encode_cropped_prompt_77tokens`` is the original's encoder: one 77-token window, everything past 75 content
tokens dropped. The WD14 tagger that writes the default prompt can easily produce more than 75 tokens, so
``encode_prompt(..., long_prompt=True)`` offers the usual "chunked" alternative: the prompt is split into
windows of 75 tokens, each encoded as its own ``BOS + chunk + EOS + padding`` sequence of 77 tokens, and the
hidden states are concatenated along the token axis (the UNet's cross-attention accepts any context length).
It is opt-in because it changes the conditioning the model was trained with; a prompt that fits into one
window gives exactly the 77-token result either way.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Default number of 75-token windows in long-prompt mode (225 content tokens).
DEFAULT_MAX_CHUNKS = 3


def _encoder_device(text_encoder: torch.nn.Module) -> torch.device:
    device = getattr(text_encoder, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(text_encoder.parameters()).device


@torch.inference_mode()
def encode_cropped_prompt_77tokens(prompt: str, tokenizer, text_encoder) -> torch.Tensor:
    """``[1, 77, D]`` last hidden state of ``prompt`` truncated to one CLIP window, as in the original."""
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device=_encoder_device(text_encoder))
    return text_encoder(ids, attention_mask=None).last_hidden_state


def chunk_prompt_ids(prompt: str, tokenizer, max_chunks: int = DEFAULT_MAX_CHUNKS) -> torch.Tensor:
    """Token ids ``[n, 77]`` of ``prompt`` split into windows of ``model_max_length - 2`` content tokens.

    Each row is ``BOS + chunk + EOS`` padded with the pad token, i.e. exactly what the tokenizer gives for a
    prompt of that chunk alone. At least one row (an empty prompt gives the empty-prompt row); at most
    ``max_chunks`` rows, later tokens are dropped with a warning.
    """
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}.")
    window = tokenizer.model_max_length
    per_chunk = window - 2
    # Tokenize in windows of content tokens without special tokens; `max_length` keeps the tokenizer from
    # warning about sequences longer than the model's window (we split them ourselves).
    content = tokenizer(
        prompt, add_special_tokens=False, truncation=True, max_length=per_chunk * max_chunks + 1
    ).input_ids
    if len(content) > per_chunk * max_chunks:
        logger.warning(
            "Prompt longer than %d tokens (%d chunks of %d); the rest is dropped.",
            per_chunk * max_chunks,
            max_chunks,
            per_chunk,
        )
        content = content[: per_chunk * max_chunks]
    chunks = [content[i : i + per_chunk] for i in range(0, len(content), per_chunk)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for chunk in chunks:
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(row + [pad] * (window - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@torch.inference_mode()
def encode_prompt(
    prompt: str,
    tokenizer,
    text_encoder,
    long_prompt: bool = False,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
) -> torch.Tensor:
    """Prompt embeddings ``[1, 77 * n, D]``; ``n == 1`` unless ``long_prompt`` and the prompt exceeds 75 tokens."""
    if not long_prompt:
        return encode_cropped_prompt_77tokens(prompt, tokenizer, text_encoder)
    ids = chunk_prompt_ids(prompt, tokenizer, max_chunks=max_chunks).to(device=_encoder_device(text_encoder))
    # One encoder call per window (batch 1), so the first window is bit-identical to the 77-token path.
    states = [text_encoder(row[None], attention_mask=None).last_hidden_state for row in ids]
    return torch.cat(states, dim=1)
