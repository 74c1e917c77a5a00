"""The HTTP server: metrics, probes, the /v1 API (aiohttp)."""
