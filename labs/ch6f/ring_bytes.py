"""Exercise ch6f.4: how many bytes does one forward step of ring attention send?

At every step each rank passes the keys and values it holds (its own at the first step, then the ones it
received) to the next rank. Return the bytes one rank sends in one forward step, for b sequences, `heads`
attention heads of this rank, seq_length tokens in the whole sequence, head_dim, cp ranks, and
bytes_per_element (4 for float32). How many steps send, in one forward pass?

Check: python -m lessons_pkg.labs check ch6f.4   (it runs ring attention on 2 ranks and counts)
"""


def ring_step_bytes(b: int, heads: int, seq_length: int, head_dim: int, cp: int, bytes_per_element: int) -> int:
    raise NotImplementedError("ring_step_bytes(b, heads, seq_length, head_dim, cp, bytes_per_element)")


def forward_sends(cp: int) -> int:
    raise NotImplementedError("forward_sends(cp): how many steps of one forward pass send a block")
