"""Perturbation faithfulness: Most- and Least-Relevant-First removal curves, ABPC, comprehensiveness, sufficiency.

An attribution is faithful when removing what it calls relevant hurts the prediction
quickly (a steep **MoRF** curve) while removing what it calls irrelevant hurts it
slowly (a flat **LeRF** curve). Everything here follows Captum's calling style::

    >>> from captum_dynamiclrp.metrics import faithfulness, plot_curves
    >>> attr = DynamicLRP(model).attribute(x, target=labels)
    >>> result = faithfulness(model, x, attr, target=labels, features="patches", patch_size=16)
    >>> result.abpc.mean(), result.comprehensiveness.mean(), result.sufficiency.mean()
    >>> plot_curves({"DynamicLRP": result})

Definitions (``n = n_steps``, fractions ``t_s = s / n`` for ``s = 0..n``; per example):

- **features**: the units that are removed together: ``"pixels"`` (all channels of one
  location of an ``N x C x H x W`` image), ``"patches"`` (``patch_size`` squares; their
  relevance is the sum over the square), ``"tokens"`` (positions of ``N x L`` token ids
  or ``N x L x D`` embeddings), ``"elements"`` (every input element), or an integer
  feature mask as in Captum (``feature_mask``). A feature's relevance is the sum of the
  attributions of its elements.
- **order**: MoRF removes features by decreasing relevance, LeRF by increasing
  relevance. Relevance is signed: the most positive feature is the most relevant one.
  Ties are broken by one random permutation drawn from ``seed``, the same for both
  orders (an attribution that ties everything has an ABPC of 0).
- **step** ``s``: the ``round(t_s * F)`` first features of the order are replaced, with
  ``F`` the number of features of the example that may be removed (``perturbable``).
- **y**: the probability (softmax over the last output dimension; sigmoid for a single
  output) or the logit of the explained target, on the perturbed input.
- **AUC**: trapezoidal area of ``y`` over ``t`` in ``[0, 1]``.
- **ABPC** (area between perturbation curves, Schulz et al. 2020):
  ``AUC(LeRF) - AUC(MoRF)``; larger is better.
- **comprehensiveness** (DeYoung et al. 2020, averaged over the grid):
  ``(1/n) sum_{s=1..n} [y_0 - MoRF(t_s)]``: how much removing the top features hurts;
  larger is better.
- **sufficiency**: ``(1/n) sum_{s=1..n} [y_0 - y(keep only the top t_s)]``; keeping the top
  ``t_s`` is removing the least relevant ``1 - t_s``, so the terms are
  ``y_0 - LeRF(t_{n-s})``; smaller is better.

Replacement (what a removed feature becomes): ``"blur"`` (a Gaussian-blurred copy of
the image), ``"constant"`` (``replacement_value``), ``"mean"`` (per example and channel
mean of an image; per example mean otherwise), ``"token"`` (the token id
``replacement_value``, e.g. the pad or mask token) or a tensor broadcastable to the
inputs (e.g. a data set mean, or the embedding of a mask token).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FaithfulnessResult",
    "PerturbationCurve",
    "abpc",
    "comprehensiveness",
    "faithfulness",
    "feature_groups",
    "feature_relevance",
    "perturbation_curve",
    "plot_curves",
    "replacement_tensor",
    "sufficiency",
]

FEATURES = ("pixels", "patches", "tokens", "elements")
REPLACEMENTS = ("blur", "constant", "mean", "token")
ORDERS = ("morf", "lerf")


# --------------------------------------------------------------------------- results


@dataclass
class PerturbationCurve:
    """One removal curve per example.

    Attributes:
        order: ``"morf"`` or ``"lerf"``.
        fractions: ``(S,)`` fractions of removed features, from 0 to 1.
        scores: ``(N, S)`` probability (or logit) of the target after each step.
        output: ``"probability"`` or ``"logit"``.
    """

    order: str
    fractions: Tensor
    scores: Tensor
    output: str = "probability"

    @property
    def auc(self) -> Tensor:
        """``(N,)`` trapezoidal area under each example's curve over ``[0, 1]``."""
        return torch.trapezoid(self.scores, self.fractions, dim=-1)

    def mean(self) -> Tensor:
        """``(S,)`` mean curve over the examples."""
        return self.scores.mean(0)


@dataclass
class FaithfulnessResult:
    """MoRF and LeRF curves of the same examples, and the scores derived from them.

    All per-example scores have shape ``(N,)``; :meth:`summary` gives their means.
    """

    morf: PerturbationCurve
    lerf: PerturbationCurve
    extra: dict = field(default_factory=dict)

    @property
    def fractions(self) -> Tensor:
        return self.morf.fractions

    @property
    def abpc(self) -> Tensor:
        """``AUC(LeRF) - AUC(MoRF)`` (larger is better)."""
        return self.lerf.auc - self.morf.auc

    @property
    def comprehensiveness(self) -> Tensor:
        """Mean drop of ``y`` when the top ``t_s`` features are removed (larger is better)."""
        return comprehensiveness(self.morf)

    @property
    def sufficiency(self) -> Tensor:
        """Mean drop of ``y`` when only the top ``t_s`` features are kept (smaller is better)."""
        return sufficiency(self.lerf)

    def summary(self) -> dict[str, float]:
        """Means over the examples, with the standard error of the ABPC mean."""
        n = self.abpc.numel()
        sem = float(self.abpc.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return {
            "abpc": float(self.abpc.mean()),
            "abpc_sem": sem,
            "auc_morf": float(self.morf.auc.mean()),
            "auc_lerf": float(self.lerf.auc.mean()),
            "comprehensiveness": float(self.comprehensiveness.mean()),
            "sufficiency": float(self.sufficiency.mean()),
            "n": n,
        }


def comprehensiveness(morf: PerturbationCurve) -> Tensor:
    """``(1/n) sum_{s=1..n} [y_0 - MoRF(t_s)]`` per example."""
    _check_order(morf, "morf")
    scores = morf.scores
    return (scores[:, :1] - scores[:, 1:]).mean(1)


def sufficiency(lerf: PerturbationCurve) -> Tensor:
    """``(1/n) sum_{s=1..n} [y_0 - LeRF(t_{n-s})]`` per example: keep the top ``t_s``, drop the rest."""
    _check_order(lerf, "lerf")
    scores = lerf.scores
    return (scores[:, :1] - scores[:, :-1]).mean(1)


def abpc(
    forward_func: Callable,
    inputs: Union[Tensor, tuple[Tensor, ...]],
    attributions: Union[Tensor, tuple[Tensor, ...]],
    target: Any = None,
    additional_forward_args: Any = None,
    **kwargs: Any,
) -> Tensor:
    """``(N,)`` area between the LeRF and MoRF curves; keywords as for :func:`faithfulness`."""
    return faithfulness(forward_func, inputs, attributions, target, additional_forward_args, **kwargs).abpc


def _check_order(curve: PerturbationCurve, order: str) -> None:
    if curve.order != order:
        raise ValueError(f"expected a {order.upper()} curve, got a {curve.order.upper()} one")


# --------------------------------------------------------------------------- features


def feature_groups(
    inputs: Tensor, features: Union[str, Tensor] = "pixels", patch_size: int = 16
) -> Tensor:
    """Integer map of features: ``(1 or N, *inputs.shape[1:])`` ids ``0..F-1``, broadcastable to ``inputs``.

    ``"pixels"`` and ``"patches"`` need ``N x C x H x W`` inputs; ``"tokens"`` takes
    ``N x L`` ids or ``N x L x ...`` embeddings (every position of dimension 1 is one
    feature). A tensor is used as the feature mask itself (Captum's ``feature_mask``).
    """
    shape = inputs.shape
    device = inputs.device
    if isinstance(features, Tensor):
        groups = features.to(device=device, dtype=torch.long)
        while groups.dim() < inputs.dim():
            groups = groups.unsqueeze(0)
        try:
            torch.broadcast_shapes(groups.shape, shape)
        except RuntimeError:
            raise ValueError(
                f"feature mask of shape {tuple(features.shape)} does not broadcast to inputs {tuple(shape)}"
            ) from None
        if groups.shape[0] not in (1, shape[0]):
            raise ValueError("a feature mask must have batch size 1 or that of the inputs")
        if bool((groups < 0).any()):
            raise ValueError("feature mask ids must be >= 0")
        return groups
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; use one of {FEATURES} or a feature mask tensor")
    if features in ("pixels", "patches"):
        if inputs.dim() != 4:
            raise ValueError(f"features={features!r} needs N x C x H x W inputs, got shape {tuple(shape)}")
        height, width = shape[2], shape[3]
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        if features == "patches":
            if patch_size < 1:
                raise ValueError(f"patch_size must be >= 1, got {patch_size}")
            rows, cols = rows // patch_size, cols // patch_size
            width = -(-width // patch_size)
        return (rows[:, None] * width + cols[None, :]).view(1, 1, shape[2], shape[3])
    if features == "tokens":
        if inputs.dim() < 2:
            raise ValueError(f"features='tokens' needs N x L (ids) or N x L x D inputs, got shape {tuple(shape)}")
        ids = torch.arange(shape[1], device=device)
        return ids.view(1, shape[1], *([1] * (inputs.dim() - 2)))
    per_example = math.prod(shape[1:])
    return torch.arange(per_example, device=device).view(1, *shape[1:])


def _reduce_to_inputs(attributions: Tensor, inputs: Tensor) -> Tensor:
    """Attributions with the input's shape: extra trailing dims (e.g. an embedding dimension) are summed."""
    attributions = attributions.detach()
    if attributions.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"attributions have {attributions.shape[0]} examples but inputs have {inputs.shape[0]}"
        )
    while attributions.dim() > inputs.dim():
        attributions = attributions.sum(-1)
    if attributions.shape != inputs.shape:
        raise ValueError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs {tuple(inputs.shape)} "
            "(extra trailing dimensions are summed; others must match)"
        )
    return attributions


def feature_relevance(
    attributions: Tensor, inputs: Tensor, groups: Tensor
) -> tuple[Tensor, Tensor]:
    """``(N, F)`` summed relevance per feature, and ``(N, F)`` whether each feature occurs in the example."""
    attributions = _reduce_to_inputs(attributions, inputs).to(torch.float64)
    if not bool(torch.isfinite(attributions).all()):
        raise ValueError("attributions contain NaN or inf")
    n = inputs.shape[0]
    flat_groups = groups.expand(inputs.shape).reshape(n, -1)
    count = int(flat_groups.max()) + 1 if flat_groups.numel() else 0
    relevance = torch.zeros(n, count, dtype=torch.float64, device=inputs.device)
    relevance.scatter_add_(1, flat_groups, attributions.reshape(n, -1))
    present = torch.zeros(n, count, dtype=torch.bool, device=inputs.device)
    present.scatter_(1, flat_groups, True)
    return relevance, present


# --------------------------------------------------------------------------- replacement


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``N x C x H x W`` images (reflect padding; 3 sigma radius)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1) if min(images.shape[-2:]) > 1 else 0
    if radius == 0 or sigma <= 0:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def replacement_tensor(
    inputs: Tensor,
    replacement: Union[str, Tensor] = "blur",
    replacement_value: Union[float, int, None] = None,
    blur_sigma: float = 5.0,
) -> Tensor:
    """What removed elements become: a tensor broadcastable to ``inputs``.

    ``"blur"``: Gaussian blur with ``blur_sigma`` pixels (images only); ``"constant"``:
    ``replacement_value`` (default 0); ``"mean"``: per example and channel mean of an
    image, per example mean otherwise; ``"token"``: the token id ``replacement_value``
    (integer inputs); a tensor: itself.
    """
    if isinstance(replacement, Tensor):
        value = replacement.to(device=inputs.device, dtype=inputs.dtype)
        try:
            torch.broadcast_shapes(value.shape, inputs.shape)
        except RuntimeError:
            raise ValueError(
                f"replacement of shape {tuple(value.shape)} does not broadcast to inputs {tuple(inputs.shape)}"
            ) from None
        return value
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r}; use one of {REPLACEMENTS} or a tensor")
    if replacement == "token":
        if inputs.is_floating_point():
            raise ValueError(
                "replacement='token' replaces token ids (integer inputs); for embeddings pass the "
                "replacement embedding as a tensor"
            )
        if replacement_value is None or int(replacement_value) != replacement_value:
            raise ValueError("replacement='token' needs the token id as replacement_value (e.g. the pad or mask id)")
        return torch.tensor(int(replacement_value), dtype=inputs.dtype, device=inputs.device)
    if replacement == "constant":
        value = 0 if replacement_value is None else replacement_value
        return torch.tensor(value, dtype=inputs.dtype, device=inputs.device)
    if not inputs.is_floating_point():
        raise ValueError(f"replacement={replacement!r} needs floating-point inputs; for token ids use 'token'")
    if replacement == "mean":
        dims = tuple(range(2, inputs.dim())) if inputs.dim() == 4 else tuple(range(1, inputs.dim()))
        return inputs.mean(dim=dims, keepdim=True) if dims else inputs.clone()
    if inputs.dim() != 4:
        raise ValueError(f"replacement='blur' needs N x C x H x W images, got shape {tuple(inputs.shape)}")
    return _gaussian_blur(inputs, blur_sigma)


# --------------------------------------------------------------------------- curves


def _removal_ranks(relevance: Tensor, perturbable: Tensor, order: str, perm: Tensor) -> Tensor:
    """``(N, F)`` position of each feature in the removal order; non-perturbable features come last.

    Tied features are taken in the order of ``perm`` (the same for MoRF and LeRF, so that an
    attribution with no information, all ties, has an ABPC of exactly 0).
    """
    n, count = relevance.shape
    key = -relevance if order == "morf" else relevance.clone()
    key = key.masked_fill(~perturbable, math.inf)
    sorted_positions = torch.argsort(key[:, perm], dim=1, stable=True)
    removal_order = perm[sorted_positions]
    ranks = torch.empty_like(removal_order)
    ranks.scatter_(1, removal_order, torch.arange(count, device=relevance.device).expand(n, count))
    return ranks


def _select_rows(value: Any, rows: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows.to(value.device)]
    return value


def _target_rows(target: Any, batch: int, device: torch.device) -> Optional[Tensor]:
    """The target as one index per example (None when the model gives one value per example)."""
    if target is None:
        return None
    if isinstance(target, numbers.Integral):
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, Tensor):
        if target.numel() == 1:
            return torch.full((batch,), int(target), dtype=torch.long, device=device)
        if target.dim() == 1 and target.shape[0] == batch:
            return target.to(device=device, dtype=torch.long)
        raise ValueError(f"target tensor of shape {tuple(target.shape)} for {batch} examples")
    if isinstance(target, (list, tuple)):
        if len(target) == batch and all(isinstance(t, numbers.Integral) for t in target):
            return torch.tensor([int(t) for t in target], dtype=torch.long, device=device)
        raise ValueError("a target list must give one integer class per example (tuple targets are not supported)")
    raise TypeError(f"unsupported target of type {type(target).__name__}")


def _score(output: Any, target: Optional[Tensor], output_kind: Union[str, Callable]) -> Tensor:
    from .modules import scores_of

    logits = scores_of(output).detach()
    if callable(output_kind):
        return output_kind(logits, target).reshape(-1)
    logits = logits.to(torch.float64)
    if target is None:
        values = logits.reshape(logits.shape[0], -1)
        if values.shape[1] != 1:
            raise ValueError(
                f"the model returns {values.shape[1]} values per example; pass target= to say which one"
            )
        values = values[:, 0]
        return torch.sigmoid(values) if output_kind == "probability" else values
    if logits.dim() != 2:
        logits = logits.reshape(logits.shape[0], -1)
    if output_kind == "probability":
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(-1)
        return probs.gather(1, target.view(-1, 1)).squeeze(1)
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def _single_input(inputs: Union[Tensor, tuple], name: str) -> Tensor:
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise NotImplementedError(
                f"perturbation metrics take one input tensor; got a tuple of {len(inputs)} {name}. Pass the "
                "others through additional_forward_args."
            )
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(inputs).__name__}")
    return inputs


def faithfulness(
    forward_func: Callable,
    inputs: Union[Tensor, tuple[Tensor]],
    attributions: Union[Tensor, tuple[Tensor]],
    target: Any = None,
    additional_forward_args: Any = None,
    *,
    features: Union[str, Tensor] = "pixels",
    patch_size: int = 16,
    n_steps: int = 20,
    replacement: Union[str, Tensor] = "blur",
    replacement_value: Union[float, int, None] = None,
    blur_sigma: float = 5.0,
    perturbable: Optional[Tensor] = None,
    output: Union[str, Callable[[Tensor, Optional[Tensor]], Tensor]] = "probability",
    orders: Sequence[str] = ORDERS,
    batch_size: int = 64,
    show_progress: bool = False,
    seed: int = 0,
) -> FaithfulnessResult:
    r"""MoRF and LeRF curves of one batch of examples, run together in batches of ``batch_size`` rows.

    Args:
        forward_func (Callable): The model or a function running it; called as
            ``forward_func(perturbed_inputs, *additional_forward_args)``.
        inputs (Tensor): The explained inputs, batch first (images, token ids or embeddings).
        attributions (Tensor): Attributions of the same shape (extra trailing dimensions,
            e.g. an embedding dimension for token ids, are summed).
        target (int, Tensor or list, optional): The explained output per example, as in
            Captum. None only if the model returns one value per example.
        additional_forward_args (Any, optional): Passed after the inputs; tensors whose first
            dimension is the batch size are repeated along with their example.
        features (str or Tensor): ``"pixels"``, ``"patches"``, ``"tokens"``, ``"elements"`` or an
            integer feature mask. Default ``"pixels"``.
        patch_size (int): Side of the squares for ``features="patches"``. Default 16.
        n_steps (int): Number of steps between 0 and 1 (the curves have ``n_steps + 1`` points).
        replacement (str or Tensor): ``"blur"``, ``"constant"``, ``"mean"``, ``"token"`` or a
            tensor; see :func:`replacement_tensor`. Default ``"blur"``.
        replacement_value: The constant, or the token id for ``"token"``.
        blur_sigma (float): Standard deviation of the blur, in pixels. Default 5.
        perturbable (Tensor, optional): ``(N, F)`` bool, the features that may be removed (e.g.
            no padding or special tokens); ``F`` counts only these. Default: every feature.
        output (str or Callable): ``"probability"`` (default) or ``"logit"`` of the target, or
            ``fn(logits, target) -> (rows,)``.
        orders: Which curves to compute. Default both.
        batch_size (int): Rows per forward call. Default 64.
        show_progress (bool): Show a tqdm progress bar. Default False.
        seed (int): Seed of the random tie-breaking permutation. Default 0.

    Returns:
        :class:`FaithfulnessResult` (with only the requested curves set; a missing one is None).
    """
    inputs = _single_input(inputs, "inputs")
    attributions = _single_input(attributions, "attributions")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if isinstance(output, str) and output not in ("probability", "logit"):
        raise ValueError(f"output must be 'probability', 'logit' or a callable, got {output!r}")
    orders = tuple(orders)
    if not orders:
        raise ValueError("orders must name at least one of 'morf' and 'lerf'")
    for order in orders:
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use 'morf' or 'lerf'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = inputs.shape[0]
    device = inputs.device
    groups = feature_groups(inputs, features, patch_size)
    relevance, present = feature_relevance(attributions, inputs, groups)
    if perturbable is not None:
        perturbable = perturbable.to(device=device, dtype=torch.bool)
        if perturbable.shape != present.shape:
            raise ValueError(f"perturbable must have shape {tuple(present.shape)} (examples, features)")
        present = present & perturbable
    counts = present.sum(1)
    fractions = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    removed = torch.floor(fractions.to(device)[None, :] * counts[:, None] + 0.5).long()  # (N, S)

    replacement_values = replacement_tensor(inputs, replacement, replacement_value, blur_sigma)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(relevance.shape[1], generator=generator).to(device)
    ranks = {order: _removal_ranks(relevance, present, order, perm) for order in orders}
    flat_groups = groups.expand(inputs.shape).reshape(n, -1)
    targets = _target_rows(target, n, device)
    extra = additional_forward_args
    if extra is not None and not isinstance(extra, tuple):
        extra = (extra,)

    # Rows to run: (order, example, step). The unperturbed (s=0) and fully removed (s=n) points are
    # the same for both orders; each is run once and shared.
    jobs: list[tuple[str, int]] = [("", 0), ("", n_steps)]
    jobs += [(order, s) for order in orders for s in range(1, n_steps)]
    rows = [(job, i) for job in jobs for i in range(n)]
    values = torch.empty(len(rows), dtype=torch.float64)
    chunks = range(0, len(rows), batch_size)
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(rows), desc="perturbation curves", unit="row")
    per_example_fill = replacement_values.dim() == inputs.dim() and replacement_values.shape[0] == n
    with torch.no_grad():
        for start in chunks:
            chunk = rows[start : start + batch_size]
            example = torch.tensor([i for _, i in chunk], device=device)
            steps = torch.tensor([s for (_, s), _ in chunk], device=device)
            # The endpoints remove nothing or every perturbable feature: any order gives them.
            rank = torch.stack([ranks[order or orders[0]][i] for (order, _), i in chunk])
            limit = removed[example, steps]
            remove_feature = (rank < limit[:, None]) & present[example]
            remove = remove_feature.gather(1, flat_groups[example]).view(len(chunk), *inputs.shape[1:])
            fill = replacement_values[example] if per_example_fill else replacement_values
            perturbed = torch.where(remove, fill, inputs[example])
            args = (perturbed,) if extra is None else (perturbed,) + tuple(_select_rows(a, example, n) for a in extra)
            out = forward_func(*args)
            chunk_targets = None if targets is None else targets[example]
            values[start : start + len(chunk)] = _score(out, chunk_targets, output).cpu()
            if progress is not None:
                progress.update(len(chunk))
    if progress is not None:
        progress.close()

    table = values.view(len(jobs), n)
    first, last = table[0], table[1]
    curves = {}
    for k, order in enumerate(orders):
        middle = table[2 + k * (n_steps - 1) : 2 + (k + 1) * (n_steps - 1)]
        scores = torch.cat([first[None], middle, last[None]]).T.contiguous()
        kind = output if isinstance(output, str) else "custom"
        curves[order] = PerturbationCurve(order, fractions.clone(), scores, kind)
    return FaithfulnessResult(morf=curves.get("morf"), lerf=curves.get("lerf"))


def perturbation_curve(
    forward_func: Callable,
    inputs: Union[Tensor, tuple[Tensor]],
    attributions: Union[Tensor, tuple[Tensor]],
    target: Any = None,
    additional_forward_args: Any = None,
    *,
    order: str = "morf",
    **kwargs: Any,
) -> PerturbationCurve:
    """One removal curve (``order="morf"`` or ``"lerf"``); other keywords as for :func:`faithfulness`."""
    result = faithfulness(
        forward_func, inputs, attributions, target, additional_forward_args, orders=(order,), **kwargs
    )
    return result.morf if order == "morf" else result.lerf


# --------------------------------------------------------------------------- plot


def plot_curves(
    results: Union[FaithfulnessResult, Mapping[str, FaithfulnessResult]],
    ax: Any = None,
    title: Optional[str] = None,
):
    """Mean MoRF (solid) and LeRF (dashed) curves per method, ABPC in the legend.

    Args:
        results: One :class:`FaithfulnessResult` or a mapping ``method name -> result``.
        ax: A matplotlib ``Axes`` to draw on; default a new figure.
        title: Title of the axes.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    if isinstance(results, FaithfulnessResult):
        results = {"attribution": results}
    if ax is None:
        figure = Figure(figsize=(8.0, 4.0), layout="constrained")
        ax = figure.add_subplot(1, 1, 1)
    else:
        figure = ax.figure
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(results) <= 10 else "tab20"].colors
    colors = [palette[i % len(palette)] for i in range(len(results))]
    ylabel = "probability of the target"
    for color, (name, result) in zip(colors, results.items()):
        label = name
        if result.morf is not None and result.lerf is not None:
            label = f"{name} (ABPC {float(result.abpc.mean()):.3f})"
        if result.morf is not None:
            ax.plot(result.morf.fractions.numpy(), result.morf.mean().numpy(), color=color, linestyle="-", label=label)
            ylabel = "logit of the target" if result.morf.output == "logit" else ylabel
        if result.lerf is not None:
            ax.plot(
                result.lerf.fractions.numpy(),
                result.lerf.mean().numpy(),
                color=color,
                linestyle="--",
                label=None if result.morf is not None else label,
            )
    ax.set_xlabel("fraction of features removed")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0.0, 1.0)
    ax.set_title(title or "MoRF (solid) and LeRF (dashed)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return figure
