"""Orchestration: scenarios, strategies, runs, the Ray Train launcher and the ``reso`` CLI."""
