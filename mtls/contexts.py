"""SSL contexts for the two ends of the pilot's port, and who is on the other end.

The pilot's end requires a client certificate from the site CA; which subjects may do what is
decided per request from `peer_subject`. The gateway's end checks the pilot's chain against the
site CA but no host name (compute nodes have none that is stable); the pilot certificate's
serverAuth usage, checked by OpenSSL, keeps other identities of the same CA from posing as one.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from mtls.certificates import subject_of


def server_context(certificate: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """For the pilot: TLS 1.2 or later, a client certificate signed by `ca` required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(certificate), str(key))
    return context


def client_context(certificate: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """For the gateway (or a metrics scraper) calling a pilot."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(certificate), str(key))
    return context


def peer_subject(transport: Any) -> str | None:
    """The RFC 4514 subject of the verified client certificate on `transport` (an asyncio
    transport, such as aiohttp's `request.transport`); None without TLS or a certificate."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return subject_of(der) if der else None
