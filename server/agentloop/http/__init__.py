"""The HTTP door: an OpenAI-compatible API on its own port, a thin translation to the same
services the gRPC servicer calls (`door` serves, `requests` reads, `responses` writes,
`errors` maps the one error table to HTTP statuses and OpenAI's error shape)."""
