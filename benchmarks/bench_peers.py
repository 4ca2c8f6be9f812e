"""Speed of ``DynamicLRP.attribute`` against its peers, on CPU: Zennit, LXT and Captum's IntegratedGradients.

Three parts, each a set of workloads (random weights, eval mode, float32, one target per row):

* ``zennit``: torchvision VGG-16 and ResNet-50, ``--size``^2 images (default 224), batch ``--batch``.
  Both libraries apply the same rules: the ``epsilon`` preset against a Zennit ``LayerMapComposite``
  with ``Epsilon`` on every convolution and linear layer, the ``gamma`` preset against ``Gamma(0.25)``
  there; the rest is Zennit's base layer map (``Pass`` on activations, ``Norm`` on sums and average
  pools, which is epsilon on contributions, as ours). ResNet-50 gets Zennit's ``ResNetCanonizer``
  (batch norm merged into the convolutions, residual sums as modules), which Zennit needs for it, and
  ours ``batch_norm="merge"``, the same merge (``tests/test_peer_zennit.py`` checks that the two agree).
  Zennit's composite is registered once, before the timed calls (its steady state), on its own copy
  of the model; a call is ``Gradient(model, composite)(x, one_hot * output)``, the seed we use too.
* ``lxt``: GPT-2 (6 x 768, vocabulary 8192) and Llama (8 x 512, vocabulary 8192) built from
  ``transformers`` configs, ``--seq`` tokens (one run per length given; the IG row takes the first),
  ``sdpa`` attention. LXT 2.1 needs transformers 4.52, so this part runs in a child process of
  ``--lxt-python`` (default ``/work/venv-lxt/bin/python`` or ``$DYNAMICLRP_LXT_PYTHON``), an
  environment with LXT and this package installed; the models, their randomisation and LXT's
  patching come from ``tests/peers/test_peer_lxt.py``. LXT's efficient AttnLRP is Input x Gradient
  on the monkey-patched model (``monkey_patch`` patches classes, process-wide); ours is the
  ``attnlrp`` preset on the same, unpatched model (same epsilon as LXT's). Both run in the one
  child: the patch is applied once and then switched on for LXT's calls and off for ours (every
  attribute LXT replaced is swapped back and forth).
* ``ig``: Captum ``IntegratedGradients(n_steps=50)`` (``internal_batch_size`` = ``--ig-chunk``) against
  ours (``epsilon`` preset) on ResNet-50 (batch 1) and, in the LXT child, on the GPT-2 model
  (``attnlrp``; the IG row is measured there under transformers 4.52, unpatched).

Measured calls per workload, all on the same inputs and targets, in one child process, interleaved
repeat by repeat (peer, first, cached, peer, ...) after one untimed warm-up call of each, so that
background load affects all of them alike:

* ``peer``: the peer's attribution (see above);
* ``first``: a fresh ``DynamicLRP`` each call (graph walk, planning and execution);
* ``cached``: a later call on one ``DynamicLRP`` whose plan cache holds the plan.

The table shows medians over ``--repeats`` calls (``--ig-repeats`` for IG) and the ratios
ours / peer (below 1: we are faster); the last column is peer / ours-cached (for IG: the speed-up).
``--json PATH`` also writes every time. ``python benchmarks/bench_peers.py`` runs all parts
(about 15-20 minutes on 2 loaded CPU cores); ``--parts zennit`` etc. selects some.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import child_process
from ratios import paired_ratio

REPO = Path(__file__).resolve().parents[1]
PARTS = ("zennit", "lxt", "ig")
DEFAULT_LXT_PYTHON = os.environ.get("DYNAMICLRP_LXT_PYTHON", "/work/venv-lxt/bin/python")
N_STEPS = 50

# Transformer workloads of the LXT part: overrides of the tiny peer-test configs (tests/peers/test_peer_lxt.py).
LXT_MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 8192, "n_embd": 768, "n_inner": 3072, "n_layer": 6, "n_head": 12, "n_positions": 1024},
    "llama": {
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    },
}


# ---------------------------------------------------------------------------------------------
# timing (inside the children)


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call, methods interleaved per repeat, after one untimed call of each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            gc.collect()
            t0 = time.perf_counter()
            result = call()
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def ours_calls(forward: Callable, x, target, rules: str, **kwargs: Any) -> dict[str, Callable[[], Any]]:
    """The ``first`` (fresh plan) and ``cached`` DynamicLRP calls on ``forward``."""
    from captum_dynamiclrp import DynamicLRP

    cached = DynamicLRP(forward, rules=rules, **kwargs)
    return {
        "first": lambda: DynamicLRP(forward, rules=rules, **kwargs).attribute(x, target=target),
        "cached": lambda: cached.attribute(x, target=target),
    }


def integrated_gradients_call(forward: Callable, x, target, chunk: int) -> Callable[[], Any]:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(forward)
    return lambda: ig.attribute(x, target=target, n_steps=N_STEPS, internal_batch_size=chunk)


# ---------------------------------------------------------------------------------------------
# CNN workloads (Zennit and IG parts, main environment)


def build_cnn(name: str, batch: int, size: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch) * 7 % 1000
    return model, x, target


def zennit_call(model, x, target, rules: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """Zennit's attribution with the rules of our preset ``rules``, registered once; returns (call, remove)."""
    import torch
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, Gamma
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution, Linear

    from captum_dynamiclrp.presets import PRESETS

    preset = PRESETS[rules]
    if rules == "epsilon":
        linear_rule = Epsilon(epsilon=preset.epsilon)
    elif rules == "gamma":
        linear_rule = Gamma(gamma=preset.gamma, stabilizer=preset.epsilon)
    else:
        raise ValueError(f"no Zennit counterpart for preset {rules!r}")
    canonizers = [ResNetCanonizer()] if "resnet" in type(model).__name__.lower() else []
    composite = LayerMapComposite(
        layer_map=layer_map_base(preset.epsilon) + [(Convolution, linear_rule), (Linear, linear_rule)],
        canonizers=canonizers,
    )
    attributor = Gradient(model=model, composite=composite)
    attributor.__enter__()  # register the hooks (and canonizers) once: Zennit's steady state
    one_hot = torch.nn.functional.one_hot(target, 1000).to(x.dtype)

    def call():
        return attributor(x.clone(), lambda out: one_hot * out.detach())[1]

    return call, lambda: attributor.__exit__(None, None, None)


def child_zennit(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    model, x, target = build_cnn(spec["model"], spec["batch"], spec["size"])
    theirs, remove = zennit_call(copy.deepcopy(model), x, target, spec["rules"])
    merge = {"batch_norm": "merge"} if "resnet" in spec["model"] else {}  # Zennit's canonizer merges them
    calls = {"peer": theirs, **ours_calls(model, x, target, spec["rules"], **merge)}
    times = interleaved(calls, spec["repeats"])
    remove()
    return {"input_shape": list(x.shape), "times_s": times}


def child_ig_cnn(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    model, x, target = build_cnn(spec["model"], spec["batch"], spec["size"])
    calls = {"peer": integrated_gradients_call(model, x, target, spec["ig_chunk"]), **ours_calls(model, x, target, "epsilon")}
    return {"input_shape": list(x.shape), "times_s": interleaved(calls, spec["repeats"])}


# ---------------------------------------------------------------------------------------------
# transformer workloads (LXT part, LXT environment: transformers 4.52)


@contextmanager
def lxt_patch(module) -> Iterator[Callable[[bool], None]]:
    """Apply LXT's default patch to a ``transformers`` modeling module; yield a switch for it.

    LXT replaces attributes of classes (module forwards, ``nn.Dropout``, ``nn.LayerNorm``) and of the
    modeling module (its attention functions), for the whole process. The switch puts either LXT's
    or the original attributes in place, so that LXT and DynamicLRP can run in turn in one process;
    the originals are restored on exit.
    """
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import get_default_map

    targets = list(get_default_map(module))
    before = [dict(vars(t)) for t in targets]
    monkey_patch(module, verbose=False)
    after = [dict(vars(t)) for t in targets]
    missing = object()

    def switch(patched: bool) -> None:
        for target, old, new in zip(targets, before, after):
            source = new if patched else old
            for key in old.keys() | new.keys():
                if old.get(key, missing) is new.get(key, missing):
                    continue
                value = source.get(key, missing)
                if value is missing:
                    delattr(target, key)
                else:
                    setattr(target, key, value)

    try:
        yield switch
    finally:
        switch(False)


def child_lxt(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from tests.peers.test_peer_lxt import EPSILON, Case, build_model, modeling_module, randomize_, run_model

    torch.set_num_threads(spec["threads"])
    case = Case(spec["arch"], "sdpa", "float32", overrides=LXT_MODELS[spec["arch"]], tag="bench")
    torch.manual_seed(0)
    model = build_model(case)
    randomize_(model)
    for p in model.parameters():  # LXT's usage; DynamicLRP lets them require grad during its forward
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        target = run_model(case, model, embeds).argmax(-1)

    class Scores(torch.nn.Module):
        """The scores as a module, so that DynamicLRP finds (and tracks) the frozen parameters."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, e):
            return run_model(case, self.model, e)

    forward = Scores()
    rows = torch.arange(embeds.shape[0])

    with lxt_patch(modeling_module(case.arch)) as switch:

        def lxt_call():
            switch(True)
            try:
                leaf = embeds.detach().clone().requires_grad_(True)
                scores = forward(leaf)
                (grad,) = torch.autograd.grad(scores[rows, target].sum(), leaf)
                return leaf.detach() * grad
            finally:
                switch(False)

        switch(False)
        ours = ours_calls(forward, embeds, target, "attnlrp", epsilon=EPSILON)
        result: dict[str, Any] = {"input_shape": list(embeds.shape)}
        if spec["lxt"]:
            result["times_s"] = interleaved({"peer": lxt_call, **ours}, spec["repeats"])
        if spec["ig"]:
            ig = {"peer": integrated_gradients_call(forward, embeds, target, spec["ig_chunk"]), **ours}
            result["ig_times_s"] = interleaved(ig, spec["ig_repeats"])
    return result


# ---------------------------------------------------------------------------------------------
# driver


def run_child(spec: dict, python: str = sys.executable) -> dict:
    return child_process.run_child(__file__, spec, python=python, env={"PYTHONWARNINGS": "ignore"})


def make_row(part: str, model: str, batch: int, rules: str, peer: str, shape: list, times: dict) -> dict:
    median_ms = {m: 1e3 * statistics.median(v) for m, v in times.items()}
    return {
        "part": part,
        "model": model,
        "batch": batch,
        "rules": rules,
        "peer": peer,
        "input_shape": shape,
        "median_ms": median_ms,
        "times_ms": {m: [1e3 * t for t in v] for m, v in times.items()},
        "ours_over_peer": {m: median_ms[m] / median_ms["peer"] for m in ("first", "cached")},
        "peer_over_ours": {m: median_ms["peer"] / median_ms[m] for m in ("first", "cached")},
        # Round by round (see ratios.py): the noise of this run's ratios.
        "paired_ours_over_peer": {m: paired_ratio(times[m], times["peer"]) for m in ("first", "cached")},
        "paired_peer_over_ours": {m: paired_ratio(times["peer"], times[m]) for m in ("first", "cached")},
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'part':<6} {'model':<9} {'batch':>5} {'input':<14} {'rules':<8} {'peer':<7} | {'peer ms':>9}"
        f" {'first ms':>9} {'x':>5} {'cached ms':>9} {'x':>5} | {'peer/ours':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        t, x = r["median_ms"], r["ours_over_peer"]
        shape = "x".join(str(s) for s in r["input_shape"])
        lines.append(
            f"{r['part']:<6} {r['model']:<9} {r['batch']:>5} {shape:<14} {r['rules']:<8} {r['peer']:<7} |"
            f" {t['peer']:>9.1f} {t['first']:>9.1f} {x['first']:>5.2f} {t['cached']:>9.1f} {x['cached']:>5.2f} |"
            f" {r['peer_over_ours']['cached']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    parser.add_argument("--ig-repeats", type=int, default=3, help="timed calls per method in the IG part")
    parser.add_argument("--ig-chunk", type=int, default=10, help="IntegratedGradients internal_batch_size")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="CNN batch sizes (default: 1 8)")
    parser.add_argument("--cnns", nargs="+", default=["vgg16", "resnet50"], choices=["vgg16", "resnet50"])
    parser.add_argument("--rules", nargs="+", default=["epsilon", "gamma"], choices=["epsilon", "gamma"])
    parser.add_argument("--size", type=int, default=224, help="CNN image side (default 224)")
    parser.add_argument("--llms", nargs="+", default=list(LXT_MODELS), choices=list(LXT_MODELS))
    parser.add_argument("--seq", type=int, nargs="+", default=[256],
                        help="tokens of the LXT workloads, one run per length (default 256)")
    parser.add_argument("--lxt-python", default=DEFAULT_LXT_PYTHON, help="interpreter with LXT 2.1")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        warnings.filterwarnings("ignore")
        spec = json.loads(args.child)
        child = {"zennit": child_zennit, "ig_cnn": child_ig_cnn, "lxt": child_lxt}[spec["kind"]]
        print(json.dumps(child(spec)))
        return 0

    started = time.perf_counter()
    common = {"threads": args.threads, "repeats": args.repeats, "ig_repeats": args.ig_repeats, "ig_chunk": args.ig_chunk}
    rows: list[dict] = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if "zennit" in args.parts:
        for model in args.cnns:
            for batch in args.batch:
                for rules in args.rules:
                    spec = {**common, "kind": "zennit", "model": model, "batch": batch, "size": args.size, "rules": rules}
                    got = run_child(spec)
                    rows.append(make_row("zennit", model, batch, rules, "zennit", got["input_shape"], got["times_s"]))
                    log(f"zennit {model} batch={batch} {rules}")
    if "ig" in args.parts:
        spec = {**common, "kind": "ig_cnn", "model": "resnet50", "batch": 1, "size": args.size,
                "repeats": args.ig_repeats}
        got = run_child(spec)
        rows.append(make_row("ig", "resnet50", 1, "epsilon", "IG(50)", got["input_shape"], got["times_s"]))
        log("ig resnet50")
    lxt_python_found = Path(args.lxt_python).exists()
    if ("lxt" in args.parts or "ig" in args.parts) and not lxt_python_found:
        log(f"skipping the transformer workloads: no interpreter at {args.lxt_python} (see --lxt-python)")
    if ("lxt" in args.parts or "ig" in args.parts) and lxt_python_found:
        for seq in args.seq:
            for arch in args.llms:
                want_ig = "ig" in args.parts and arch == "gpt2" and seq == args.seq[0]  # IG once: it is slow
                if "lxt" not in args.parts and not want_ig:
                    continue
                spec = {**common, "kind": "lxt", "arch": arch, "batch": 1, "seq": seq,
                        "lxt": "lxt" in args.parts, "ig": want_ig}
                got = run_child(spec, python=args.lxt_python)
                if "times_s" in got:
                    rows.append(make_row("lxt", arch, 1, "attnlrp", "lxt", got["input_shape"], got["times_s"]))
                if "ig_times_s" in got:
                    rows.append(make_row("ig", arch, 1, "attnlrp", "IG(50)", got["input_shape"], got["ig_times_s"]))
                log(f"lxt {arch} seq={seq}")

    import torch

    print(format_table(rows))
    print(
        f"\nmedians of {args.repeats} calls ({args.ig_repeats} for IG); x = ours / peer (below 1: ours is faster); "
        f"peer/ours = peer / ours-cached; torch {torch.__version__}, {args.threads} threads; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    if args.json is not None:
        payload = {
            "meta": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(),
                "threads": args.threads,
                "repeats": args.repeats,
                "ig_repeats": args.ig_repeats,
                "ig_internal_batch_size": args.ig_chunk,
                "timing": "median wall-clock (perf_counter), methods interleaved per repeat, after a warm-up",
            },
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
