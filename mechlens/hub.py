"""Is the Hugging Face hub (or the web) reachable? Decided fast, so offline use fails in < 2 s."""

from __future__ import annotations

import os
import socket

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def reachable(host: str = "huggingface.co", timeout: float = 1.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
