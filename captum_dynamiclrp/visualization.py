"""Turning attributions into what Captum's visualisation functions expect.

``captum.attr.visualization.visualize_image_attr`` wants NumPy arrays laid out
height x width x channels, and ``visualize_text`` wants one
:class:`~captum.attr.visualization.VisualizationDataRecord` per example with a
score per token. Attributions from :class:`~captum_dynamiclrp.DynamicLRP` and
:class:`~captum_dynamiclrp.LayerDynamicLRP` (like those of any Captum method) are
batch-first tensors; these helpers bridge the two::

    >>> from captum.attr import visualization as viz
    >>> attr = DynamicLRP(model).attribute(images[:1], target=3)
    >>> fig, ax = viz.visualize_image_attr(to_image_attr(attr), to_image(images[:1]),
    ...                                     method="blended_heat_map", use_pyplot=False)

    >>> layer_attr = LayerDynamicLRP(forward, model.bert.embeddings).attribute(ids, target=1)
    >>> record = text_record(tokens, token_relevance(layer_attr)[0], 0.9, 1, 1, 1, 0.0)
    >>> viz.visualize_text([record])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from captum.attr import visualization as _viz
from torch import Tensor

__all__ = ["text_record", "to_image", "to_image_attr", "token_relevance"]


def _hwc(x: Tensor | np.ndarray, what: str) -> np.ndarray:
    """One image, ``(C, H, W)``, ``(1, C, H, W)`` or ``(H, W)``, as a float ``(H, W, C)`` array."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor or a NumPy array, got {type(x).__name__}")
    x = x.detach()
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(
                f"{what} holds a batch of {x.shape[0]} images; pass one example (e.g. attr[i] or attr[:1])"
            )
        x = x[0]
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{what} must have shape (C, H, W), (1, C, H, W) or (H, W); got {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(device="cpu", dtype=dtype).permute(1, 2, 0).contiguous().numpy()


def to_image_attr(attr: Tensor) -> np.ndarray:
    r"""An image attribution as the ``(H, W, C)`` array ``visualize_image_attr`` expects.

    Args:
        attr (Tensor): Attribution of one image, shaped ``(C, H, W)``, ``(1, C, H, W)``
            (a batch of one, as :meth:`DynamicLRP.attribute` returns it) or ``(H, W)``.
            Any device and floating dtype; it is detached and copied to the CPU.

    Returns:
        numpy.ndarray: The values, unchanged, laid out ``(H, W, C)`` (``C = 1`` for a 2-D input).

    Raises:
        ValueError: If ``attr`` holds more than one image or has another number of dims.
    """
    return _hwc(attr, "attr")


def to_image(x: Tensor | np.ndarray, rescale: bool = True) -> np.ndarray:
    r"""An input image as the ``(H, W, C)`` array ``visualize_image_attr`` expects as ``original_image``.

    Args:
        x (Tensor or numpy.ndarray): One image, shaped ``(C, H, W)``, ``(1, C, H, W)`` or ``(H, W)``.
        rescale (bool, optional): If True and some values lie outside ``[0, 1]`` (a
            normalised input, say), min-max rescale the image to ``[0, 1]`` so that
            matplotlib shows it instead of clipping it. Default: True

    Returns:
        numpy.ndarray: The image laid out ``(H, W, C)``.

    Raises:
        ValueError: If ``x`` holds more than one image or has another number of dims.
    """
    image = _hwc(x, "x")
    if rescale and image.size and (image.min() < 0 or image.max() > 1):
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return image


def token_relevance(layer_attr: Tensor) -> Tensor:
    r"""Relevance per token: a layer attribution summed over its last (hidden) dim.

    Relevance is additive, so the sum over the embedding dims is the relevance of
    the token; this is also what ``LLMGradientAttribution`` does.

    Args:
        layer_attr (Tensor): Attribution at a token-level layer (an embedding layer),
            shaped ``(batch, tokens, hidden)`` or ``(tokens, hidden)``.

    Returns:
        Tensor: Shape ``(batch, tokens)`` or ``(tokens,)``, detached.
    """
    if not isinstance(layer_attr, Tensor):
        raise TypeError(
            f"layer_attr must be a tensor, got {type(layer_attr).__name__} (for a layer with several outputs, pick one)"
        )
    if layer_attr.dim() < 2:
        raise ValueError(f"layer_attr must have a hidden dim to sum over, got shape {tuple(layer_attr.shape)}")
    return layer_attr.detach().sum(-1)


def _as_float(value: float | Tensor) -> float:
    return float(value.detach().reshape(-1)[0].item()) if isinstance(value, Tensor) else float(value)


def text_record(
    tokens: Sequence[str],
    token_relevance: Tensor,
    pred_prob: float | Tensor,
    pred_class: int | str,
    true_class: int | str,
    attr_class: int | str,
    convergence_delta: float | Tensor,
) -> _viz.VisualizationDataRecord:
    r"""A ``VisualizationDataRecord`` for ``visualize_text`` from one example's token relevance.

    The word scores are the relevances divided by their Euclidean norm (as in
    Captum's tutorials), so that they lie in ``[-1, 1]`` as the colour map expects;
    the attribution score is the plain sum of the relevances.

    Args:
        tokens (Sequence[str]): The tokens, one per relevance.
        token_relevance (Tensor): Relevance per token of one example, shape ``(tokens,)``
            or ``(1, tokens)`` (see :func:`token_relevance`).
        pred_prob (float or Tensor): Probability of the predicted class.
        pred_class (int or str): Predicted class.
        true_class (int or str): True class.
        attr_class (int or str): Class that was explained (the target).
        convergence_delta (float or Tensor): Convergence delta of this example.

    Returns:
        VisualizationDataRecord: The record to pass (in a list) to ``visualize_text``.

    Raises:
        ValueError: If the relevance is not one score per token.
    """
    scores = token_relevance.detach().to("cpu")
    if scores.dim() == 2 and scores.shape[0] == 1:
        scores = scores[0]
    if scores.dim() != 1 or scores.shape[0] != len(tokens):
        raise ValueError(
            f"expected one relevance per token ({len(tokens)} tokens), got shape {tuple(token_relevance.shape)}"
        )
    scores = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(scores)
    normalised = scores / norm if norm > 0 else torch.zeros_like(scores)
    return _viz.VisualizationDataRecord(
        normalised,
        _as_float(pred_prob),
        pred_class,
        true_class,
        attr_class,
        float(scores.sum()),
        list(tokens),
        _as_float(convergence_delta),
    )
