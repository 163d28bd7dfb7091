"""SpecInfer: tree-based speculative inference and verification."""
from .config import EngineConfig, SamplingParams, TreeConfig
from .engine import GenerationResult, SpecInferEngine
from .serving.parameters import engine_from_config

__all__ = ["EngineConfig", "GenerationResult", "SamplingParams", "SpecInferEngine", "TreeConfig", "engine_from_config"]
