"""Inference-time cognition: stability, agency, PRSC concepts, sedenion memory, stochastic resonance.

State lives in a :class:`CognitiveSession` (``model.session``), never inside the ``nn.Module``;
``ResoLLMModel`` exposes the seed document's methods through :class:`api.CognitionMixin`, and
``core_model.inference.ResoLLMInference`` decodes with all of it (``decoding.py``).
"""

from .agency import AttentionFocus, Goal
from .errors import CognitionError, SessionStateError
from .memory import Moment, Recollection, TemporalSedenionMemory
from .prsc import ConceptBinding, ConceptStore
from .session import CognitiveSession
from .stability import PredictiveStability, TemperatureController

__all__ = [
    "AttentionFocus", "Goal", "CognitionError", "SessionStateError", "Moment", "Recollection",
    "TemporalSedenionMemory", "ConceptBinding", "ConceptStore", "CognitiveSession", "PredictiveStability",
    "TemperatureController",
]
