"""The key/value cache: preallocated once per generation, written in place, indexed by position.

Axes (npvlm/model/layers.py): B batch, Hk key/value heads, S capacity (prompt + new tokens), E head dim.

Each decoder layer gets its own slot, `cache.layers[i]`, a `LayerKV`: the layer writes its new
keys (after RoPE) and values there and attends to everything the slot holds.
"""

from dataclasses import dataclass

from ..backend import array_module


@dataclass
class LayerKV:
    """One layer's keys and values, [B, Hk, S, E] each, filled up to `length`."""
    keys: object
    values: object
    length: int = 0

    def write(self, k, v):
        """Store k, v [B, Hk, T, E] at slots length..length+T (no concatenation); return views of
        every filled slot, [B, Hk, length+T, E]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.keys.shape[2]}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class KVCache:
    """Every layer's slot, plus which cached positions hold real tokens.

    layers: one LayerKV per decoder layer.
    key_valid: int32[B, S], 1 where a position holds a real (not left-padding) token.
    next_position: int64[B], the 1-indexed RoPE position of each row's next token.
    length: positions filled in every layer (moved by `advance` once all layers have written).
    """
    layers: list
    key_valid: object
    next_position: object
    length: int = 0

    @classmethod
    def allocate(cls, text_cfg, batch, capacity, like):
        """Empty cache for `batch` rows and `capacity` tokens, on the backend of array `like`."""
        xp = array_module(like)
        shape = (batch, text_cfg.num_key_value_heads, capacity, text_cfg.head_dim)
        return cls(layers=[LayerKV(xp.zeros(shape, xp.float32), xp.zeros(shape, xp.float32))
                           for _ in range(text_cfg.num_hidden_layers)],
                   key_valid=xp.zeros((batch, capacity), xp.int32),
                   next_position=xp.ones((batch,), xp.int64))

    @property
    def capacity(self):
        return self.key_valid.shape[1]

    @property
    def keys(self):
        return [slot.keys for slot in self.layers]

    @property
    def values(self):
        return [slot.values for slot in self.layers]

    def advance(self, token_valid):
        """After all layers wrote T new tokens: mark them (token_valid int[B, T]) and move on."""
        T = token_valid.shape[1]
        self.key_valid[:, self.length:self.length + T] = token_valid
        self.length += T
        self.next_position += token_valid.sum(axis=1)
