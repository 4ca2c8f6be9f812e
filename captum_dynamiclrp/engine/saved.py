"""Saved tensors owned by the engine, so that a walk frees them as a backward pass would.

A backward pass frees each node's saved tensors right after running the node. The engine's
walk reads saved tensors through the nodes too, but cannot make autograd drop them: the whole
forward graph, with every activation it saved, would stay alive until the walk ends. At batch 8
that is most of the difference between the peak memory of a walk and that of a gradient.

:class:`SavedTensorStore` fixes this for graphs recorded under it. During the forward it installs
``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd saves is put in a one-slot box
that the node keeps instead of the tensor, and the store learns which node the box belongs to.
During the walk, :func:`~.walker.execute` empties a node's boxes after the last plan step that
reads the node's saved state (:func:`saved_schedule`); nodes no step reads (pruned ones, identity
rules) are emptied before the first step. A tensor is freed once no box and no value of the walk
holds it, exactly as after a backward pass.

Which node a box belongs to is learnt from two independent signals, and a box is assigned only
where they agree: the autograd sequence number current when it was packed (a node packs right
after taking its number) and the next node reported by ``torch.autograd.graph.node_creation_hook``
(fired once a node holds all its saved tensors). In-place ops on tensors that must be saved,
which make autograd create helper nodes in between, can make the two disagree; such boxes are
simply kept until the end. Without ``node_creation_hook`` (torch < 2.14) or where saved-tensor
hooks are disabled, the store records nothing and the walk behaves as before.

Reading a box the walk has emptied raises :class:`ReleasedSavedTensorError`: that would be a bug
in the schedule, never a silently wrong value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from .plan import CAPTURE, FROM_OUTPUT, KEPT_BY_CONSUMER, KEPT_OUTPUT, LEAF, PROPAGATE, REPLAY, UNROTATE, Plan
from .promise import recipe_nodes

_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)
_node_creation_hook = getattr(torch.autograd.graph, "node_creation_hook", None)


class ReleasedSavedTensorError(RuntimeError):
    """A saved tensor was read after the engine released it (an engine bug)."""


def _hooks_enabled() -> bool:
    check = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return True if check is None else bool(check())


class SavedTensorStore:
    r"""Owns the tensors autograd saves during a forward, so the engine can free them early.

    Record the forward under :meth:`recording`, hand the store to the walk, and empty it when
    done; used as a context manager it empties every box on exit (which also breaks the reference
    cycle a saved output makes with its own node)::

        with SavedTensorStore() as saved:
            with saved.recording():
                output = model(x)
            relevance = engine.relevance(output, x, seed, saved=saved)

    Attributes:
        active (bool): Whether the hooks are installed right now (never on torch without
            ``node_creation_hook`` or where saved-tensor hooks are disabled).
    """

    def __init__(self) -> None:
        self.active = False
        self._pending: list[tuple[list, int]] = []
        self._by_node: dict[int, list[list]] = {}
        self._boxes: list[list] = []

    # -- hooks ------------------------------------------------------------------------------
    def _pack(self, tensor: Tensor) -> list:
        box = [tensor]
        self._boxes.append(box)
        self._pending.append((box, _sequence_nr()))
        return box

    @staticmethod
    def _unpack(box: list) -> Tensor:
        tensor = box[0]
        if tensor is None:
            raise ReleasedSavedTensorError(
                "DynamicLRP: a saved tensor was read after the engine released it. This is a bug; "
                "please report it with the model that triggers it."
            )
        return tensor

    def _on_node(self, node: Any) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        seq = node._sequence_nr()
        # A box belongs to this node only if it was packed while this node held the newest number.
        mine = [box for box, number in pending if number == seq + 1]
        if mine:
            self._by_node.setdefault(seq, []).extend(mine)

    # -- context ----------------------------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator["SavedTensorStore"]:
        """Install the hooks for the forward pass run inside (no-op where unsupported)."""
        if _sequence_nr is None or _node_creation_hook is None or not _hooks_enabled():
            yield self
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), _node_creation_hook(self._on_node):
            self.active = True
            try:
                yield self
            finally:
                self.active = False
                self._pending = []  # packed by no node (none was created after them): kept till clear()

    def __enter__(self) -> "SavedTensorStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clear()

    # -- release ----------------------------------------------------------------------------
    def release(self, node: Any) -> None:
        """Empty the boxes of one autograd node (its saved tensors are not read again)."""
        boxes = self._by_node.pop(node._sequence_nr(), None)
        if boxes:
            for box in boxes:
                box[0] = None

    def clear(self) -> None:
        """Empty every box (the walk is over)."""
        for box in self._boxes:
            box[0] = None
        self._boxes = []
        self._pending = []
        self._by_node = {}


def saved_schedule(plan: Plan, num_nodes: int) -> tuple[list[int], dict[int, list[int]]]:
    """When each node's saved state is read for the last time in ``plan``.

    Returns ``(unread, after_step)``: nodes no step reads (release before the walk) and, per step
    index, the nodes whose saved state no later step reads. Computed once per plan and kept on it
    (``plan.saved_schedule``), so cached plans pay nothing.

    Readers of node ``j``'s saved state: its own rule (PROPAGATE, which may call the node), its
    replay (REPLAY), its kept output (KEPT_OUTPUT), and any step reading what ``j`` kept of a
    neighbour's value (KEPT_BY_CONSUMER from ``j``, a PROPAGATE whose output source is ``j``, a
    FROM_OUTPUT whose origin's output ``j`` kept, a PROPAGATE that merged ``j``'s batch norm), and an UNROTATE (the rotation's kept output,
    its two products' constants, the chain it inverts or replays).
    """
    cached = plan.saved_schedule
    if cached is not None and cached[0] == num_nodes:
        return cached[1], cached[2]
    last: dict[int, int] = {}
    for index, step in enumerate(plan.steps):
        kind = step[0]
        if kind in (PROPAGATE, REPLAY, KEPT_OUTPUT):
            last[step[1]] = index
        if kind == PROPAGATE and step[8] is not None:
            last[step[8][0]] = index  # a batch norm merged into this step: its saved statistics
        if kind == KEPT_BY_CONSUMER:
            last[step[2]] = index
        elif kind == FROM_OUTPUT:
            last[step[5][1]] = index  # the consumer that kept the origin's output
        elif kind == PROPAGATE and step[6] is not None and step[6][0] in ("consumer", "storage", "rectified"):
            last[step[6][1]] = index  # what a consumer kept of this node's output
        elif kind == PROPAGATE and step[6] is not None and step[6][0] == "routed":
            for node in recipe_nodes(step[6][1]):  # copies of its parts, and the nodes that invert them
                last[node] = index
        elif kind == UNROTATE:  # the kept output, the two constants, the chain (inverses, replays)
            _, cos_product, _, sin_product, _, _ = step[2]
            for node in recipe_nodes(step[3]) + [cos_product, sin_product] + list(step[4]):
                last[node] = index
        elif kind not in (PROPAGATE, REPLAY, KEPT_OUTPUT, LEAF, CAPTURE, FROM_OUTPUT):
            raise ValueError(f"unknown plan step kind {kind}")
    unread = [j for j in range(num_nodes) if j not in last]
    after_step: dict[int, list[int]] = {}
    for node, index in last.items():
        after_step.setdefault(index, []).append(node)
    plan.saved_schedule = (num_nodes, unread, after_step)
    return unread, after_step
