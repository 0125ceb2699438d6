"""agentloop: a typed, streaming, observable gRPC gateway in front of a local LLM."""

__version__ = "0.1.0"
