"""The key/value cache: what attention keeps so that each new token costs one position, not the whole prefix.

Without a cache, generating token t runs the model over all t positions
again (cost per token grows with the context, total cost ~ n^2). The keys and
values of positions already seen never change (attention is causal), so we
keep them and feed the model only the new token:

    step 0 (prompt)  x [b, s0, h] -> every layer appends k, v [b, nh/tp, s0, hd]
    step t           x [b, 1, h]  -> every layer appends one position and attends to all cached ones

Under tensor parallelism each rank caches only its own heads
(``heads / tp``), the heads whose q, k, v its column-parallel QKV projection
produces, so the cache is split exactly like the attention. Under pipeline
parallelism each stage caches only its own layers. Memory of one rank::

    2 (k and v) x layers_of_stage x b x heads/tp x max_length x head_dim x bytes_per_element

The cache is allocated once, at its full length (prompt + tokens to
generate), on the model's device and in its dtype: no reallocation or
concatenation while generating.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one pipeline stage on one tensor-parallel rank: ``[layers, b, heads/tp, max_length, hd]``.

    ``length`` positions are filled (the same for every sequence of the batch).
    A forward pass of ``s`` new positions calls :meth:`layer` ``(i).append(k, v)``
    in each layer, then :meth:`advance` ``(s)`` once.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int) -> KVCache:
        """A cache sized for this rank's ``ParallelGPT`` stage: its layers, its heads, its dtype and device."""
        param = next(model.parameters())
        heads = model.layers[0].self_attention.num_heads_per_partition if len(model.layers) else 0
        return cls(len(model.layers), batch_size, heads, max_length, model.config.head_dim, param.dtype, param.device)

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequence ``rows[i]`` in row i (beam search: each surviving beam takes its parent's cache)."""
        self.keys[:, :, :, : self.length] = self.keys[:, rows, :, : self.length]
        self.values[:, :, :, : self.length] = self.values[:, rows, :, : self.length]


class LayerCache:
    """One layer's view of a :class:`KVCache`, handed to its attention."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k, v [b, nh, s, hd]`` after the cached positions; return all of them ``[b, nh, length + s, hd]``."""
        cache, start = self.cache, self.cache.length
        end = start + k.size(2)
        if end > cache.max_length:
            raise RuntimeError(f"the key/value cache holds {cache.max_length} positions; "
                               f"{start} are filled and {k.size(2)} more do not fit")
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
