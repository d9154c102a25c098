"""Retries for calls to a tracking store: jittered back-off, and which failures are final."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def rejected(e: BaseException) -> bool:
    """The store answered and refused the request (a changed param, a missing run):
    retrying or keeping it cannot help, unlike a store that does not answer."""
    return getattr(e, "error_code", None) in REJECTED or isinstance(e, FileNotFoundError)


def retrying(
    what: str, fn: Callable[..., T], *args: Any, retries: int = 6, delay: float = 0.5, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)``, retried ``retries`` times in all with jittered exponential
    back-off (0.5, 1, 2, 4, 8 s by default: about 15 s, longer than SQLite's 5 s lock
    timeout twice over); the last failure, or a :func:`rejected` request, is raised."""
    for attempt in range(1, retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the caller decides what a final failure means
            if attempt == retries or rejected(e):
                raise
            log.debug("MLflow: %s failed (%s), retry %d", what, e, attempt)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay *= 2
    raise AssertionError("unreachable")


def fail_fast_over_http(uri: str) -> None:
    """MLflow's HTTP client retries 7 times with exponential back-off and waits 120 s per
    request by default: minutes of stalled training per call while a server is down.
    medlit retries and keeps calls itself, so a request fails within 10 s."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
