"""captum_dynamiclrp: Layer-wise Relevance Propagation for any PyTorch model, as a Captum method.

>>> from captum_dynamiclrp import DynamicLRP
>>> attr = DynamicLRP(model).attribute(x, target=3)
"""

from .attribution import DynamicLRP
from .coverage import CoverageReport, coverage
from .engine import Engine, relevance
from .errors import DynamicLRPError, UnrecoverableOperandError, UnsupportedOperationError
from .layer import LayerDynamicLRP
from .llm import DynamicLRPLLMAttribution, register_llm_support
from .modules import scores_of
from .presets import DEFAULT_PRESET, PRESETS, Preset
from .rules import RULE_TABLE, OpSpec, RuleContext
from .visualization import text_record, to_image, to_image_attr, token_relevance

__version__ = "0.1.0"

__all__ = [
    "CoverageReport",
    "DEFAULT_PRESET",
    "DynamicLRP",
    "DynamicLRPError",
    "DynamicLRPLLMAttribution",
    "Engine",
    "LayerDynamicLRP",
    "OpSpec",
    "PRESETS",
    "Preset",
    "RULE_TABLE",
    "RuleContext",
    "UnrecoverableOperandError",
    "UnsupportedOperationError",
    "coverage",
    "register_llm_support",
    "relevance",
    "scores_of",
    "text_record",
    "to_image",
    "to_image_attr",
    "token_relevance",
]
