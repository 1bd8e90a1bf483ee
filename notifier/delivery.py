"""One webhook POST through the SSRF guard: the callback's host is resolved once, every address
vetted (private, loopback, link-local and metadata addresses are refused before any connection),
and the request sent to the vetted IP. Redirects are not followed: a 3xx is a failed delivery."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import requests

from contract.errors import AccessDenied, InvalidRequest, ServiceError
from contract.netguard import (
    IPNetwork,
    check_requests,
    new_session,
    pin,
    shorten,
    transport_error,
)

USER_AGENT = "imgcls-notifier"


@dataclass(frozen=True)
class Outcome:
    """How one POST went: delivered, worth retrying, or never going to work (``permanent``)."""

    delivered: bool
    permanent: bool = False
    error: str = ""


DELIVERED = Outcome(delivered=True)


class Poster:
    """POSTs webhooks from many threads: one pinned requests.Session per thread."""

    def __init__(
        self,
        allowed_networks: tuple[IPNetwork, ...] = (),
        *,
        timeout_s: float,
        ca_bundle: Path | None = None,
    ) -> None:
        check_requests()
        self.allowed_networks = allowed_networks
        self.timeout_s = timeout_s
        self.verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._local = threading.local()

    def post(self, url: str, body: str, headers: dict[str, str]) -> Outcome:
        try:
            target = pin(url, self.allowed_networks)
            response = self._session().post(
                target.pinned_url,
                data=body.encode(),
                headers={
                    **headers,
                    "Host": target.host_header,
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                },
                allow_redirects=False,
                stream=True,  # the answer's body is never read
                timeout=self.timeout_s,
                verify=self.verify,
            )
        except (AccessDenied, InvalidRequest) as e:  # a refused address or a malformed URL
            return Outcome(delivered=False, permanent=True, error=f"{e.type}: {e}")
        except ServiceError as e:  # DNS did not answer: maybe later
            return Outcome(delivered=False, error=f"{e.type}: {e}")
        except requests.RequestException as e:
            return Outcome(delivered=False, error=str(transport_error(url, e)))
        response.close()
        return _judge(url, response.status_code)

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = new_session()
        session: requests.Session = self._local.session
        return session


def _judge(url: str, status: int) -> Outcome:
    """2xx delivers; 410 Gone says the receiver wants no more; anything else is retried."""
    if 200 <= status < 300:
        return DELIVERED
    error = f"HTTP {status} from {shorten(url)}"
    return Outcome(delivered=False, permanent=status == 410, error=error)
