"""A key/value cache that grows in place and whose rows can leave and join between steps.

transformers' dynamic cache appends each token with `torch.cat`, which copies the
whole cache of every layer on every decode step; at batch 32 that copying alone
took longer than the matrix products. Here each layer keeps its keys and values in
a buffer with spare room (a quarter more, at least 16 columns, when full), a step
writes one column in place and the model sees a view of the filled part. The room
is kept modest because the lean GPT-2 attention reads whole buffers.

Continuous batching needs two more operations, both done between steps and both
copies: `keep` drops finished rows (and the padding columns no remaining row
needs) and `concat` appends a freshly prefilled batch, aligned on the right so
that every row's newest token sits in the last column, as with left padding.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

ROOM = 16


def room_for(length: int) -> int:
    """Capacity for `length` columns plus room to grow: a quarter more, at least ROOM, a multiple of ROOM."""
    wanted = length + max(ROOM, length // 4)
    return -(-wanted // ROOM) * ROOM


class GrowingLayer(DynamicLayer):
    """One attention layer's keys and values, [batch, heads, length, head_dim], in a buffer with room to grow."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.length = 0
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        keys, values = self._reserve(key_states, value_states, end)
        keys[:, :, self.length:end] = key_states
        values[:, :, self.length:end] = value_states
        return self._set(keys, values, end)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.buffers is not None
        keys, values = self.buffers
        return keys[:, :, :self.length], values[:, :, :self.length]

    def _set(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.buffers, self.length = (keys, values), length
        self.keys, self.values = self.filled()
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor,
                 end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffers is not None and end <= self.buffers[0].shape[2]:
            return self.buffers
        capacity = room_for(end)
        keys = _buffer(key_states, key_states.shape[0], capacity)
        values = _buffer(value_states, value_states.shape[0], capacity)
        if self.buffers is not None and self.length:
            old_keys, old_values = self.filled()
            keys[:, :, :self.length] = old_keys
            values[:, :, :self.length] = old_values
        return keys, values

    def keep(self, rows: torch.Tensor, start: int) -> None:
        """Keep these rows and the columns from `start` on, in a fresh buffer with the same spare room."""
        if self.buffers is None:
            return
        old_keys, old_values = self.filled()
        length = self.length - start
        capacity = max(room_for(length), self.buffers[0].shape[2] - start)
        keys = _buffer(old_keys, len(rows), capacity)
        values = _buffer(old_values, len(rows), capacity)
        keys[:, :, :length] = old_keys[rows, :, start:]
        values[:, :, :length] = old_values[rows, :, start:]
        self._set(keys, values, length)

    def concat(self, other: GrowingLayer) -> None:
        """Append `other`'s rows below these, right-aligned (zeros on the left of the shorter side)."""
        assert other.buffers is not None
        if self.buffers is None:
            self.lazy_initialization(*other.buffers)
            self._set(*other.buffers, other.length)
            return
        (top_keys, top_values), (bottom_keys, bottom_values) = self.filled(), other.filled()
        length = max(self.length, other.length)
        capacity = room_for(length)
        top, bottom = top_keys.shape[0], bottom_keys.shape[0]
        keys = _buffer(top_keys, top + bottom, capacity)
        values = _buffer(top_values, top + bottom, capacity)
        keys[:top, :, length - self.length:length] = top_keys
        values[:top, :, length - self.length:length] = top_values
        keys[top:, :, length - other.length:length] = bottom_keys
        values[top:, :, length - other.length:length] = bottom_values
        self._set(keys, values, length)


def _buffer(like: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    # Zeros, not uninitialised memory: masked columns (padding, and the room not yet written, which
    # the lean GPT-2 attention reads) still enter the products, and garbage may be NaN or inf.
    return like.new_zeros((rows, like.shape[1], capacity, like.shape[3]))


class GrowingCache(Cache):
    """A cache of `GrowingLayer`s, one per attention layer, created as the model first writes to it."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)

    def keep(self, rows: torch.Tensor, start: int = 0) -> None:
        for layer in self.layers:
            assert isinstance(layer, GrowingLayer)
            layer.keep(rows, start)

    def concat(self, other: GrowingCache) -> None:
        if not self.layers:
            self.layers = other.layers
            return
        for layer, extra in zip(self.layers, other.layers, strict=True):
            assert isinstance(layer, GrowingLayer) and isinstance(extra, GrowingLayer)
            layer.concat(extra)
