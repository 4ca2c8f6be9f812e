"""Time and peak memory of ``DynamicLRP.attribute`` against Captum's ``InputXGradient``, on CPU.

Workloads (random weights, eval mode, float32, one target per row, rows spread over the classes):

* ``mlp``: 4 x (Linear(1024, 1024) + ReLU), 256 rows times ``--batch``;
* ``resnet18``: torchvision ResNet-18, 3 x ``--resnet-size``^2 images (default 224), ``--batch`` images;
* ``vgg11``: torchvision VGG-11, 3 x ``--vgg-size``^2 images (default 128), ``--batch`` images.

Measured calls, all on the same inputs and targets:

* ``first``: ``DynamicLRP(model).attribute(x, target=t)`` with a fresh DynamicLRP each time, so the
  promise plan is built in every call (graph walk + planning + execution);
* ``cached``: a second and later call on one DynamicLRP whose plan cache already holds the plan;
* ``ixg``: ``captum.attr.InputXGradient(model).attribute(x, target=t)`` (one forward and one backward);
* ``forward`` (context only): the model's forward with the autograd graph kept, no backward.

Time: median wall-clock time (``time.perf_counter``) over ``--repeats`` calls. All methods of a workload
run in one child process, interleaved repeat by repeat (ixg, first, cached, ixg, ...) so that background
load affects all three alike, after one untimed warm-up of each. Each timed call's minor page faults
(``getrusage``) are counted too: glibc hands freed heap memory back to the OS and a later call faults it in
again, which on a VM can cost a large share of a call. ``--keep-heap`` runs the timing child with
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set high, so that freed memory stays mapped: the
ratios without that cost (an allocator setting of the user's process, which the library never changes).

``--batch-norm merge`` measures DynamicLRP with batch norms merged into the convolutions; ``--batch-norm
both`` keeps the default and adds ``cached_merge`` (a cached call with them merged) to the same interleaved
loop, for a like-for-like A/B.

Peak memory: PyTorch's CPU tensors are plain ``malloc``/``mmap`` memory that ``tracemalloc`` cannot see,
so memory is read from the kernel. Every measured call runs in a fresh child process that builds the
model and the inputs, warms up (one forward + backward; for ``cached`` one call of the shared
DynamicLRP, for ``first`` one call of another DynamicLRP, so that lazy initialisation is not counted
while the measured call still builds its plan), then
resets the process's peak resident set size (writing ``5`` to ``/proc/self/clear_refs`` resets
``VmHWM``), reads ``VmRSS``, makes the one measured call and reads ``VmHWM`` again. The figure reported
is ``VmHWM - VmRSS`` before the call: the extra resident memory the call needed at its peak, including
the forward pass's activations and autograd graph, which every method pays. Children run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves every tensor of 128 KiB or more with its own
``mmap`` and gives it back on free; without it, memory freed by the warm-up stays resident and is
silently reused, hiding part of the measured call's peak. If ``clear_refs`` cannot be written (old
kernels, some sandboxes), the child skips the warm-up and reports ``ru_maxrss`` after the call minus
``VmRSS`` before it (``getrusage``); the JSON says which method was used. Resolution is a page; the
numbers include allocator slack, and small allocations (< 128 KiB) freed before the call may be reused.

On a GPU (``--device cuda``, or ``auto``) the same workloads run there: each timed call is bracketed by
``torch.cuda.synchronize``, and memory is the CUDA allocator's peak during the call
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) minus what was allocated before it.

Run ``python benchmarks/bench_engine.py`` (about 4-5 minutes on 2 CPU cores with the defaults);
``--json PATH`` also writes every number. The ratios in the table are ours / InputXGradient.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import child_process
from ratios import paired_ratio

METHODS = ("ixg", "first", "cached")
EXTRA_METHODS = ("cached_merge",)  # with --batch-norm both


# ---------------------------------------------------------------------------------------------
# workloads (built inside the child processes)


def build_workload(name: str, batch: int, resnet_size: int, vgg_size: int):
    """Model (eval, random weights), inputs and per-row targets of one workload."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        model = nn.Sequential(*layers)
        x = torch.randn(256 * batch, 1024)
        classes = 1024
    elif name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None)
        x = torch.randn(batch, 3, resnet_size, resnet_size)
        classes = 1000
    elif name == "vgg11":
        import torchvision

        model = torchvision.models.vgg11(weights=None)
        x = torch.randn(batch, 3, vgg_size, vgg_size)
        classes = 1000
    elif name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        x = torch.randn(batch, 3, 224, 224)
        classes = 1000
    elif name == "vit_b16":
        import torchvision

        model = torchvision.models.vit_b_16(weights=None)
        x = torch.randn(batch, 3, 224, 224)
        classes = 1000
    elif name in ("gpt2", "llama8"):
        model, x, classes = _language_model(name, batch)
    else:
        raise ValueError(f"unknown workload {name!r}")
    model.eval()
    target = torch.arange(x.shape[0]) * 7 % classes
    return model, x, target


def _next_token_logits(lm):
    """Wrap a causal LM as a module mapping input embeddings to the last position's logits."""
    from torch import nn

    class NextTokenLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, embeds):
            return self.lm(inputs_embeds=embeds).logits[:, -1]

    return NextTokenLogits()


def _language_model(name: str, batch: int):
    """GPT-2 small (12 layers, 768 wide) or an 8-layer Llama (512 wide), random weights, 512 tokens, SDPA."""
    import torch
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=512, vocab_size=50257)
        lm = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=8, hidden_size=512, intermediate_size=1536,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                          max_position_embeddings=512)
        lm = transformers.LlamaForCausalLM(config)
    lm.config._attn_implementation = "sdpa"
    x = torch.randn(batch, 512, config.hidden_size if name == "llama8" else config.n_embd) * 0.02
    return _next_token_logits(lm), x, config.vocab_size


def on_device(model, x, target, device: str):
    """The workload moved to ``device`` (``"cpu"`` leaves it where it was built)."""
    if device == "cpu":
        return model, x, target
    return model.to(device), x.to(device), target.to(device)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it (no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def make_calls(model, x, target, batch_norm: str = "epsilon") -> dict[str, Callable[[], Any]]:
    """The measured calls; ``cached`` shares one DynamicLRP (warm it before measuring).

    ``batch_norm="both"``: the default rules, plus ``cached_merge``, a cached DynamicLRP with batch
    norms merged into the convolutions, timed in the same interleaved loop.
    """
    from captum.attr import InputXGradient

    from captum_dynamiclrp import DynamicLRP

    extra: dict[str, Callable[[], Any]] = {}
    if batch_norm == "both":
        merged_lrp = DynamicLRP(model, batch_norm="merge")
        extra["cached_merge"] = lambda: merged_lrp.attribute(x, target=target)
        batch_norm = "epsilon"
    cached_lrp = DynamicLRP(model, batch_norm=batch_norm)

    def forward():
        import torch

        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            return model(leaf)

    return {
        "ixg": lambda: InputXGradient(model).attribute(x, target=target),
        "first": lambda: DynamicLRP(model, batch_norm=batch_norm).attribute(x, target=target),
        "cached": lambda: cached_lrp.attribute(x, target=target),
        "forward": forward,
        **extra,
    }


def _warm_up(model, x) -> None:
    import torch

    leaf = x.detach().clone().requires_grad_(True)
    out = model(leaf)
    torch.autograd.grad(out.sum(), leaf)


# ---------------------------------------------------------------------------------------------
# child processes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_time(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    model, x, target = on_device(
        *build_workload(spec["model"], spec["batch"], spec["resnet_size"], spec["vgg_size"]), device
    )
    calls = make_calls(model, x, target, spec.get("batch_norm", "epsilon"))
    _warm_up(model, x)
    with torch.no_grad():
        synchronize(device)
        t0 = time.perf_counter()
        model(x)
        synchronize(device)
        forward_nograd = time.perf_counter() - t0
    methods = METHODS + tuple(m for m in EXTRA_METHODS if m in calls)
    for method in methods:  # one untimed call each (warms the cached plan too)
        calls[method]()
    times: dict[str, list[float]] = {m: [] for m in methods}
    faults: dict[str, list[int]] = {m: [] for m in methods}
    for _ in range(spec["repeats"]):
        for method in methods:
            gc.collect()
            synchronize(device)
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            result = calls[method]()
            synchronize(device)
            times[method].append(time.perf_counter() - t0)
            faults[method].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            del result
    return {
        "input_shape": list(x.shape),
        "forward_nograd_s": forward_nograd,
        "times_s": times,
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "minor_faults": faults,
        "malloc_env": {k: os.environ.get(k) for k in KEEP_HEAP_MALLOC_ENV},  # what this child ran under
    }


def child_memory(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    model, x, target = on_device(
        *build_workload(spec["model"], spec["batch"], spec["resnet_size"], spec["vgg_size"]), device
    )
    calls = make_calls(model, x, target, spec.get("batch_norm", "epsilon"))
    method = spec["method"]
    if device.startswith("cuda"):  # the CUDA caching allocator's own peak, not the process's RSS
        _warm_up(model, x)
        if method in ("cached", "first") + EXTRA_METHODS:
            calls[method]()
        gc.collect()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = calls[method]()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return {"peak_extra_mib": (peak - before) / 2**20, "rss_before_mib": before / 2**20,
                "method": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it"}
    can_reset = _reset_peak()
    if can_reset:
        _warm_up(model, x)
        if method in ("cached",) + EXTRA_METHODS:
            calls[method]()
        elif method == "first":  # warms the code paths (lazy imports, kernels); the measured call still plans
            calls["first"]()
        gc.collect()
        _reset_peak()
        before = _status_kib("VmRSS")
        result = calls[method]()
        peak = _status_kib("VmHWM")
        how = "VmHWM after clear_refs reset minus VmRSS before the call"
    else:
        if method == "cached":
            raise RuntimeError("cannot measure a cached call without resetting the peak RSS")
        gc.collect()
        before = _status_kib("VmRSS")
        result = calls[method]()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        how = "ru_maxrss after the call minus VmRSS before it (no warm-up)"
    del result
    return {"peak_extra_mib": (peak - before) / 1024.0, "rss_before_mib": before / 1024.0, "method": how}


# Memory children: glibc serves every buffer of 128 KiB or more by mmap and returns it on free.
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# Timing children with --keep-heap: glibc never trims the heap and serves buffers up to 4 GiB from it.
KEEP_HEAP_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def run_child(spec: dict) -> dict:
    if spec["kind"] == "memory":
        env = MEMORY_MALLOC_ENV
    else:
        env = KEEP_HEAP_MALLOC_ENV if spec.get("keep_heap") else None
    return child_process.run_child(__file__, spec, env=env)


# ---------------------------------------------------------------------------------------------
# driver


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'model':<9} {'batch':>5} {'input':<18} | {'IxG ms':>8} {'first ms':>9} {'x':>5} {'cached ms':>9} {'x':>5} |"
        f" {'fwd MiB':>8} {'IxG MiB':>8} {'first MiB':>9} {'x':>5} {'cached MiB':>10} {'x':>5}"
    )
    merged = any("cached_merge" in r["median_ms"] for r in rows)
    if merged:
        header += f" | {'merged ms':>9} {'x':>5} {'MiB':>6} {'x':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        t, m = r["median_ms"], r["peak_extra_mib"]
        shape = "x".join(str(s) for s in r["input_shape"])
        line = (
            f"{r['model']:<9} {r['batch']:>5} {shape:<18} | {t['ixg']:>8.1f} {t['first']:>9.1f}"
            f" {r['time_ratio']['first']:>5.2f} {t['cached']:>9.1f} {r['time_ratio']['cached']:>5.2f} |"
            f" {m['forward']:>8.1f} {m['ixg']:>8.1f} {m['first']:>9.1f} {r['memory_ratio']['first']:>5.2f}"
            f" {m['cached']:>10.1f} {r['memory_ratio']['cached']:>5.2f}"
        )
        if merged and "cached_merge" in t:
            line += (
                f" | {t['cached_merge']:>9.1f} {r['time_ratio']['cached_merge']:>5.2f}"
                f" {m['cached_merge']:>6.1f} {r['memory_ratio']['cached_merge']:>5.2f}"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch multipliers (default: 1 8)")
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "resnet18", "vgg11"],
        choices=["mlp", "resnet18", "vgg11", "resnet50", "vit_b16", "gpt2", "llama8"],
        help="workloads (default: mlp resnet18 vgg11; the zoo's benchmark sizes: resnet50 vit_b16 gpt2 llama8)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    parser.add_argument("--resnet-size", type=int, default=224, help="ResNet-18 image side (default 224)")
    parser.add_argument("--vgg-size", type=int, default=128, help="VGG-11 image side (default 128)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--batch-norm", default="epsilon", choices=["epsilon", "merge", "both"],
                        help="DynamicLRP's batch_norm rule (default epsilon; merge: folded into the convolutions; "
                             "both: epsilon, plus a cached call with merge in the same interleaved loop)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N, or auto (cuda where available, else cpu)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="time with glibc's heap trimming off (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ "
                             "set high), to see the ratios without page faults; memory children are unchanged")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        warnings.filterwarnings("ignore")
        spec = json.loads(args.child)
        result = child_time(spec) if spec["kind"] == "time" else child_memory(spec)
        print(json.dumps(result))
        return 0

    import torch

    args.device = child_process.resolve_device(parser, args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for model in args.models:
        for batch in args.batch:
            base = {
                "model": model,
                "batch": batch,
                "threads": args.threads,
                "resnet_size": args.resnet_size,
                "vgg_size": args.vgg_size,
                "device": args.device,
                "batch_norm": args.batch_norm,
            }
            timing = run_child({**base, "kind": "time", "repeats": args.repeats, "keep_heap": args.keep_heap})
            memory: dict[str, Any] = {}
            how = None
            extra = tuple(m for m in EXTRA_METHODS if m in timing["median_s"])
            if not args.no_memory:
                for method in ("forward",) + METHODS + extra:
                    got = run_child({**base, "kind": "memory", "method": method})
                    memory[method] = got["peak_extra_mib"]
                    how = got["method"]
            else:
                memory = {m: float("nan") for m in ("forward",) + METHODS + extra}
            median_ms = {m: 1e3 * v for m, v in timing["median_s"].items()}
            row = {
                **{k: base[k] for k in ("model", "batch")},
                "input_shape": timing["input_shape"],
                "forward_nograd_ms": 1e3 * timing["forward_nograd_s"],
                "median_ms": median_ms,
                "times_ms": {m: [1e3 * t for t in v] for m, v in timing["times_s"].items()},
                "minor_faults": timing["minor_faults"],
                "median_minor_faults": {m: statistics.median(v) for m, v in timing["minor_faults"].items()},
                "timing_malloc_env": timing["malloc_env"],
                "peak_extra_mib": memory,
                "memory_method": how,
                "time_ratio": {m: _ratio(median_ms[m], median_ms["ixg"]) for m in ("first", "cached") + extra},
                # Round by round (see ratios.py): the noise of this run's time ratio.
                "paired_time_ratio": {
                    m: paired_ratio(timing["times_s"][m], timing["times_s"]["ixg"]) for m in ("first", "cached") + extra
                },
                "memory_ratio": {m: _ratio(memory[m], memory["ixg"]) for m in ("first", "cached") + extra},
            }
            rows.append(row)
            print(
                f"[{time.perf_counter() - started:6.1f}s] {model} batch={batch}: "
                f"forward (no grad) {row['forward_nograd_ms']:.1f} ms; minor page faults per call (median) "
                + ", ".join(f"{m} {n:.0f}" for m, n in row["median_minor_faults"].items()),
                file=sys.stderr,
                flush=True,
            )

    print(format_table(rows))
    print(
        f"\nmedian of {args.repeats} calls; x = ours / InputXGradient; MiB = peak extra resident memory of one "
        f"call in a fresh process (fwd: the forward with its graph alone); batch_norm={args.batch_norm}; "
        f"{'heap kept (glibc trimming off); ' if args.keep_heap else ''}"
        f"device {args.device}; torch "
        f"{torch.__version__}, {args.threads} threads; total {time.perf_counter() - started:.0f} s"
    )
    if args.json is not None:
        payload = {
            "meta": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "device": args.device,
                "batch_norm": args.batch_norm,
                "threads": args.threads,
                "repeats": args.repeats,
                "keep_heap": args.keep_heap,
                "timing": "median wall-clock (perf_counter), methods interleaved per repeat, after a warm-up",
                "memory": "peak extra RSS of one call in a fresh child process; see the script's docstring",
            },
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
