"""A lean forward pass for GPT-2 family models, for serving.

transformers' GPT-2 spends a decode step at batch 1 mostly outside the matrix
products: module calls, mask building and many small kernels. This runs the same
model from its own weights with the fewest operations that compute it: one
product for query/key/value, attention on the growing cache, the GELU fused into
the MLP's first product and the residual additions into the products before
them when the weights are packed for oneDNN (bf16 on CPU), and the output head
on the last position only.

Attention reads each layer's whole cache buffer, which stays contiguous, and
masks the columns not yet written: batched matrix products on CPU copy any
non-contiguous operand, which for a view of the filled part would mean copying
the cache on every step.

Models with options this does not implement are left to transformers
(`build` returns None): cross-attention, attention scaled by layer index, the
reordered upcast attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import packing
from .kvcache import GrowingCache, GrowingLayer

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class Product:
    """x W^T + b, optionally followed by GELU or added to a residual; packed for oneDNN when it pays."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, packed: bool):
        self.bias = None if bias is None else bias.detach()
        # Either the packed copy or the weight itself (a transposed view of GPT-2's [in, out] needs no copy).
        self.packed = packing.pack(weight, batch_hint) if packed else None
        self.weight = None if packed else weight.detach()

    def __call__(self, x: torch.Tensor, gelu: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return packing.packed_linear(x, self.packed, self.bias, gelu, residual)
        assert self.weight is not None
        y = F.linear(x, self.weight, self.bias)
        if gelu is not None:
            y = F.gelu(y, approximate=gelu)
        return y if residual is None else y + residual


@dataclass
class Block:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    attention: Product
    attention_out: Product
    ln_2: tuple[torch.Tensor, torch.Tensor]
    mlp_in: Product
    mlp_out: Product


class Gpt2:
    def __init__(self, model: Any, batch_hint: int):
        config, body = model.config, model.transformer
        packed = packing.available(model) and batch_hint > 0
        self.heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scale = 1 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.eps = config.layer_norm_epsilon
        self.gelu = ACTIVATIONS[config.activation_function]
        self.token_embedding = body.wte.weight.detach()
        self.position_embedding = body.wpe.weight.detach()

        def product(conv1d: Any) -> Product:  # GPT-2 stores [in, out]
            return Product(conv1d.weight.t(), conv1d.bias, batch_hint, packed)

        def norm(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return layer.weight.detach(), layer.bias.detach()

        self.blocks = [Block(norm(b.ln_1), product(b.attn.c_attn), product(b.attn.c_proj), norm(b.ln_2),
                             product(b.mlp.c_fc), product(b.mlp.c_proj)) for b in body.h]
        self.ln_f = norm(body.ln_f)
        head = model.lm_head
        # A head tied to the embedding is packed too: a second copy of that table, but the largest
        # single product of a decode step.
        self.head = Product(head.weight, head.bias, batch_hint, packed)
        self.packed_layers = 4 * len(self.blocks) + 1 if packed else 0
        if packed:
            # The packed copies replace the block weights: free those in the transformers module.
            for b in body.h:
                for layer in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                    layer.weight.data = layer.weight.data.new_empty(0)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor,
                 cache: GrowingCache, every_position: bool = False) -> torch.Tensor:
        """Logits of each row's last position (of every position: [rows, count, vocabulary]). `attention`
        has one column per cache column, the new tokens' included (1 = a real token); the new tokens are
        the last `input_ids.shape[1]` columns."""
        rows, count = input_ids.shape
        h = F.embedding(input_ids, self.token_embedding) + F.embedding(positions, self.position_embedding)
        h = h.reshape(rows * count, -1)
        masks: dict[int, torch.Tensor] = {}  # every layer's cache has the same shape: build masks once
        for index, block in enumerate(self.blocks):
            a = F.layer_norm(h, h.shape[-1:], *block.ln_1, self.eps)
            mixed = self._attend(block.attention(a), index, rows, count, attention, cache, masks)
            h = block.attention_out(mixed, residual=h)
            m = F.layer_norm(h, h.shape[-1:], *block.ln_2, self.eps)
            h = block.mlp_out(block.mlp_in(m, gelu=self.gelu), residual=h)
        if every_position:
            logits = self.head(F.layer_norm(h, h.shape[-1:], *self.ln_f, self.eps)).float()
            return logits.reshape(rows, count, -1)
        last = h.reshape(rows, count, -1)[:, -1]
        return self.head(F.layer_norm(last, last.shape[-1:], *self.ln_f, self.eps)).float()

    def _attend(self, qkv: torch.Tensor, index: int, rows: int, count: int, attention: torch.Tensor,
                cache: GrowingCache, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        heads, dim = self.heads, self.head_dim
        q, k, v = qkv.reshape(rows, count, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        if index < len(cache.layers):
            layer = cache.layers[index]
            assert isinstance(layer, GrowingLayer)
            layer.update(k, v)
        else:
            cache.update(k, v, index)
            layer = cache.layers[index]
        assert isinstance(layer, GrowingLayer) and layer.buffers is not None
        length = layer.length
        if count == 1:
            keys, values = layer.buffers
            capacity = keys.shape[2]
            bias = masks.get(capacity)
            if bias is None:
                bias = torch.full((rows, capacity), float("-inf"), dtype=q.dtype, device=q.device)
                bias[:, :length].masked_fill_(attention.bool(), 0.0)
                bias = bias[:, None, None, :].expand(rows, heads, 1, capacity).reshape(rows * heads, 1, capacity)
                masks[capacity] = bias
            scores = torch.baddbmm(bias, q.reshape(rows * heads, 1, dim),
                                   keys.view(rows * heads, capacity, dim).transpose(1, 2), alpha=self.scale)
            # In the model's dtype, as transformers' GPT-2 does.
            out = torch.bmm(scores.softmax(dim=-1), values.view(rows * heads, capacity, dim))
            return out.reshape(rows, heads * dim)
        keys, values = layer.filled()
        # Causal within the new tokens, no padding, and each position always sees itself so that padding
        # positions never have an empty row (their output is unused, but must stay finite).
        query_at = torch.arange(length - count, length, device=q.device)[:, None]
        key_at = torch.arange(length, device=q.device)[None, :]
        allowed = masks.get(-1)
        if allowed is None:
            allowed = masks[-1] = ((key_at <= query_at) & attention.bool()[:, None, None, :]) | (key_at == query_at)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=self.scale)
        return out.transpose(1, 2).reshape(rows * count, heads * dim)


def build(model: Any, batch_hint: int) -> Gpt2 | None:
    """The lean forward for a GPT-2 family model, or None for anything else (transformers runs it)."""
    config = getattr(model, "config", None)
    supported = (config is not None and getattr(config, "model_type", None) == "gpt2"
                 and hasattr(model, "transformer") and not config.add_cross_attention
                 and not config.scale_attn_by_inverse_layer_idx and not config.reorder_and_upcast_attn
                 and config.activation_function in ACTIVATIONS)
    if not supported:
        return None
    return Gpt2(model, batch_hint)
