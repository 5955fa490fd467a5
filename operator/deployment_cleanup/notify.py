"""Optional webhook notifications in Slack's incoming-webhook format: POST {"text": ...}.

A notification that cannot be delivered is logged and dropped: it must never
change what a run does.
"""

from __future__ import annotations

import logging

import httpx

from .db import Redactor

__all__ = ["send_webhook"]

logger = logging.getLogger(__name__)


async def send_webhook(url: str, text: str, redact: Redactor, timeout: float = 10.0) -> bool:
    """Post ``text``; True if the receiver accepted it."""
    try:
        async with httpx.AsyncClient(
            timeout=timeout, trust_env=False, follow_redirects=False
        ) as http:
            response = await http.post(url, json={"text": redact(text)})
    except httpx.HTTPError as exc:
        logger.warning("webhook notification failed: %s", redact(f"{type(exc).__name__}: {exc}"))
        return False
    if response.status_code >= 300:
        logger.warning("webhook notification refused: HTTP %d", response.status_code)
        return False
    return True
