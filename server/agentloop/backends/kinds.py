"""One backend per kind of engine: what the server builds for `--backend` and what the
router builds for each endpoint of a pool."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from agentloop.backends.base import Backend
from agentloop.config import Settings, SettingsError
from agentloop.upstreams.spec import EndpointSpec

if TYPE_CHECKING:
    from agentloop.backends.embedded import EmbeddedBackend


def embedded_backend(settings: Settings) -> EmbeddedBackend:
    """The in-process engine; SettingsError when the `embedded` extra is missing."""
    try:
        from agentloop.backends.embedded import EmbeddedBackend
    except ImportError as exc:
        raise SettingsError(
            "the embedded engine needs the 'embedded' extra: pip install 'agentloop[embedded]' "
            f"({exc})"
        ) from None
    return EmbeddedBackend(settings)


def backend_for(spec: EndpointSpec, settings: Settings) -> Backend:
    """One endpoint's backend, by its upstream's kind."""
    if spec.kind == "ollama":
        from agentloop.backends.ollama import OllamaBackend

        return OllamaBackend(dataclasses.replace(
            settings, ollama_url=spec.url, connect_timeout=spec.connect_timeout,
            read_timeout=spec.read_timeout, max_in_flight=spec.max_in_flight,
            max_connections=max(spec.max_in_flight * 2, 8)),
            remote=spec.remote, propagate_trace=spec.propagate_trace)
    if spec.kind == "openai":
        from agentloop.backends.openai import OpenAIBackend

        return OpenAIBackend(spec, settings)
    return embedded_backend(settings)
