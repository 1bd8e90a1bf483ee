"""Standard Webhooks signatures (https://www.standardwebhooks.com): ``webhook-signature`` is
``v1,`` + base64 HMAC-SHA256 of ``{webhook-id}.{webhook-timestamp}.{body}`` under the secret."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timezone

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


class Signer:
    """Signs webhook bodies with one ``whsec_...`` secret."""

    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(check_secret(secret))

    def headers(self, webhook_id: str, body: str, now: float) -> dict[str, str]:
        """The three Standard Webhooks headers for ``body`` sent at unix second ``now``."""
        sent = datetime.fromtimestamp(int(now), timezone.utc)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": self._webhook.sign(webhook_id, sent, body),
        }


def check_secret(secret: str) -> str:
    """Refuse a secret that is not ``whsec_`` + base64 of at least 24 bytes, saying how to fix."""
    fix = "make one with: python -m notifier new-secret"
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"the webhook secret must start with {SECRET_PREFIX!r}; {fix}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError as e:
        raise ValueError(f"the webhook secret is not base64 after {SECRET_PREFIX!r}; {fix}") from e
    if len(key) < 24:
        raise ValueError(f"the webhook secret is {len(key)} bytes; use 24 to 64. {fix}")
    return secret


def new_secret() -> str:
    """A fresh random secret in the ``whsec_`` form that receivers' libraries expect."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
