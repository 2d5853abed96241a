"""Prefect tasks: thin wrappers over dplora_core with their retry policy on the decorator (what a privacy mode
allows is decided per round in flows.federated.client_trainer)."""
