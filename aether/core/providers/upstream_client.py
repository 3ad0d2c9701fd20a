"""The HTTP client of the HTTP path, built from the settings: which transport, which CAs, which
proxies.

Two transports (``llm_transport``):

- ``aether`` (the default): ``StreamingTransport``, HTTP/1.1 on Trio streams, about 20 % less CPU
  per chunk read than httpx's own (see its module);
- ``httpx``: httpx's own transport (httpcore), with HTTP/2 to upstreams that offer it.

With either, what httpx users expect holds: ``llm_ca_file`` (a PEM bundle) replaces the default
CAs (certifi's), and the standard proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY``, ``NO_PROXY``) are honoured. A request that goes through a proxy is carried by
httpx's own proxy transport, whichever transport serves the others.

@.architecture
role: upstream client
jobs: [http_communication, config_loading]
"""

from __future__ import annotations

import ssl

import httpx
from httpx._utils import get_environment_proxies

from aether.config import Settings
from aether.core.providers.streaming_transport import StreamingTransport


def upstream_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The CAs upstream certificates are checked against: ``llm_ca_file``, else certifi's."""
    ca_file = settings.llm_ca_file
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return httpx.create_ssl_context()


def upstream_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    limits = settings.llm_max_connections
    if settings.llm_transport == "httpx":
        return httpx.AsyncHTTPTransport(
            verify=upstream_ssl_context(settings),
            http2=True,
            limits=httpx.Limits(max_connections=limits, max_keepalive_connections=limits),
            trust_env=False,  # the client applies the environment's proxies itself
        )
    context = upstream_ssl_context(settings)
    context.set_alpn_protocols(["http/1.1"])
    return StreamingTransport(max_connections=limits, ssl_context=context)


def proxy_mounts(settings: Settings) -> dict[str, httpx.AsyncBaseTransport | None]:
    """httpx mounts for the environment's proxy variables: a proxy transport per proxied
    pattern, None (the client's own transport) for the ``NO_PROXY`` ones. httpx applies the
    environment only when it builds the transport itself, so this does what it would, with its
    own reading of the variables (``NO_PROXY`` as curl reads it)."""
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for pattern, proxy_url in get_environment_proxies().items():
        mounts[pattern] = (
            None
            if proxy_url is None
            else httpx.AsyncHTTPTransport(
                proxy=proxy_url,
                verify=upstream_ssl_context(settings),
                http2=settings.llm_transport == "httpx",
                limits=httpx.Limits(max_connections=settings.llm_max_connections),
            )
        )
    return mounts


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    """The client the HTTP path streams with; the caller closes it."""
    return httpx.AsyncClient(
        transport=upstream_transport(settings),
        mounts=proxy_mounts(settings),
        trust_env=False,  # the environment's proxies are in the mounts; no .netrc
        timeout=httpx.Timeout(
            connect=settings.llm_connect_timeout_s,
            read=settings.llm_read_timeout_s,
            write=settings.llm_read_timeout_s,
            pool=settings.llm_connect_timeout_s,
        ),
    )
