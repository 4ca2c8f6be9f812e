"""The pieces every rule is made of: the op specification, the rule context, the stabiliser.

A rule table entry (:class:`OpSpec`) says three things about one autograd node type:

* ``rule``: how relevance at the node's output(s) is split over its input slots;
* ``needs``: which forward operands (input slots) that rule reads;
* how the node's forward value can be rebuilt: ``kept_output`` (autograd kept the
  result: the node is an *Arg Node* of the Promise System), ``kept_inputs`` (the
  operands autograd kept) and ``forward`` (replays the op on its operands).

The engine never special-cases a node type: everything it knows about an op is here.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

Node = Any  # torch.autograd.graph.Node; typed loosely because C++ nodes have no common Python base.
MaybeTensor = Optional[Tensor]

_UINT64 = 1 << 64


def saved(node: Node, name: str) -> Any:
    """Read ``node._saved_<name>``, returning ``None`` when autograd did not keep it."""
    return getattr(node, "_saved_" + name, None)


def signed_dim(dim: int) -> int:
    """Autograd stores negative dims of some ops as unsigned 64-bit integers; undo that."""
    return dim - _UINT64 if dim >= (1 << 63) else dim


# Dtypes whose scalar add rounds epsilon to the dtype first, as a 0-d tensor of that dtype does.
_EPSILON_EXACT = frozenset({torch.float32, torch.float64})


@functools.lru_cache(maxsize=16)
def _epsilon_scalar(eps: float, dtype: torch.dtype) -> Tensor:
    """``eps`` as a 0-d CPU tensor of ``dtype``: it broadcasts on every device without a copy.

    Made once per (eps, dtype), not once per rule call; never an inference tensor (it may be
    first asked for inside ``torch.inference_mode``), and never written to.
    """
    with torch.inference_mode(False):
        return torch.tensor(eps, dtype=dtype)


def stabilize(z: Tensor, eps: float, out: MaybeTensor = None) -> Tensor:
    r"""Epsilon stabiliser :math:`z + \epsilon\,\mathrm{sign}(z)` with :math:`\mathrm{sign}(+0) = +1`.

    Never a bare ``z + eps``: a negative pre-activation must move away from zero too.
    In float32 and float64, :math:`z + \mathrm{copysign}(\epsilon, z)`: two passes over one new
    buffer (the sign copied onto a broadcast 0-d tensor, then the add). Other dtypes compute
    :math:`|z| + \epsilon` in a wider type before rounding, which a pre-rounded :math:`\epsilon`
    would not match, so they take :math:`\mathrm{copysign}(|z| + \epsilon, z)`: three passes.
    Both give the bits of the definition (IEEE rounding is symmetric; ``-0`` gets
    :math:`-\epsilon`). No host synchronisation. ``out``: a buffer of ``z``'s shape and dtype to
    write the result into (default: a new one).
    """
    if z.dtype in _EPSILON_EXACT:
        return torch.copysign(_epsilon_scalar(eps, z.dtype), z, out=out).add_(z)
    return torch.abs(z, out=out).add_(eps).copysign_(z)


def ratio(relevance: Tensor, z: Tensor, eps: float) -> Tensor:
    r""":math:`R / \mathrm{stab}(z)` in the relevance dtype, allocating a single new tensor.

    Every epsilon-type rule divides relevance by a stabilised denominator; doing it in one
    buffer keeps the rules' temporary memory near that of a gradient pass.
    """
    denominator = stabilize(z, eps)
    if denominator.dtype != relevance.dtype:
        denominator = denominator.to(relevance.dtype)
    if denominator.shape == relevance.shape:
        return torch.div(relevance, denominator, out=denominator)
    return relevance / denominator


# Relevance handed over to a rule is divided in its own buffer (handed_ratio) from this many elements on: a
# fresh buffer of a large layer's size is often memory glibc gave back to the system after the last one, and
# faulting it in again page by page costs more than the division. Smaller buffers are reused from the heap.
_IN_PLACE_MIN = 1 << 20
# The denominator is computed a block of this many elements at a time into one scratch buffer (4 MiB in
# float32); smaller blocks cost more in per-op overhead (with 2 threads, 2^18: 8% slower on 6.4M elements).
_IN_PLACE_BLOCK = 1 << 20
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _references(t: Tensor) -> int:
    return sys.getrefcount(t)


def _storage_references(t: Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


def _lone_counts() -> Optional[tuple[int, int]]:
    """The two reference counts of a tensor that one local variable alone holds, measured as
    :func:`handed_ratio` measures them; ``None`` where they cannot be trusted (no storage use
    count, no ``sys.getrefcount``, or free-threaded Python, whose reference counts are deferred)."""
    if _storage_use_count is None or not hasattr(sys, "getrefcount") or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    handed = [torch.empty(2)]
    lone = handed.pop()
    return _references(lone), _storage_references(lone)


_LONE = _lone_counts()


def _divide_by_stabilized_(relevance: Tensor, z: Tensor, eps: float) -> Tensor:
    """``relevance /= stab(z)`` for contiguous tensors of one shape, the denominator a block at a time."""
    flat_r, flat_z = relevance.view(-1), z.view(-1)
    n = flat_r.numel()
    block = min(n, _IN_PLACE_BLOCK)
    scratch = torch.empty(block, dtype=z.dtype, device=z.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        flat_r[start:stop].div_(stabilize(flat_z[start:stop], eps, out=scratch[: stop - start]))
    return relevance


def handed_ratio(handed: list[Tensor], z: Tensor, eps: float) -> Tensor:
    r""":func:`ratio` of relevance handed over in a one-element list (which it empties), written into the
    relevance's own buffer where nothing else can see it.

    The quotient then needs no buffer of its own, so the rule's peak holds one tensor of the layer's
    size less and takes no fresh memory to fault in. Taken on the CPU for contiguous float32 / float64
    relevance of ``z``'s shape and dtype with at least :data:`_IN_PLACE_MIN` elements, owning its whole
    storage, and only where it is alone: no other
    Python reference to it (its reference count equals that of a tensor one local variable holds,
    measured the same way when this module was imported) and no other tensor on its storage. Anything
    else (a relevance a rule handed to two operands, a captured result, the seed viewing the output)
    keeps it intact and gets :func:`ratio`. The same bits either way.
    """
    relevance = handed.pop()
    if (
        relevance.numel() >= _IN_PLACE_MIN  # the cheapest test first: most relevance is smaller
        and _LONE is not None
        and relevance.device.type == "cpu"
        and relevance.dtype == z.dtype
        and relevance.dtype in _EPSILON_EXACT
        and relevance.shape == z.shape
        and not relevance.requires_grad
        and relevance.is_contiguous()
        and z.is_contiguous()
        and relevance.untyped_storage().nbytes() == relevance.numel() * relevance.element_size()
        and (_references(relevance), _storage_references(relevance)) == _LONE
    ):
        return _divide_by_stabilized_(relevance, z, eps)
    return ratio(relevance, z, eps)


def ratio_given_rectified(relevance: Tensor, rectified: MaybeTensor, eps: float, vanishes: bool = False) -> MaybeTensor:
    r""":math:`R / \mathrm{stab}(z)` from :math:`y = \max(z, 0)` alone, where that is exact; else ``None``.

    Where :math:`z > 0`, :math:`y = z`. Where :math:`y = 0` (:math:`z \le 0`) the true ratio
    is :math:`0 / \mathrm{stab}(z) = \pm 0` whenever :math:`R = 0` there, and so is
    :math:`0 / \mathrm{stab}(0)` for :math:`\epsilon > 0`. Relevance does vanish there in
    LRP networks (a ReLU output of zero gets zero relevance from epsilon, sum and pooling
    rules), which one pass over :math:`R` and :math:`y` confirms; the ratio is then that of
    :func:`ratio` on the forward's own :math:`z` up to the sign of zeros (a recomputed
    :math:`z` may differ from it by rounding: ``addmm`` against ``mm`` then ``add``), and a
    linear rule saves recomputing :math:`z` (a whole forward matmul or convolution). Returns
    ``None`` (the caller recomputes :math:`z`) if :math:`\epsilon = 0`, if no ``rectified`` is
    given, off the CPU (the check costs a host sync there), or if some relevance (or a NaN) sits
    where :math:`y = 0`.

    ``vanishes=True`` says the graph's structure already guarantees it (the planner proved that
    every consumer of :math:`y` hands relevance :math:`y \odot g`, see ``OpSpec.scales_operands``):
    the check is skipped, on any device. A NaN in :math:`R` at :math:`y = 0` then stays NaN in
    the ratio, as it would after recomputing :math:`z`.

    Since :math:`y \ge 0`, :math:`\mathrm{stab}(y) = y + \epsilon` (the same bits for
    :math:`y > 0`; only the sign of zeros differs at :math:`y = -0`): two passes instead of
    :func:`ratio`'s four.
    """
    if rectified is None or not eps > 0 or rectified.shape != relevance.shape:
        return None
    if not vanishes:
        if relevance.device.type != "cpu":
            # The check below reads a flag back to the host: free on the CPU, where ops run
            # synchronously, but a pipeline stall per layer on an accelerator: recompute z there.
            return None
        if not _vanishes_where_zero(relevance, rectified):  # z itself is needed there
            return None
    if rectified.dtype == relevance.dtype:
        denominator = torch.add(rectified, eps)
    else:
        denominator = rectified.to(relevance.dtype).add_(eps)
    return torch.div(relevance, denominator, out=denominator)


# The check above runs over blocks of this many elements, so that its boolean temporaries stay
# small next to the rule's own buffers (they would add half a float buffer at the rule's peak):
# two of 1 MiB; smaller blocks cost more in per-op overhead (2^16: 19% slower on 8.4M elements).
_CHECK_BLOCK = 1 << 20


def _vanishes_where_zero(relevance: Tensor, rectified: Tensor) -> bool:
    """Whether ``relevance`` is zero (and not NaN) wherever ``rectified`` is zero."""
    if relevance.is_contiguous() and rectified.is_contiguous():
        flat_r, flat_y = relevance.view(-1), rectified.view(-1)
    else:
        flat_r, flat_y = relevance, rectified
    step = _CHECK_BLOCK if flat_r.dim() == 1 else flat_r.numel()
    for start in range(0, flat_r.numel(), step):
        block_r, block_y = (flat_r[start:start + step], flat_y[start:start + step]) if flat_r.dim() == 1 else (flat_r, flat_y)
        if bool((block_y == 0).logical_and_(block_r != 0).any()):
            return False
    return True


@dataclass(frozen=True)
class RuleSettings:
    """Numbers a preset hands to every rule.

    Args:
        epsilon (float): Stabiliser of every denominator.
        linear (str): Rule for linear maps with a parameter operand (mm, addmm,
            convolution): ``"epsilon"``, ``"gamma"`` or ``"zplus"``.
        gamma (float): Strength of the gamma rule.
        attention (str): ``"attnlrp"`` (relevance flows through the softmax with the
            AttnLRP rule) or ``"cp"`` (CP-LRP: attention probabilities are constants).
        batch_norm (str): ``"epsilon"`` (batch norm is a layer of its own: epsilon on its
            affine map) or ``"merge"`` (batch norm merged into the convolution before it, as
            Zennit's canonizers do; see ``OpSpec.affine``).
    """

    epsilon: float = 1e-6
    linear: str = "epsilon"
    gamma: float = 0.25
    attention: str = "attnlrp"
    batch_norm: str = "epsilon"


@dataclass
class RuleContext:
    """What a rule sees of one autograd node during propagation.

    Attributes:
        node: The autograd node.
        relevance: Relevance at each forward output of the node (``None`` where
            nothing arrived), in the accumulation dtype.
        relevant: For each input slot (``node.next_functions``), whether relevance
            must flow into it: the slot leads to a requested tensor.
        inputs: Forward operand values for the slots listed in the spec's
            ``needs``, ``None`` elsewhere or where the operand is untracked and unknown.
        settings: Numbers of the active preset.
        output: The node's (first) forward output where a consumer kept it as its
            operand (e.g. batch norm keeps the convolution output before it), where it
            is the explained output, or where a promise rebuilt it earlier in the walk
            (the branch of a residual sum), for specs with ``uses_output``; ``None``
            otherwise. Saves recomputing it.
        bias: A bias that a later sum adds to this node's output and that the engine
            folded into this node's rule (see ``OpSpec.bias_after``); ``None`` otherwise.
            ``output`` does not include it.
        rectified: Where ``output`` is unknown but a ReLU consumer kept its result
            (``OpSpec.rectifies``): that result, ``max(z, 0)`` of this node's output
            :math:`z`. Rules may use it through :func:`ratio_given_rectified`.
        rectified_vanishes: The planner proved from the graph that ``relevance`` is zero
            wherever ``rectified`` is (see ``OpSpec.scales_operands``), so ``rectified``
            stands for the output without a check.
        affine: ``(scale, shift)``, 1-d along dim 1, of a per-channel affine map (batch norm)
            that follows this node and that the engine merged into this node's rule
            (``OpSpec.affine``); ``None`` otherwise. ``output`` and ``rectified`` are then
            those of the merged map, the affine map's output.
    """

    node: Node
    relevance: list[MaybeTensor]
    relevant: tuple[bool, ...]
    inputs: list[MaybeTensor]
    settings: RuleSettings
    output: MaybeTensor = None
    bias: MaybeTensor = None
    rectified: MaybeTensor = None
    rectified_vanishes: bool = False
    affine: Optional[tuple[Tensor, Tensor]] = None
    _dtype: Optional[torch.dtype] = field(default=None, init=False, repr=False)  # set by take_out

    def take_rectified(self) -> MaybeTensor:
        """``rectified``, handed over once: the context drops its reference, so that the value
        is freed as soon as the rule is done with it (before the rule's larger products)."""
        value, self.rectified = self.rectified, None
        return value

    def take_out(self) -> Tensor:
        r"""Relevance at the (single) output, handed over: the context drops its reference.

        For a rule that is done with it once it has :math:`R / \mathrm{stab}(z)`: the walk then
        frees it before the rule's larger products, as a backward pass frees a gradient once
        the node has used it. Lower peak, and less of the heap is given back to the system and
        faulted in again on the next call. ``out`` must not be read afterwards; ``dtype`` still
        holds.
        """
        r = self.out
        self._dtype = r.dtype
        self.relevance[0] = None
        return r

    def ratio(self, z: Tensor) -> Tensor:
        r""":math:`R / \mathrm{stab}(z)` of the relevance at the (single) output, handed over
        (:meth:`take_out`), so that it is written into the relevance's own buffer where nothing else
        refers to it (:func:`handed_ratio`)."""
        return handed_ratio([self.take_out()], z, self.settings.epsilon)

    def proven_rectified_ratio(self) -> MaybeTensor:
        r""":math:`R / \mathrm{stab}(z)` from ``rectified`` where the output is unknown and the planner
        proved that exact (``rectified_vanishes``), handing the relevance over (:meth:`take_out`);
        ``None`` otherwise (the rule then needs :math:`z`, and ``out`` is still there)."""
        if self.output is not None or not self.rectified_vanishes:
            return None
        s = ratio_given_rectified(self.out, self.take_rectified(), self.settings.epsilon, vanishes=True)
        if s is not None:  # the rule is done with the relevance (see take_out)
            self.take_out()
        return s

    @property
    def out(self) -> Tensor:
        """Relevance at the (single) output."""
        r = self.relevance[0]
        assert r is not None
        return r

    def filled_relevance(self) -> list[Tensor]:
        """Relevance per output with zeros where none arrived (for calling the node's VJP)."""
        filled = []
        for k, r in enumerate(self.relevance):
            if r is None:
                meta = self.node._input_metadata[k]
                r = torch.zeros(meta.shape, dtype=self.dtype, device=meta.device)
            filled.append(r)
        return filled

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is not None:
            return self._dtype
        for r in self.relevance:
            if r is not None:
                return r.dtype
        return torch.float32


RuleFn = Callable[[RuleContext], Sequence[MaybeTensor]]
ForwardFn = Callable[[Node, list], Any]
NeedsFn = Callable[[Node, tuple], tuple]


def _needs_nothing(node: Node, relevant: tuple) -> tuple:
    return ()


def needs_relevant_inputs(node: Node, relevant: tuple) -> tuple:
    """The rule reads only the operands relevance flows into."""
    return tuple(slot for slot, rel in enumerate(relevant) if rel)


def needs_all_inputs(node: Node, relevant: tuple) -> tuple:
    """The rule reads every operand (relevant or not: constants enter denominators)."""
    return tuple(range(len(node.next_functions)))


@dataclass(frozen=True)
class OpSpec:
    r"""One entry of the rule table.

    Args:
        family (str): Human-readable rule family, shown by the coverage report.
        rule (RuleFn): Splits output relevance over input slots.
        needs (NeedsFn): Input slots whose forward values the rule reads, given
            the node and its ``relevant`` mask.
        forward (ForwardFn, optional): Replays the op on operand values
            (a list aligned with ``next_functions``); returns a tensor or a tuple
            for multi-output ops. Needed only when the node sits on a Promise
            Branch.
        kept_inputs (callable, optional): Operand values autograd kept, one per
            slot (``None`` where not kept).
        kept_output (callable, optional): Output value(s) autograd kept; a node
            with a kept output is an Arg Node.
        uses_output (bool): The rule can use its own output value (``ctx.output``)
            instead of recomputing it, when a consumer kept that value.
        constant (bool): The node's output is treated as a constant: no relevance
            flows into it (attention probabilities under CP-LRP).
        needs_given_output (NeedsFn, optional): What the rule reads when its own output
            value is known (``ctx.output``); a sum then needs only its relevant operands.
        constant_slots (callable, optional): Per input slot, whether the rule treats that
            operand as a constant (a product's normaliser factor); decided when planning.
        bias_after (BiasAfterFn, optional): For a linear map without a bias of its own,
            called once per relevant node when planning as ``bias_after(graph, consumers,
            node, relevant)`` (``consumers[i]``: the ``(consumer, slot)`` pairs reading node
            ``i``; ``relevant``: the node's relevance mask): the sum that adds a bias to
            this node's output next, as ``(sum node, bias slot)``, or ``None``. The engine
            then folds that bias into this node's rule (``ctx.bias``) and the sum hands its
            relevance on unchanged (:data:`FOLDED_BIAS_SUM`), provided the bias operand
            carries no relevance. Must cost O(1).
        rectifies (bool): The node's kept output is ``max(x, 0)`` of its single
            operand :math:`x` (ReLU). A producer of :math:`x` whose rule uses its own output
            then gets this value as ``ctx.rectified`` when no consumer kept :math:`x` itself.
        fresh_output (bool): The node's output 0 is a newly allocated contiguous tensor (matrix
            products). When its rule uses its own output and no consumer kept that output, a
            consumer that kept a *view* of it (behind split, view, transpose, ...) gives it back
            whole from the view's storage, provided nothing wrote to that storage (checked when
            read; otherwise the rule recomputes the output). The rule must not need fewer
            operands when its output is known (no ``needs_given_output``).
        inverse (callable, optional): ``inverse(node, outputs)`` gives back the node's single
            tracked operand from the values of all of its outputs, for routing ops whose forward
            drops no element of it: reshapes, permutations, clones and splits (their own
            vector-Jacobian product, then their inverse), expand (its first copy) and cat (the
            tracked operand's slice; the others are constants). The engine rebuilds an op's
            output from values consumers kept behind such nodes (q, k and v made contiguous
            after a split and a transpose; grouped-query keys and values repeated per head; keys
            and values appended to a key/value cache).
        view (bool): The node's outputs are always views of its single operand (never a copy),
            so they share its storage; ``fresh_output`` looks through such nodes.
        operand_from_output (callable, optional): ``operand_from_output(node, slot, output,
            inputs)`` rebuilds the operand in ``slot`` from the op's output and its other operands
            (``inputs``, aligned with the slots): a sum's :math:`a = z - b`. Where a consumer kept
            the output and the other operands are at hand, the resolver uses it instead of
            replaying the operand's producer (for a residual branch, a whole matrix product).
            Equal to the forward's value up to the rounding of one subtraction at the scale of
            :math:`z`.
        scales_operands (bool): The relevance the rule hands each operand is that operand's
            value times something, elementwise :math:`R_x = x g` (epsilon, gamma and z+ rules
            of linear maps, batch norm, sums and pools), in every preset: zero wherever the operand
            is zero. Lets the planner prove that a ReLU's kept result can stand for its input
            where relevance arrives (``RuleContext.rectified_vanishes``). A rule that does not
            have this form must leave it ``False``.
        keeps_zeros (bool): Where relevance at the output is zero wherever the output is zero,
            relevance the rule hands the operand is zero wherever the operand is zero: ReLU
            (identity, and x = 0 gives y = 0), max pooling (winner takes all: a winner
            of value 0 is the window's output 0). The planner's proof looks through such
            nodes and through reshapes.
        reshapes (bool): The node's output is its single operand reshaped (same elements in
            the same order: view, reshape, squeeze, unsqueeze). The engine looks through such
            nodes for a consumer that kept an op's output (a linear map on 3-d input is an
            ``addmm`` followed by a view).
        affine (callable, optional): ``affine(node, inputs)`` gives ``(scale, shift)``, 1-d, when
            the node is the per-channel affine map :math:`y = \mathrm{scale}\, x + \mathrm{shift}`
            along dim 1 with constant coefficients (batch norm, its statistics held constant);
            ``inputs`` holds the values of the slots ``affine_needs`` lists. Under the setting
            ``batch_norm="merge"``, a linear map whose spec ``merges_affine`` accepts it and whose
            only reader is this node takes the map over (``RuleContext.affine``): its rule runs
            on the merged map, and this node hands relevance on unchanged (:data:`MERGED_AFFINE`).
        affine_needs (callable, optional): ``affine_needs(node)``: the input slots ``affine``
            reads (batch norm: its bias), or ``None`` where the coefficients cannot be had (a
            frozen bias, of which autograd kept no trace); then nothing is merged.
        merges_affine (callable, optional): ``merges_affine(node)``: whether this linear map can
            take over a per-channel affine map of its output along dim 1 (a convolution, not a
            transposed one); see ``affine``.
    """

    family: str
    rule: RuleFn
    needs: NeedsFn = _needs_nothing
    forward: Optional[ForwardFn] = None
    kept_inputs: Optional[Callable[[Node], tuple]] = None
    kept_output: Optional[Callable[[Node], Any]] = None
    uses_output: bool = False
    constant: bool = False
    constant_slots: Optional[Callable[[Node], tuple]] = None
    needs_given_output: Optional[NeedsFn] = None
    fallback: bool = field(default=False)
    bias_after: Optional["BiasAfterFn"] = None
    rectifies: bool = False
    fresh_output: bool = False
    view: bool = False
    inverse: Optional[Callable[[Node, list], Tensor]] = None
    reshapes: bool = False
    scales_operands: bool = False
    keeps_zeros: bool = False
    operand_from_output: Optional[Callable[[Node, int, Tensor, list], Tensor]] = None
    affine: Optional[Callable[[Node, list], tuple[Tensor, Tensor]]] = None
    affine_needs: Optional[Callable[[Node], Optional[tuple[int, ...]]]] = None
    merges_affine: Optional[Callable[[Node], bool]] = None


# (graph, consumers, node, relevant) -> (sum node, bias slot) or None; see OpSpec.bias_after.
BiasAfterFn = Callable[[Any, Sequence[Sequence[tuple[int, int]]], int, tuple], Optional[tuple[int, int]]]


def pass_on_rule(ctx: RuleContext) -> list[MaybeTensor]:
    """All relevance to the relevant operand(s), unchanged (operands of the output's shape)."""
    return [ctx.out if rel else None for rel in ctx.relevant]


# The rule of a sum whose bias operand the linear map before it took over (``OpSpec.bias_after``):
# the linear rule puts the bias in its denominator, so the sum must not split relevance again.
FOLDED_BIAS_SUM = OpSpec(family="sum adding a linear map's bias (folded into the linear rule)", rule=pass_on_rule)

# The rule of a batch norm merged into the linear map before it (``OpSpec.affine``): that map's rule
# runs on the merged map, so the batch norm hands relevance on unchanged.
MERGED_AFFINE = OpSpec(family="batch norm merged into the linear map before it", rule=pass_on_rule)


def node_vjp(node: Node, grads: Sequence[Tensor]) -> tuple:
    """Call an autograd node on output-side tensors; results summed to each operand's shape.

    The autograd engine sums gradients of broadcast operands back to their shape after
    calling a node; calling the node directly skips that, so it is done here. Relevance
    in float32 meets half-precision kernels in their own dtype (the engine casts back).
    """
    metadata = node._input_metadata
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, metadata)]
    results = node(*grads)
    results = (results,) if isinstance(results, Tensor) else tuple(results)
    shaped = []
    for r, (child, k) in zip(results, node.next_functions):
        if r is not None and child is not None:
            shape = child._input_metadata[k].shape
            if r.shape != shape:
                r = sum_to(r, shape)
        shaped.append(r)
    return tuple(shaped)


def sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast result back to an operand's shape."""
    if tuple(t.shape) == tuple(shape):
        return t
    return t.sum_to_size(shape) if len(shape) > 0 else t.sum()
