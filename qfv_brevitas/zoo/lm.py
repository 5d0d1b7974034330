"""A small decoder-only transformer of the project's own (GPT-style, plain torch), for
language-model tests and studies without the ``llm`` extra.

Every weight matrix is an ``nn.Linear`` or the token ``nn.Embedding``, so
:func:`qfv_brevitas.quantize_model` sees the same layer kinds as in a Hugging Face Llama or
GPT-NeoX model: the embedding runs first and the LM head last (the 8-bit "edge" layers), the
attention and MLP projections in between get N-bit levels. Positions are fixed sinusoids (a
buffer, not a layer), so no second embedding table sits among the inner layers.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qfv_brevitas.util.errors import QfvError

__all__ = ["TinyLM", "sinusoids", "BYTE_VOCAB", "HF_FAMILIES", "hf_byte_lm"]

#: a byte-level model predicts one of 256 byte values
BYTE_VOCAB = 256


def sinusoids(length: int, dim: int) -> Tensor:
    """The fixed positional code of "Attention is all you need" (``length x dim``)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), is_causal=True)
        return self.o_proj(att.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, mlp_ratio * dim)
        self.down_proj = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyLM(nn.Module):
    """Pre-norm decoder-only transformer over ``vocab`` tokens: ``forward(ids)`` with ``ids``
    of shape ``(batch, time)`` (``time <= context``) returns logits ``(batch, time, vocab)``.

    ``tie_weights``: the LM head reuses the embedding table (one Parameter, as in GPT-2).

    >>> m = TinyLM(dim=32, layers=1, heads=2, context=16)
    >>> m(torch.randint(0, 256, (2, 10))).shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, vocab: int = BYTE_VOCAB, dim: int = 128, layers: int = 4, heads: int = 4,
                 context: int = 128, mlp_ratio: int = 4, tie_weights: bool = False):
        super().__init__()
        if dim % heads or dim % 2:
            raise QfvError(f"TinyLM: dim {dim} must be even and a multiple of heads {heads}")
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("positions", sinusoids(context, dim), persistent=False)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.apply(self._init)
        if tie_weights:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.context:
            raise QfvError(f"TinyLM takes token ids of shape (batch, time <= {self.context}), "
                           f"got {tuple(ids.shape)}")
        x = self.embed(ids) + self.positions[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))



#: Hugging Face decoder families :func:`hf_byte_lm` builds (``nn.Linear`` projections)
HF_FAMILIES = ("llama", "gpt_neox")


def hf_byte_lm(family: str = "llama", dim: int = 128, layers: int = 4, heads: int = 4,
               context: int = 128, mlp_ratio: int = 4, tie_weights: bool = False,
               seed: int = 0) -> nn.Module:
    """A byte-level (vocabulary 256) Hugging Face decoder built from a config, no download:
    ``AutoModelForCausalLM.from_config`` of a ``LlamaConfig`` or ``GPTNeoXConfig`` with these
    sizes, randomly initialised with ``seed`` (needs the ``llm`` extra: ``transformers``)."""
    if family not in HF_FAMILIES:
        raise QfvError(f"unknown Hugging Face family {family!r}; choose one of "
                       f"{', '.join(HF_FAMILIES)}")
    try:
        import transformers
    except ImportError:
        raise QfvError("Hugging Face models need the llm extra: "
                       "pip install 'qfv-brevitas[llm]'") from None
    common = dict(vocab_size=BYTE_VOCAB, hidden_size=dim, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=mlp_ratio * dim,
                  max_position_embeddings=context, tie_word_embeddings=tie_weights,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=heads, **common)
    else:
        cfg = transformers.GPTNeoXConfig(**common)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()
