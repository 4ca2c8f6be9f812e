"""Using ``LayerDynamicLRP`` with Captum's ``LLMGradientAttribution``.

Captum checks the wrapped method against ``LLMGradientAttribution.SUPPORTED_METHODS``.
Either call :func:`register_llm_support` once (it adds ``LayerDynamicLRP`` to that
tuple; nothing else is changed), after which the usual line works::

    register_llm_support()
    llm_attr = LLMGradientAttribution(LayerDynamicLRP(model, model.get_input_embeddings()), tokenizer)

or use :class:`DynamicLRPLLMAttribution`, a subclass that accepts it without touching Captum.
"""

from __future__ import annotations

from captum.attr import LLMGradientAttribution

from .layer import LayerDynamicLRP


def register_llm_support() -> None:
    """Let ``LLMGradientAttribution`` accept :class:`~captum_dynamiclrp.LayerDynamicLRP` (idempotent)."""
    if LayerDynamicLRP not in LLMGradientAttribution.SUPPORTED_METHODS:
        LLMGradientAttribution.SUPPORTED_METHODS = LLMGradientAttribution.SUPPORTED_METHODS + (LayerDynamicLRP,)


class DynamicLRPLLMAttribution(LLMGradientAttribution):
    """``LLMGradientAttribution`` that also accepts :class:`~captum_dynamiclrp.LayerDynamicLRP`."""

    SUPPORTED_METHODS = LLMGradientAttribution.SUPPORTED_METHODS + (LayerDynamicLRP,)
