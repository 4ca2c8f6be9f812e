"""No leaks: repeated calls keep memory flat, nothing outlives a call, threads do not interfere.

* 500 calls on a small CNN (default run, a few seconds) and 1,000 calls on a mid-size residual CNN
  (``-m slow``): resident memory (``/proc/self/statm``), the number of live Python objects and of
  live tensors stay flat;
* after a call, the model output, the internal input leaves and every tensor the forward made are
  garbage (weak references die): no graph, tensor or autograd node is retained;
* the promise-plan cache is bounded (its size never exceeds ``cache_size``, 0 disables it) and a
  cached plan refers to no tensor and no autograd node;
* two threads attributing two models at once give bit-identical results to sequential calls, with
  random interleavings and with an interleaving forced inside the forward passes.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import types
import warnings
import weakref

import pytest
import torch
from torch import Tensor, nn

from captum_dynamiclrp import DynamicLRP
from captum_dynamiclrp.rules.base import OpSpec

DT = torch.float64


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some lazily-deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, Tensor))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def mid_resnet() -> nn.Module:
    """A residual CNN (~60 k parameters, 5 residual blocks): every add is a promise the engine resolves."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *[Block(16) for _ in range(3)], nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), *[Block(32) for _ in range(2)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _measure_flat(lrp: DynamicLRP, x: Tensor, calls: int, rss_limit: int) -> None:
    for i in range(20):  # warm-up: allocator pools, lazily created kernels, the cached plan
        lrp.attribute(x, target=i % 10)
    gc.collect()
    rss0, objects0, tensors0 = rss_bytes(), len(gc.get_objects()), live_tensors()
    for i in range(calls):
        lrp.attribute(x, target=i % 10)
    gc.collect()
    rss1, objects1, tensors1 = rss_bytes(), len(gc.get_objects()), live_tensors()
    assert tensors1 <= tensors0, f"live tensors grew {tensors0} -> {tensors1}"
    assert objects1 - objects0 < 200, f"live Python objects grew {objects0} -> {objects1}"
    # Retaining one call's graph would cost ~30 KB (small CNN) / ~300 KB (residual CNN) per call.
    assert rss1 - rss0 < rss_limit, f"resident memory grew by {(rss1 - rss0) / 2**20:.1f} MiB"


def test_memory_is_flat_over_500_calls():
    lrp = DynamicLRP(small_cnn())
    _measure_flat(lrp, torch.randn(2, 3, 8, 8), calls=500, rss_limit=12 * 2**20)
    assert len(lrp.engine.cache) == 1  # one graph shape: one plan


@pytest.mark.slow
def test_memory_is_flat_over_1000_calls_on_a_residual_cnn():
    lrp = DynamicLRP(mid_resnet())
    _measure_flat(lrp, torch.randn(2, 3, 16, 16), calls=1000, rss_limit=32 * 2**20)


# ---------------------------------------------------------------------------------------------
# Nothing outlives a call.
# ---------------------------------------------------------------------------------------------
class Spy(nn.Module):
    """Runs a model and keeps weak references to everything the forward sees or makes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.refs: list = []

    def forward(self, x: Tensor) -> Tensor:
        self.refs.append(weakref.ref(x))  # the engine's own input leaf
        h = x
        for layer in self.model:
            h = layer(h)
            self.refs.append(weakref.ref(h))  # every activation, the output last
        return h


@pytest.mark.parametrize("outcome", ["success", "error"])
def test_no_tensor_or_graph_outlives_a_call(outcome):
    gc.collect()
    # Nodes other tests left alive (pytest keeps tracebacks of expected failures) are not ours.
    earlier = {id(o) for o in gc.get_objects() if type(o).__name__.endswith("Backward0")}
    spy = Spy(small_cnn())
    x = torch.randn(2, 3, 8, 8)
    lrp = DynamicLRP(spy)
    if outcome == "success":
        attr = lrp.attribute(x, target=3)
        assert attr.grad_fn is None and not attr.requires_grad
    else:
        with pytest.raises(ValueError):
            lrp.attribute(x, target=99)
    gc.collect()
    alive = [i for i, ref in enumerate(spy.refs) if ref() is not None]
    assert spy.refs and not alive, f"tensors of the forward still alive after the call: {alive}"
    nodes = [o for o in gc.get_objects() if type(o).__name__.endswith("Backward0") and id(o) not in earlier]
    assert not nodes, f"autograd nodes retained: {[type(n).__name__ for n in nodes][:5]}"


# ---------------------------------------------------------------------------------------------
# The walked graph is freed one node at a time, when its last holder goes (engine.graph.DeferredRelease).
# ---------------------------------------------------------------------------------------------
class _Marker:
    def __init__(self, freed: list) -> None:
        self.freed = freed

    def __del__(self) -> None:
        self.freed.append(True)


def _residual_chain(depth: int, keep: tuple = ()) -> tuple:
    """A residual chain whose bottom node carries a marker that records when it is freed."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    freed: list = []
    h = x * 1.0
    h.grad_fn.metadata["marker"] = _Marker(freed)
    kept = []
    for i in range(depth):
        h = h + 0.01 * torch.tanh(lin(h))
        if i in keep:
            kept.append(h)
    return x, h, kept, freed


@pytest.mark.parametrize(
    "holder", ["nothing", "intermediate tensor", "node wrapper", "two tensors", "graph on a kept tensor", "columns"]
)
def test_walked_graph_is_freed_when_its_last_holder_goes(holder):
    from captum_dynamiclrp.engine import Engine
    from captum_dynamiclrp.engine.graph import DeferredRelease

    claimed = len(DeferredRelease._held)
    keep = {"intermediate tensor": (30,), "node wrapper": (20,), "two tensors": (10, 40),
            "graph on a kept tensor": (30,)}.get(holder, ())
    x, out, kept, freed = _residual_chain(60, keep)
    engine = Engine()
    if holder == "columns":  # one explained output per column: several walks over one graph
        kept = [out[:, k] for k in range(out.shape[1])]
        for column in kept:
            engine.relevance(column, x)
        del column
    else:
        engine.relevance(out, (x,) + tuple(kept))
    if holder == "node wrapper":
        kept = [kept[0].grad_fn]
    del out
    if holder == "graph on a kept tensor":  # a second graph on the part the first one left
        kept = [kept[0] * 2.0]
        engine.relevance(kept[0], x)
    while kept:
        assert not freed, "the graph was freed while something still held part of it"
        kept.pop(0)
    assert freed, "the graph outlived its last holder"
    assert len(DeferredRelease._held) == claimed, "freed nodes are still marked as held"


DEEP_CHAIN_IN_A_SMALL_STACK = """
import sys, threading, torch
threading.stack_size(256 * 1024)  # 500 layers overflowed such a stack when freed recursively

def main():
    from captum_dynamiclrp.engine import Engine
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    h, kept = x, []
    for i in range(1500):
        h = h + 0.01 * torch.tanh(lin(h))
        if i in (500, 1000):
            kept.append(h)
    Engine().relevance(h, (x, kept[0]))
    sys.setrecursionlimit(60)  # the release must not recurse in Python either
    del h
    kept.pop()  # the output is gone: the upper part was freed, now the middle part goes
    kept.pop()
    print("done")

thread = threading.Thread(target=main)
thread.start()
thread.join()
"""


def test_deep_graph_with_kept_intermediates_is_freed_without_recursion():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", DEEP_CHAIN_IN_A_SMALL_STACK], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0 and "done" in result.stdout, f"rc={result.returncode} {result.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# The promise-plan cache.
# ---------------------------------------------------------------------------------------------
_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, types.MethodType, OpSpec)


def _reachable(root) -> list:
    """Every object reachable from ``root`` through ``gc.get_referents`` (iterative). Rule-table
    entries, functions, classes and modules are shared and static: not descended into."""
    seen, stack, found = set(), [root], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append(obj)
            if not isinstance(obj, _OPAQUE):
                stack.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("cache_size", [0, 1, 8])
def test_plan_cache_is_bounded_and_holds_no_tensors(cache_size):
    model = small_cnn()
    lrp = DynamicLRP(model, cache_size=cache_size)
    for batch in range(1, 21):  # 20 graph signatures
        lrp.attribute(torch.randn(batch, 3, 4, 4), target=batch % 10)
        assert len(lrp.engine.cache) <= cache_size
    assert len(lrp.engine.cache) == min(cache_size, 20)
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    plans = list(lrp.engine.cache._plans.values())
    for obj in _reachable(plans):
        assert not isinstance(obj, Tensor) or id(obj) in params, "a cached plan holds a tensor"
        assert not type(obj).__name__.endswith(("Backward0", "Backward1")), "a cached plan holds an autograd node"


def test_many_graph_shapes_keep_memory_flat():
    lrp = DynamicLRP(small_cnn())  # default cache_size=8
    for batch in range(1, 11):
        lrp.attribute(torch.randn(batch, 3, 4, 4), target=0)
    gc.collect()
    objects0 = len(gc.get_objects())
    for batch in range(11, 111):  # 100 new signatures: each evicts an old plan
        lrp.attribute(torch.randn(batch, 3, 4, 4), target=0)
    gc.collect()
    assert len(lrp.engine.cache) == 8
    assert len(gc.get_objects()) - objects0 < 500


# ---------------------------------------------------------------------------------------------
# Threads.
# ---------------------------------------------------------------------------------------------
def _models():
    torch.manual_seed(1)
    first = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(DT).eval()
    second = small_cnn().to(DT)
    second[0].weight.requires_grad_(False)  # a frozen parameter: flags are flipped during a call
    return first, second


def _inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=gen, dtype=DT), torch.randn(4, 3, 8, 8, generator=gen, dtype=DT)


def test_two_threads_two_models_equal_sequential_calls():
    (m1, m2), (x1, x2) = _models(), _inputs()
    expected = (DynamicLRP(m1).attribute(x1, target=0), DynamicLRP(m2).attribute(x2, target=4))
    results: dict = {0: [], 1: []}
    errors: list = []
    start = threading.Barrier(2)

    def work(slot: int, model: nn.Module, x: Tensor, target: int) -> None:
        try:
            lrp = DynamicLRP(model)
            start.wait()
            for _ in range(60):
                results[slot].append(lrp.attribute(x, target=target))
        except BaseException as err:  # noqa: BLE001 - a thread's failure is reported by the test
            errors.append(err)

    threads = [threading.Thread(target=work, args=(0, m1, x1, 0)), threading.Thread(target=work, args=(1, m2, x2, 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for slot in (0, 1):
        assert len(results[slot]) == 60
        assert all(torch.equal(r, expected[slot]) for r in results[slot])
    assert not m2[0].weight.requires_grad and m2[0].bias.requires_grad


class Gate(nn.Module):
    """Forces an interleaving: thread "A" pauses inside its forward until "B" is inside its own,
    then "B" pauses until "A" has returned from ``attribute``."""

    def __init__(self, model: nn.Module, events: dict) -> None:
        super().__init__()
        self.model, self.events = model, events

    def forward(self, x: Tensor) -> Tensor:
        role = threading.current_thread().name
        if role == "A":
            self.events["a_in"].set()
            assert self.events["b_in"].wait(10)
        elif role == "B":
            self.events["b_in"].set()
            assert self.events["a_done"].wait(10)
        return self.model(x)


def _interleaved(model_a: nn.Module, model_b: nn.Module, x_a: Tensor, x_b: Tensor) -> tuple:
    events = {k: threading.Event() for k in ("a_in", "b_in", "a_done")}
    gate_a, gate_b = Gate(model_a, events), Gate(model_b, events)
    out: dict = {}
    errors: list = []

    def run_a() -> None:
        try:
            out["a"] = DynamicLRP(gate_a).attribute(x_a, target=0)
        except BaseException as err:  # noqa: BLE001 - a thread's failure is reported by the test
            errors.append(err)
        finally:
            events["a_done"].set()

    def run_b() -> None:
        try:
            assert events["a_in"].wait(10)
            out["b"] = DynamicLRP(gate_b).attribute(x_b, target=0)
        except BaseException as err:  # noqa: BLE001 - a thread's failure is reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return out["a"], out["b"]


def test_forced_interleaving_two_models_equal_sequential_calls():
    (m1, m2), (x1, x2) = _models(), _inputs()
    m1[0].requires_grad_(False)  # both models have frozen parameters
    expected_a = DynamicLRP(m1).attribute(x1, target=0)
    expected_b = DynamicLRP(m2).attribute(x2, target=0)
    got_a, got_b = _interleaved(m1, m2, x1, x2)
    assert torch.equal(got_a, expected_a) and torch.equal(got_b, expected_b)
    assert not m1[0].weight.requires_grad and not m2[0].weight.requires_grad


def test_forced_interleaving_one_shared_model_with_frozen_parameters():
    # Both forwards run while the other call is in progress: the flags parameters_tracked flips
    # are counted, so A's exit does not freeze the parameters under B's forward (B's graph would
    # lose the frozen biases) and B's own exit restores them.
    (m1, _), (x1, _) = _models(), _inputs()
    m1.requires_grad_(False)
    x_b = x1.flip(0).contiguous()
    expected_a = DynamicLRP(m1).attribute(x1, target=0)
    expected_b = DynamicLRP(m1).attribute(x_b, target=0)
    got_a, got_b = _interleaved(m1, m1, x1, x_b)
    assert torch.equal(got_a, expected_a)
    assert torch.equal(got_b, expected_b)
    assert not any(p.requires_grad for p in m1.parameters())


def test_forced_interleaving_one_shared_trainable_model():
    (m1, _), (x1, _) = _models(), _inputs()
    x_b = x1.flip(0).contiguous()
    expected_a = DynamicLRP(m1).attribute(x1, target=0)
    expected_b = DynamicLRP(m1).attribute(x_b, target=0)
    got_a, got_b = _interleaved(m1, m1, x1, x_b)
    assert torch.equal(got_a, expected_a) and torch.equal(got_b, expected_b)
