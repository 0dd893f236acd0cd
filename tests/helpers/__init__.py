"""Shared test helpers (small models and data); imported as ``tests.helpers`` from the repository root."""
