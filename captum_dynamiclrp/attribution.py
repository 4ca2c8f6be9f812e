"""``DynamicLRP``: the engine as a Captum attribution method."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _select_targets,
)
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from .engine import Engine, SavedTensorStore
from .errors import UnsupportedOperationError
from .modules import buffers_restored, in_training_mode, locate_module, owning_module, parameters_tracked
from .presets import Preset, resolve_preset
from .rules.base import OpSpec

# Keywords of IntegratedGradients / GradientShap / NoiseTunnel that DynamicLRP accepts and ignores,
# so that swapping the constructor is the only change a pipeline needs.
IGNORED_KEYWORDS = frozenset(
    {"baselines", "n_steps", "method", "internal_batch_size", "n_samples", "stdevs"}
)


def check_keywords(ignored: Mapping[str, Any], method: str, also_allowed: frozenset = frozenset()) -> None:
    """Reject keywords that are neither ours nor a known method's (typos must not pass silently)."""
    unknown = set(ignored) - IGNORED_KEYWORDS - also_allowed
    if unknown:
        raise TypeError(f"{method}.attribute() got unexpected keyword arguments {sorted(unknown)}")


def warn_if_training(module: Optional[nn.Module]) -> None:
    if in_training_mode(module):
        warnings.warn(
            "The model is in training mode: dropout and batch-norm batch statistics make "
            "attributions random and batch-dependent. Call model.eval() first.",
            stacklevel=4,  # the caller, past attribute() and captum.log.log_usage
        )


def check_devices(module: Optional[nn.Module], tensors: tuple) -> None:
    """Inputs must sit on the model's device: a clear message instead of a kernel error."""
    if module is None:
        return
    parameter = next(module.parameters(), None)
    if parameter is None:
        return
    for t in tensors:
        if isinstance(t, Tensor) and t.device != parameter.device:
            raise ValueError(
                f"An input is on {t.device} but the model is on {parameter.device}; "
                f"move the inputs with .to({str(parameter.device)!r})."
            )


def nonfinite_positions(tensors: Sequence[Tensor]) -> list[int]:
    r"""Positions of the tensors that hold NaN or inf.

    The per-tensor flags are reduced on the device and read back together: one host
    synchronisation per device (one in practice), not one per tensor. Tensors on the
    ``meta`` device hold no values and are skipped.

    Args:
        tensors (Sequence[Tensor]): Tensors to check; non-tensors are skipped.

    Returns:
        list[int]: Indices into ``tensors`` of the non-finite ones, in order.
    """
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and t.device.type != "meta":
            by_device.setdefault(t.device, []).append((i, torch.isfinite(t).all()))
    bad: list[int] = []
    for flagged in by_device.values():
        finite = torch.stack([flag for _, flag in flagged])
        if not bool(finite.all()):  # the one host sync; tolist() only on the failure path
            bad.extend(i for (i, _), ok in zip(flagged, finite.tolist()) if not ok)
    return sorted(bad)


def check_inputs_finite(tensors: Sequence[Tensor]) -> None:
    """Inputs must be finite: LRP of a NaN or inf input is undefined."""
    bad = nonfinite_positions(tensors)
    if bad:
        raise ValueError(f"An input contains NaN or inf (input {bad[0]} of {len(tensors)}).")


def warn_if_relevance_not_finite(
    relevances: Sequence[Tensor], what: str = "input", method: str = "DynamicLRP"
) -> None:
    r"""Warn when relevance came out NaN or inf although the inputs and the output are finite.

    That happens when the model makes an infinity *from the input* inside the forward (a log
    of zero, a ``-inf`` mask built from the input, an overflowing ``exp``) and a rule then
    meets ``inf * 0`` or ``inf - inf``. A warning rather than an error: the attributions of
    the other examples (rows without NaN) are still valid, and the caller decides.

    Args:
        relevances (Sequence[Tensor]): The attributions about to be returned.
        what (str, optional): What they are the relevance of, for the message
            (``"input"``, ``"layer output"``, ...). Default: ``"input"``.
        method (str, optional): Name of the attribution method, for the message.
            Default: ``"DynamicLRP"``.
    """
    bad = nonfinite_positions(relevances)
    if not bad:
        return
    details = []
    for i in bad:  # failure path only: extra syncs are fine here
        r = relevances[i]
        rows = (~torch.isfinite(r.reshape(r.shape[0], -1)).all(1)).nonzero().flatten().tolist() if r.dim() else []
        details.append(f"{what} {i}" + (f" (examples {rows})" if rows else ""))
    warnings.warn(
        f"{method}: the relevance of {', '.join(details)} contains NaN or inf although the inputs and "
        "the model output are finite. The model most likely produces inf/-inf from the input inside the "
        "forward (e.g. a log of zero, a -inf mask built from the input, an overflowing exp) and a rule "
        "met inf * 0; constant masks such as attention masks are fine. Attributions of the listed "
        "examples are not meaningful: make the model finite inside (e.g. clamp before the log, or use "
        "finfo.min instead of -inf) to explain them.",
        stacklevel=4,  # the caller, past attribute() and captum.log.log_usage
    )


@contextlib.contextmanager
def forward_context(module: Optional[nn.Module]) -> Iterator[None]:
    """Grad on (also under no_grad / inference_mode), parameters tracked, statistics restored."""
    with torch.inference_mode(False), torch.enable_grad(), parameters_tracked(module), buffers_restored(module):
        yield


def check_scores(output: Any) -> Tensor:
    """The model must return a finite score tensor."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The model returned {type(output).__name__}; DynamicLRP needs a tensor of scores. "
            "Wrap the model so that it returns the logits, e.g. lambda x: model(x).logits, "
            "or use captum_dynamiclrp.scores_of."
        )
    if nonfinite_positions([output.detach()]):  # one host sync per call; skipped on 'meta'
        raise ValueError("The model output contains NaN or inf; relevance of a non-finite score is undefined.")
    return output


def without_larger_base(output: Tensor) -> Tensor:
    """``output``, copied if it is a view of a much larger tensor (a language model's ``logits[:, -1]``).

    The view would keep the whole base (every position's logits) alive through the walk, where a
    gradient pass frees it after the forward, since no autograd node keeps it. The copy adds one
    routing node (``CloneBackward0``) at the root; it is made only where the base is more than
    twice the output's size.
    """
    if output.grad_fn is None or output._base is None:
        return output
    if output.untyped_storage().nbytes() <= 2 * output.numel() * output.element_size():
        return output
    return output.clone()


class DynamicLRP(Attribution):
    r"""Layer-wise Relevance Propagation on any PyTorch model, at the level of autograd operations.

    One forward pass builds the autograd graph; the engine walks it from the
    explained output to the inputs, applying one rule per operation and recovering
    forward operands autograd did not keep with the Promise System. No
    module-specific code: the same rule table covers any model made of its ops.

    The relevance at the output is the target logit itself, so attributions of an
    example add up to its target output minus what biases absorbed; that
    difference is the convergence delta.

    Args:
        forward_func (Callable or torch.nn.Module): The model or a function running it.
        rules (str or Preset or Mapping[str, OpSpec], optional): ``"epsilon"`` (default),
            ``"gamma"``, ``"zplus"``, a :class:`~captum_dynamiclrp.presets.Preset`, or a
            mapping of per-op overrides applied on the default preset.
        epsilon (float, optional): Stabiliser; overrides the preset's (default 1e-6).
        gamma (float, optional): Gamma of the ``"gamma"`` preset (default 0.25).
        batch_norm (str, optional): ``"merge"`` merges each batch norm into the convolution
            before it (as Zennit's canonizers do; faster, and equal to LRP on the canonized
            network); overrides the preset's (default ``"epsilon"``: a layer of its own).
        fallback (bool, optional): Split relevance evenly over the inputs of ops with no
            rule instead of raising :class:`~captum_dynamiclrp.errors.UnsupportedOperationError`.
            Off by default; fallback ops are listed in ``last_fallback_ops``.
        cache_size (int, optional): Number of cached promise plans (default 8).

    Examples::

        >>> lrp = DynamicLRP(model)
        >>> attr, delta = lrp.attribute(x, target=3, return_convergence_delta=True)
    """

    def __init__(
        self,
        forward_func: Callable,
        rules: Union[str, Preset, Mapping[str, OpSpec], None] = None,
        epsilon: Optional[float] = None,
        gamma: Optional[float] = None,
        fallback: bool = False,
        cache_size: int = 8,
        batch_norm: Optional[str] = None,
    ) -> None:
        super().__init__(forward_func)
        self.preset = resolve_preset(rules, epsilon=epsilon, gamma=gamma, batch_norm=batch_norm)
        self.engine = Engine(
            settings=self.preset.settings(),
            overrides=self.preset.table_overrides(),
            fallback=fallback,
            cache_size=cache_size,
        )

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return True

    @classmethod
    def get_name(cls) -> str:
        return "DynamicLRP"

    @property
    def last_fallback_ops(self) -> list[str]:
        """Types of the ops the opt-in fallback handled in the last call."""
        run = self.engine.last_run
        return [] if run is None else list(run.plan.fallback_nodes)

    def clear_cache(self) -> None:
        """Forget the cached promise plans."""
        self.engine.clear_cache()

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        **ignored: Any,
    ) -> Union[TensorOrTupleOfTensorsGeneric, tuple[TensorOrTupleOfTensorsGeneric, Tensor]]:
        r"""Relevance of each input element for the target output.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): Floating-point inputs, batch first.
                For token ids, attribute at the embedding output instead
                (pass the embeddings, e.g. ``inputs_embeds``, as the input).
            target (int, tuple, Tensor or list, optional): Output index per example, in
                any form Captum accepts. May be None only if the model returns one value
                per example.
            additional_forward_args (Any, optional): Passed to the model after ``inputs``.
            return_convergence_delta (bool, optional): Also return, per example,
                ``sum(attributions) - f_target(x)``: minus the relevance absorbed by
                biases and constants (0 for a bias-free network). Default: False.
            **ignored: Keywords of IntegratedGradients and GradientShap (``baselines``,
                ``n_steps``, ``method``, ``internal_batch_size``, ...), accepted and
                ignored so that swapping the method is a one-line change.

        Returns:
            Attributions of the same structure and shapes as ``inputs``, and the
            convergence delta (shape ``(batch,)``) if requested.
        """
        check_keywords(ignored, "DynamicLRP")
        is_tuple = _is_tuple(inputs)
        formatted = _format_tensor_into_tuples(inputs)
        for x in formatted:
            if not isinstance(x, Tensor):
                raise TypeError(f"inputs must be tensors, got {type(x).__name__}")
            if not (x.is_floating_point() or x.is_complex()):
                raise TypeError(
                    f"DynamicLRP attributes floating-point inputs, got dtype {x.dtype}. For token ids, "
                    "attribute at the embedding output: pass the embeddings (e.g. inputs_embeds) as the "
                    "input, or run the engine's relevance() on the embedding tensor."
                )
        extra = _format_additional_forward_args(additional_forward_args)
        module = owning_module(self.forward_func)
        warn_if_training(module)
        # Devices first: a value check on a tensor of the wrong device ('meta') fails inside torch.
        check_devices(module, formatted)
        check_inputs_finite(formatted)

        # The store owns the tensors the forward saves, so that the walk frees them as it goes
        # (as a backward pass does); it empties them all when the block ends.
        with forward_context(module), SavedTensorStore() as saved:
            # Fresh leaves, so the user's tensors and their flags are never touched.
            leaves = tuple(x.detach().clone().requires_grad_(True) for x in formatted)

            def run_forward() -> Tensor:
                args = leaves + tuple(extra) if extra is not None else leaves
                return self.forward_func(*args)

            with saved.recording():
                output = without_larger_base(check_scores(run_forward()))
            seed, selected = self._seed(output, target)
            handed_over = [seed]
            del seed  # the walk frees it after the first step
            try:
                relevances = self.engine.relevance(output, leaves, handed_over, saved=saved)
            except UnsupportedOperationError as err:
                if module is not None and err.module_path is None:
                    path = locate_module(module, run_forward, err.node_type)
                    if path is not None:
                        raise UnsupportedOperationError(err.node_type, path) from None
                raise
        attributions = tuple(relevances)
        warn_if_relevance_not_finite(attributions)
        result = _format_output(is_tuple, attributions)
        if not return_convergence_delta:
            return result
        delta = self._delta(attributions, selected.detach())
        return result, delta

    @staticmethod
    def _seed(output: Tensor, target: TargetType) -> tuple[Tensor, Tensor]:
        """Relevance at the output (the target logit, zero elsewhere) and the selected values."""
        if output.dim() == 0:
            output_rows = output.reshape(1)
        else:
            output_rows = output
        if target is None:
            if output_rows.dim() > 1 and output_rows[0].numel() != 1:
                raise ValueError(
                    f"The model returns {tuple(output.shape[1:])} values per example; pass target= "
                    "to say which one to explain."
                )
            return output.detach(), output_rows.detach().reshape(output_rows.shape[0])
        # Flat positions, selected the way Captum selects targets; int32 where it fits, since this
        # index tensor is as large as the output (a language model's logits) and lives next to the graph.
        count = output_rows.numel()
        index_dtype = torch.int32 if count < 2**31 else torch.int64
        positions = torch.arange(count, dtype=index_dtype, device=output.device).view(output_rows.shape)
        try:
            chosen = _select_targets(positions, target)
        except (IndexError, RuntimeError, AssertionError, ValueError) as err:
            raise ValueError(
                f"Invalid target {target!r} for model output of shape {tuple(output.shape)}: {err}"
            ) from None
        del positions
        if chosen.dim() != 1 or chosen.shape[0] != output_rows.shape[0]:
            raise ValueError(
                f"target {target!r} does not select one value per example of an output of shape "
                f"{tuple(output.shape)}"
            )
        chosen = chosen.long()
        flat = output.detach().reshape(-1)
        selected = flat[chosen]
        seed = torch.zeros_like(flat)
        seed[chosen] = selected
        return seed.view(output.shape), output_rows.detach().reshape(-1)[chosen]

    @staticmethod
    def _delta(attributions: tuple[Tensor, ...], selected: Tensor) -> Tensor:
        rows = attributions[0].shape[0]
        if selected.shape[0] != rows:  # one score for the whole batch: one delta
            total = sum(a.sum() for a in attributions).reshape(1)
        else:
            total = sum((a.flatten(1) if a.dim() > 1 else a.unsqueeze(1)).sum(1) for a in attributions)
        return total - selected.to(total.dtype)

    def compute_convergence_delta(
        self,
        attributions: Union[Tensor, tuple[Tensor, ...]],
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""Per example, ``sum(attributions) - f_target(inputs)``.

        For LRP this is minus the relevance absorbed by biases and constants; it is 0
        (up to the stabiliser) for bias-free networks.

        Args:
            attributions (Tensor or tuple[Tensor, ...]): Output of :meth:`attribute`.
            inputs (Tensor or tuple[Tensor, ...]): The inputs that were explained.
            target, additional_forward_args: As in :meth:`attribute`.

        Returns:
            Tensor of shape ``(batch,)``.
        """
        attributions = _format_tensor_into_tuples(attributions)
        formatted = _format_tensor_into_tuples(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        with torch.no_grad():
            output = self.forward_func(*(formatted + tuple(extra) if extra is not None else formatted))
        _, selected = self._seed(output, target)
        return self._delta(attributions, selected)
