"""copyfree encoder service: image bytes -> detection keys and retrieval codes."""
