"""SpecInfer: tree-based speculative inference and verification."""
from .config import EngineConfig, SamplingParams, TreeConfig
from .engine import GenerationResult, SpecInferEngine

__all__ = ["EngineConfig", "GenerationResult", "SamplingParams", "SpecInferEngine", "TreeConfig"]
