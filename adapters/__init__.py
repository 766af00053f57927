"""The edges: Redis, Bot Framework and HTTP. All I/O lives here."""
