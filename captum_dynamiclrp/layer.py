"""``LayerDynamicLRP``: relevance at a layer's output (or input), as a Captum layer attribution."""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Union

from captum._utils.common import _format_additional_forward_args, _format_output, _format_tensor_into_tuples
from captum._utils.typing import TargetType
from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .attribution import (
    DynamicLRP,
    check_devices,
    check_keywords,
    check_scores,
    forward_context,
    warn_if_relevance_not_finite,
    warn_if_training,
    without_larger_base,
)
from .engine import SavedTensorStore
from .errors import DynamicLRPError
from .modules import owning_module
from .presets import Preset
from .rules.base import OpSpec


def _detached_leaf(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


class LayerDynamicLRP(LayerAttribution):
    r"""DynamicLRP relevance at the output (or input) of one layer.

    The layer's output is swapped, during the forward, for a fresh leaf tensor holding
    the same values; the engine then propagates relevance from the explained output to
    that leaf. The graph below the layer is never built nor walked. The typical text use
    is the embedding layer of a model that takes token ids.

    Args:
        forward_func (Callable or nn.Module): The model or a function running it.
        layer (nn.Module): The layer whose output (or input) is explained.
        device_ids (list[int], optional): Accepted for Captum compatibility; unused.
        rules, epsilon, gamma, fallback, cache_size: As for :class:`~captum_dynamiclrp.DynamicLRP`.

    Examples::

        >>> lrp = LayerDynamicLRP(model, model.get_input_embeddings())
        >>> token_relevance = lrp.attribute(input_ids, target=label).sum(-1)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Union[None, List[int]] = None,
        rules: Union[str, Preset, Mapping[str, OpSpec], None] = None,
        epsilon: Optional[float] = None,
        gamma: Optional[float] = None,
        fallback: bool = False,
        cache_size: int = 8,
    ) -> None:
        super().__init__(forward_func, layer, device_ids)
        self._lrp = DynamicLRP(
            forward_func, rules=rules, epsilon=epsilon, gamma=gamma, fallback=fallback, cache_size=cache_size
        )

    @property
    def preset(self) -> Preset:
        return self._lrp.preset

    @property
    def engine(self):
        return self._lrp.engine

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return True

    @classmethod
    def get_name(cls) -> str:
        return "LayerDynamicLRP"

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Union[Tensor, tuple],
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        **ignored: Any,
    ) -> Any:
        r"""Relevance of each element of the layer's output (or input) for the target output.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): Model inputs; token ids are fine.
            target, additional_forward_args, return_convergence_delta: As for
                :meth:`captum_dynamiclrp.DynamicLRP.attribute`.
            attribute_to_layer_input (bool, optional): Explain the layer's input instead
                of its output. Default: False.
            **ignored: Keywords of LayerIntegratedGradients and friends (``baselines``,
                ``n_steps``, ...), accepted and ignored.

        Returns:
            Relevance with the layer output's structure (a tensor, or a tuple for layers
            with several outputs / inputs), and the convergence delta if requested.
        """
        check_keywords(ignored, "LayerDynamicLRP", frozenset({"layer_baselines"}))
        formatted = _format_tensor_into_tuples(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        module = owning_module(self.forward_func)
        warn_if_training(module)
        # Devices before any value check (check_scores, the relevance check): values of a
        # tensor on the wrong device ('meta') cannot be read.
        check_devices(module, formatted)
        captured: list[tuple] = []

        def swap_output(mod: nn.Module, args: tuple, out: Any) -> Any:
            if captured:  # the layer ran twice: keep the first call's tensors
                return None
            if isinstance(out, Tensor):
                leaf = _detached_leaf(out)
                captured.append((leaf,))
                return leaf
            if isinstance(out, tuple):
                leaves = tuple(_detached_leaf(o) for o in out)
                captured.append(tuple(o for o in leaves if isinstance(o, Tensor)))
                return leaves
            raise TypeError(f"LayerDynamicLRP supports layers returning tensors or tuples, got {type(out)}")

        def swap_input(mod: nn.Module, args: tuple) -> Any:
            if captured:
                return None
            leaves = tuple(_detached_leaf(a) for a in args)
            captured.append(tuple(a for a in leaves if isinstance(a, Tensor)))
            return leaves

        handle = (
            self.layer.register_forward_pre_hook(swap_input)
            if attribute_to_layer_input
            else self.layer.register_forward_hook(swap_output)
        )
        # One context for the forward and the walk: statistics are restored only after the
        # engine has read every saved tensor. The store lets the walk free saved tensors as it goes.
        with forward_context(module), SavedTensorStore() as saved:
            try:
                args = formatted + tuple(extra) if extra is not None else formatted
                with saved.recording():
                    output = without_larger_base(check_scores(self.forward_func(*args)))
            finally:
                handle.remove()
            if not captured:
                raise DynamicLRPError("The layer was not called during the forward pass.")
            leaves = captured[0]
            float_leaves = tuple(t for t in leaves if t.is_floating_point())
            if not float_leaves:
                raise TypeError("The layer's tensors are not floating point: choose a layer after the embedding.")
            seed, selected = DynamicLRP._seed(output, target)
            handed_over = [seed]
            del seed  # the walk frees it after the first step
            relevances = self._lrp.engine.relevance(output, float_leaves, handed_over, saved=saved)
        what = "layer input" if attribute_to_layer_input else "layer output"
        warn_if_relevance_not_finite(relevances, what, "LayerDynamicLRP")
        single = len(leaves) == 1
        result = _format_output(not single, tuple(relevances))
        if not return_convergence_delta:
            return result
        return result, DynamicLRP._delta(tuple(relevances), selected.detach())
