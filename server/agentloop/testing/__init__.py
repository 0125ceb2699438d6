"""Test and benchmark support: a scriptable fake Ollama server on loopback."""
