"""What the engine needs from a model around a call: module lookup, flags, statistics, spans."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .engine.graph import build_graph


def owning_module(forward_func: Callable) -> Optional[nn.Module]:
    """The module behind a forward function: the module itself or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def scores_of(output: Any) -> Tensor:
    """Pick the score tensor of a model output: a tensor, ``.logits``, or the first tensor of a tuple/dict."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)) or hasattr(values, "__iter__"):
        for value in values:
            if isinstance(value, Tensor):
                return value
    raise TypeError(f"cannot find a score tensor in a model output of type {type(output).__name__}")


def in_training_mode(module: Optional[nn.Module]) -> bool:
    """Whether a module that holds parameters or buffers of its own is in training mode.

    Wrappers without state of their own (e.g. the forward wrapper Captum's LLM attribution
    creates) do not count: their mode changes nothing.
    """
    if module is None:
        return False
    for m in module.modules():
        if m.training and (
            next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
        ):
            return True
    return False


@contextlib.contextmanager
def buffers_restored(module: Optional[nn.Module]) -> Iterator[None]:
    """In training mode a forward updates batch-norm running statistics; put them back afterwards.

    Only buffers whose values changed are written back, so buffers the graph saved keep their
    version counters (autograd checks them when the engine reads saved tensors).
    """
    if not in_training_mode(module):
        yield
        return
    saved_buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved_buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


# Frozen parameters that calls in progress have made require grad, by id: [parameter, number of
# such calls]. Shared by all threads, so that the last call out, not the first, restores the flag.
_TRACKED: dict[int, list] = {}
_TRACKED_LOCK = threading.Lock()


@contextlib.contextmanager
def parameters_tracked(module: Optional[nn.Module]) -> Iterator[None]:
    """Let frozen parameters require grad during the forward, restoring every flag afterwards.

    A parameter that does not require grad leaves no node in the autograd graph, and
    autograd keeps no copy of operands it needs no gradient for: a frozen bias, or a
    frozen tensor added to an activation, would vanish from the LRP denominators. As a
    tracked leaf it is in the graph (``AccumulateGrad.variable``). Nothing is accumulated
    in ``.grad``: the engine never calls backward.

    The flags are shared by every thread that runs the model, so the flips are counted:
    the first call in makes a frozen parameter require grad, the last call out (in any
    thread) makes it frozen again, and two calls on one model in two threads both run
    their forward on tracked parameters, as sequential calls would. Only the bookkeeping
    is locked, never the forward: a lock held for the forward would serialise calls on
    one model. Running the forward on per-call aliases instead would need a thread-local
    hook on every op (a ``TorchFunctionMode``, which TorchScript modules bypass), as the
    module's attributes are shared too. Code outside DynamicLRP running the model
    meanwhile sees the parameters unfrozen.
    """
    if module is None:
        yield
        return
    mine: list[nn.Parameter] = []
    try:
        with _TRACKED_LOCK:
            for p in module.parameters():
                entry = _TRACKED.get(id(p))
                if entry is not None:  # frozen, already flipped by a call in progress
                    entry[1] += 1
                elif not p.requires_grad and (p.is_floating_point() or p.is_complex()):
                    p.requires_grad_(True)
                    _TRACKED[id(p)] = [p, 1]  # holding p keeps its id unique while the entry lives
                else:
                    continue
                mine.append(p)
        yield
    finally:
        with _TRACKED_LOCK:
            for p in mine:
                entry = _TRACKED[id(p)]
                entry[1] -= 1
                if entry[1] == 0:
                    del _TRACKED[id(p)]
                    p.requires_grad_(False)


def _current_sequence_nr() -> int:
    return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()


class ModuleSpans:
    """Which module created which autograd node, from the sequence numbers seen by hooks.

    Autograd numbers nodes in creation order; a module's forward creates the nodes
    numbered between its pre-hook and its post-hook. The innermost span wins.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[str, int, int]] = []

    def path_of(self, node: Any) -> Optional[str]:
        seq = node._sequence_nr()
        inside = [(end - start, label) for label, start, end in self.spans if start < seq < end]
        return min(inside)[1] if inside else None


def run_with_module_spans(module: nn.Module, run_forward: Callable[[], Any]) -> tuple[Any, ModuleSpans]:
    """Run ``run_forward`` (under grad) with hooks recording each module's node span.

    Hooks are removed even if the forward raises.
    """
    spans = ModuleSpans()
    open_spans: list[tuple[str, int]] = []
    handles = []

    def pre(label: str):
        return lambda mod, args: open_spans.append((label, _current_sequence_nr()))

    def post(mod, args, out):
        label, start = open_spans.pop()
        spans.spans.append((label, start, _current_sequence_nr()))

    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(pre(name or type(module).__name__)))
            handles.append(sub.register_forward_hook(post))
        with torch.enable_grad():
            output = run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return output, spans


def locate_module(module: nn.Module, run_forward: Callable[[], Tensor], node_type: str) -> Optional[str]:
    """Find the (innermost) module whose forward created a node of type ``node_type``.

    Runs the forward once more, recording module spans (see :func:`run_with_module_spans`).
    """
    try:
        output, spans = run_with_module_spans(module, run_forward)
        graph = build_graph(scores_of(output).grad_fn, ())
    except Exception:
        return None
    for node, name in zip(graph.nodes, graph.types):
        if name == node_type:
            path = spans.path_of(node)
            if path is not None:
                return path
    return None
