"""Linear layers with weights pre-packed for oneDNN, for bf16 and fp32 inference on CPUs.

A plain bf16 `linear` on CPU re-lays out its weight for the matrix engine on every
call. Packing once, in the blocked layout oneDNN wants for the batch sizes a
worker runs, made the 48 matrix products of a GPT-2 124M decode step 1.15x (one
row) and 1.35x (32 rows) faster on an AVX512-BF16 CPU. In fp32, on a CPU with AVX2
only, oneDNN's packed products beat ATen's `linear` too: decode steps of the same
model 1.2x faster at one row and 1.25x at 32 (docs/benchmarks.md). The packing op is the one
torch's own compiler uses for frozen CPU graphs; it is not a public API, so every
packed layer is checked against the plain product once, and any failure leaves
the model as it was. This module is the only one that calls those ops: the lean
GPT-2 pass (`gpt2.py`) packs its weights with `pack` and runs them with
`packed_linear`; other architectures get their linear layers replaced by
`PackedLinear`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


PACKED_DTYPES = (torch.bfloat16, torch.float32)


def available(model: nn.Module) -> bool:
    """Whether this model's weights can be packed: bf16 or fp32 on CPU, and the ops behave as checked in
    that precision (bf16 needs AVX512 or AVX-NE-CONVERT; oneDNN refuses it elsewhere)."""
    parameter = next(model.parameters())
    return parameter.device.type == "cpu" and parameter.dtype in PACKED_DTYPES and _ops_work(parameter.dtype)


def pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """W ([out, in]) in oneDNN's blocked layout for about `batch_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b on a 2-D x, then GELU (approximation "tanh" or "none") or plus a residual."""
    if x.dtype == torch.float32:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if residual is not None:
            return y.add_(residual)
        return y if gelu is None else F.gelu(y, approximate=gelu)
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    if gelu is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], gelu)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def _ops_work(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight, bias, x, residual = (torch.randn(shape, generator=generator).to(dtype)
                                 for shape in ((48, 32), (48,), (5, 32), (5, 48)))
    plain = F.linear(x, weight, bias).float()
    try:
        packed = pack(weight, 8)
        with torch.inference_mode():
            for got, expected in [(packed_linear(x, packed, bias), plain),
                                  (packed_linear(x, packed, bias, gelu="tanh"), F.gelu(plain, approximate="tanh")),
                                  (packed_linear(x, packed, bias, residual=residual), plain + residual.float())]:
                torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)
    except Exception as e:  # any failure of the private ops means: keep plain products
        log.warning("%s linear weights stay unpacked: oneDNN packing failed its check (%s: %s)",
                    str(dtype).removeprefix("torch."), type(e).__name__, e)
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T + b with W held packed; the original weight is not kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("packed", pack(weight, batch_hint), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x.reshape(-1, self.in_features), self.packed, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W as [out, in], bias) for nn.Linear and transformers' GPT-2 style Conv1D ([in, out]); else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight, bias = module.weight, module.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor | None)
        return weight.t(), bias
    return None


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replaces every linear layer of a bf16 or fp32 CPU model by a PackedLinear; returns how many."""
    if not available(model):
        return 0
    # An output head tied to the embedding gets packed too: a second copy of that table, but it is
    # the largest single product of a decode step.
    replacements = []
    for parent in model.modules():
        for name, child in parent.named_children():
            found = _weight_and_bias(child)
            if found is not None:
                replacements.append((parent, name, child, found))
    try:
        packed_layers = [PackedLinear(weight, bias, batch_hint) for _, _, _, (weight, bias) in replacements]
    except Exception as e:  # a shape the private op refuses: keep the plain layers
        log.warning("keeping plain linear layers: packing failed (%s: %s)", type(e).__name__, e)
        return 0
    for (parent, name, _, _), packed in zip(replacements, packed_layers, strict=True):
        setattr(parent, name, packed)
    return len(replacements)
