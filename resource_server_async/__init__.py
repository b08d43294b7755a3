"""The existing Django gateway's module paths, resolving to this gateway's adaptor contract.

A site's adaptors written for the existing gateway import `BaseEndpoint`, `BaseCluster`, their
response models and exceptions from `resource_server_async.*`; this small package lets those
imports work unchanged. It holds no Django code. Where Django is installed, its settings are
configured with defaults if nothing configured them, so that an adaptor may still build Django's
`StreamingHttpResponse` as the existing gateway's documentation shows (the gateway reads its
`streaming_content`).
"""

from __future__ import annotations

try:
    from django.conf import settings as _django_settings
except ImportError:
    pass
else:
    if not _django_settings.configured:
        _django_settings.configure()
