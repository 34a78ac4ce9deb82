"""Whether the Hugging Face hub can be reached, asked once the same way by every demo that may download."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "on", "yes", "true"}


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers within ``timeout`` seconds, and why not.

    ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set to a true value means no;
    ``HF_ENDPOINT`` (a mirror) is the address tried, huggingface.co otherwise.
    """
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in _TRUE:
            return False, f"{variable} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as error:
        return False, f"{host}:{port} unreachable ({error})"
