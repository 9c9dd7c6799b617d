"""Is the Hugging Face Hub reachable? One fast check instead of minutes of retries.

``datasets`` and ``huggingface_hub`` retry a refused connection several times (about a minute
in all) before they fail, and then with a message about repo ids or caches. Every hub load in
anchor-lens asks ``hub_reachable`` first and, when the answer is no, fails at once with
``HubUnreachableError``, which names the local
alternative.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

__all__ = ["HubUnreachableError", "hub_offline_reason", "hub_reachable"]

_TRUE = ("1", "true", "yes", "on")


class HubUnreachableError(FileNotFoundError):
    """A model or data set was to come from the Hugging Face Hub, which cannot be reached."""


def _offline_flag() -> str | None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").lower() in _TRUE:
            return f"{name} is set"
    return None


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    # urllib honours the *_PROXY variables, as the hub clients do.
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # the server answered: it is reachable
    except (OSError, ValueError) as err:
        return f"{endpoint} did not answer ({type(err).__name__}: {err})"
    return None


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline flag set, or no answer), or ``None`` if it can.

    The network probe runs once per process and endpoint; the offline flags are read each time.
    """
    flag = _offline_flag()
    if flag is not None:
        return flag
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint, timeout)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (see ``hub_offline_reason``)."""
    return hub_offline_reason(timeout) is None
