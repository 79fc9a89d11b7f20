"""Encoders, search, answers, evaluation and the command line."""
