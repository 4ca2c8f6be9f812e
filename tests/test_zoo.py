"""DynamicLRP on the 15-architecture zoo: full coverage by real rules, finite, batch = per example.

Conservation bounds (documented in the README): relevance that biases, normaliser shifts,
constants and the softmax's bias term absorb is the convergence delta. On these random-weight
models the measured |delta| / |f_target| stays below ``DELTA_BOUND`` for every preset; a
larger value means relevance leaks (a broken rule), an infinite one means it blew up.
"""

from __future__ import annotations

import pytest
import torch

from captum_dynamiclrp import DynamicLRP, coverage
from tests.zoo import ZOO

pytest.importorskip("torchvision")
pytest.importorskip("transformers")

DELTA_BOUND = {"epsilon": 5.0, "attnlrp": 5.0, "cp-lrp": 5.0}
TRANSFORMERS = ("vit", "siglip", "wav2vec2", "whisper", "gpt2", "roberta", "llama", "gemma", "qwen", "t5",
                "pix2struct")


def _presets(name: str) -> tuple[str, ...]:
    return ("attnlrp", "cp-lrp") if any(t in name for t in TRANSFORMERS) else ("epsilon",)


def _built(name: str):
    case = ZOO[name]()
    with torch.no_grad():  # some models install their own hooks on the first call
        case.forward(*case.inputs)
    return case


@pytest.mark.parametrize("name", list(ZOO))
def test_every_node_has_a_real_rule(name: str, snapshot) -> None:
    case = _built(name)
    before = snapshot(case.model)
    report = coverage(case.forward, *case.inputs)
    assert report.fraction == 1.0, str(report)
    assert not report.uncovered
    before.assert_unchanged(case.model)


@pytest.mark.parametrize("name", list(ZOO))
def test_attributions_are_finite_shaped_and_batch_equals_singles(name: str, snapshot) -> None:
    case = _built(name)
    before = snapshot(case.model)
    with torch.no_grad():
        logits = case.forward(*case.inputs)
    for preset in _presets(name):
        lrp = DynamicLRP(case.forward, rules=preset)
        attr, delta = lrp.attribute(case.inputs, target=case.target, return_convergence_delta=True)
        assert lrp.last_fallback_ops == []
        for a, x in zip(attr, case.inputs):
            assert a.shape == x.shape
            assert torch.isfinite(a).all()
        assert torch.isfinite(delta).all()
        f = logits[:, case.target].abs()
        assert (delta.abs() <= DELTA_BOUND[preset] * f + 1e-4).all(), (preset, delta, f)
    before.assert_unchanged(case.model)


@pytest.mark.parametrize("name", list(ZOO))
def test_batch_equals_single_examples(name: str) -> None:
    # float64 and a small epsilon: a batch of one can take a different kernel path (mm + add
    # instead of addmm), which changes results only by epsilon-sized amounts.
    case = _built(name)
    model = case.forward.to(torch.float64)
    inputs = tuple(x.to(torch.float64) for x in case.inputs)
    lrp = DynamicLRP(model, epsilon=1e-9)
    batch = lrp.attribute(inputs, target=case.target)
    for row in range(inputs[0].shape[0]):
        single = lrp.attribute(tuple(x[row : row + 1] for x in inputs), target=case.target)
        for a, s in zip(batch, single):
            scale = a.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(a[row : row + 1] / scale, s / scale, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pair", sorted({n.rsplit("-", 1)[0] for n in ZOO if n.endswith("-sdpa")}))
def test_fused_and_eager_attention_agree(pair: str) -> None:
    results = []
    for impl in ("eager", "sdpa"):
        case = ZOO[f"{pair}-{impl}"]()
        results.append(DynamicLRP(case.forward).attribute(case.inputs, target=case.target))
    for a, b in zip(results[0], results[1]):
        scale = a.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-3, atol=1e-3)
