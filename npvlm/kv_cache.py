"""The key/value cache: preallocated once per generation, written in place, indexed by position.

Axis legend: B batch, Hk key/value heads, S capacity (prompt + new tokens), E head dim.
"""

from dataclasses import dataclass

from .backend import array_module


@dataclass
class KVCache:
    """Per-layer keys (after RoPE) and values, plus which cached slots hold real tokens.

    keys[l], values[l]: [B, Hk, S, E], filled up to `length`.
    key_valid: int32[B, S], 1 where a slot holds a real (not left-padding) token.
    next_position: int64[B], the 1-indexed RoPE position of each row's next token.
    """
    keys: list
    values: list
    key_valid: object
    next_position: object
    length: int = 0

    @classmethod
    def allocate(cls, text_cfg, batch, capacity, like):
        """Empty cache for `batch` rows and `capacity` tokens, on the backend of array `like`."""
        xp = array_module(like)
        shape = (batch, text_cfg.num_key_value_heads, capacity, text_cfg.head_dim)
        n = text_cfg.num_hidden_layers
        return cls(keys=[xp.zeros(shape, xp.float32) for _ in range(n)],
                   values=[xp.zeros(shape, xp.float32) for _ in range(n)],
                   key_valid=xp.zeros((batch, capacity), xp.int32),
                   next_position=xp.ones((batch,), xp.int64))

    @property
    def capacity(self):
        return self.key_valid.shape[1]

    def write(self, layer, k, v):
        """Store k, v [B, Hk, T, E] at slots length..length+T of `layer` (no concatenation);
        return views of every filled slot, [B, Hk, length+T, E]. `advance` moves `length`."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, token_valid):
        """After all layers wrote T new tokens: mark them (token_valid int[B, T]) and move on."""
        T = token_valid.shape[1]
        self.key_valid[:, self.length:self.length + T] = token_valid
        self.length += T
        self.next_position += token_valid.sum(axis=1)
