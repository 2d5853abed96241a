"""Prefect tasks: thin wrappers over dplora_core with retries, timeouts and caching on the decorator."""
