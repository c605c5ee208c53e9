"""The agent's HTTP API (aiohttp)."""
