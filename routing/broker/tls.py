"""TLS options for ``rediss://`` URLs, carried in the URL so every Redis client the project makes gets them.

redis-py, kombu (the broker) and Celery's result backend all read the same query
options from a ``rediss://`` URL: ``ssl_cert_reqs`` (``required``, ``optional``,
``none``), ``ssl_ca_certs`` (a CA bundle file), ``ssl_certfile``/``ssl_keyfile``
(a client certificate). :func:`tls_url` fills in what is missing:

* ``ssl_cert_reqs=required`` (kombu would otherwise skip verifying the server's
  certificate, and Celery's result backend refuses a ``rediss://`` URL without it);
* ``ssl_ca_certs`` from ``FLAGSHIP_REDIS_CA_FILE``, for a private CA.

Options already in the URL win. ``redis://`` URLs (ACL users included:
``redis://user:password@host:6379/0``) pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

#: Environment variable naming a CA bundle for ``rediss://`` servers (when the URL names none).
CA_FILE_ENV = "FLAGSHIP_REDIS_CA_FILE"


def tls_url(url: str, env: Mapping[str, str] | None = None) -> str:
    """``url`` with the TLS options every client needs, if it is a ``rediss://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    env = os.environ if env is None else env
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    added = {}
    if "ssl_cert_reqs" not in query:
        added["ssl_cert_reqs"] = "required"
    ca_file = (env.get(CA_FILE_ENV) or "").strip()
    if ca_file and "ssl_ca_certs" not in query:
        added["ssl_ca_certs"] = ca_file
    if not added:
        return url
    extra = urlencode(added, quote_via=quote, safe="/")
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))
