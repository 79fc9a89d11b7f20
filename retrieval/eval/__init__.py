"""Retrieval and answer evaluation."""
