"""Solution ch6f.4. One block: keys and values of s / cp tokens, 2 x b x heads x (s / cp) x d elements; the
last of the cp steps has nothing left to pass on, so cp - 1 steps send."""


def ring_step_bytes(b: int, heads: int, seq_length: int, head_dim: int, cp: int, bytes_per_element: int) -> int:
    return 2 * b * heads * (seq_length // cp) * head_dim * bytes_per_element


def forward_sends(cp: int) -> int:
    return cp - 1
