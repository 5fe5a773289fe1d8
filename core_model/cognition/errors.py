"""Typed errors of the inference-time cognition layer."""

from __future__ import annotations


class CognitionError(RuntimeError):
    """A cognition request cannot be served (component disabled, no tokenizer, limit reached)."""


class SessionStateError(ValueError):
    """A serialised session dict is malformed or does not match the model it is restored into."""
