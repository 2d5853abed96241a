"""Prefect flows composing the tasks, the MLflow edge, and the `dplora` command line."""
