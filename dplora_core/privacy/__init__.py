"""Differential privacy: mechanism maths (pure tensor functions), per-example gradients, accounting."""
