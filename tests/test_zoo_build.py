"""Every zoo case builds and its forward returns finite (batch, classes) float scores.

Only the zoo itself is checked here (no attribution): the op coverage of DynamicLRP on these
models is surveyed by ``benchmarks/zoo_survey.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import ARCHITECTURES, BATCH, ZOO, ZooCase

pytest.importorskip("torchvision")
pytest.importorskip("transformers")

EXPECTED_ARCHITECTURES = {
    "vgg16", "resnet50", "vit_b16", "efficientnet_v2_s", "siglip2", "wav2vec2", "whisper", "gpt2", "roberta",
    "llama3.2", "gemma3", "qwen3", "flan_t5", "pix2struct", "mamba",
}


def test_zoo_covers_the_fifteen_architectures() -> None:
    assert set(ARCHITECTURES) == EXPECTED_ARCHITECTURES
    assert sorted(k for keys in ARCHITECTURES.values() for k in keys) == sorted(ZOO)


def test_hf_attention_variants_come_in_pairs() -> None:
    for name in ZOO:
        if name.endswith("-eager"):
            assert name[: -len("eager")] + "sdpa" in ZOO
        if name.endswith("-sdpa"):
            assert name[: -len("sdpa")] + "eager" in ZOO


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_case_builds_and_scores(name: str) -> None:
    case = ZOO[name]()
    assert isinstance(case, ZooCase)
    assert isinstance(case.model, nn.Module)
    assert not case.model.training
    assert callable(case.forward)
    assert isinstance(case.description, str) and case.description
    assert isinstance(case.inputs, tuple) and case.inputs
    for x in case.inputs:
        assert isinstance(x, torch.Tensor)
        assert x.dtype == torch.float32
        assert x.shape[0] == BATCH
        assert not x.requires_grad
    assert all(p.dtype == torch.float32 for p in case.model.parameters())

    with torch.no_grad():
        out = case.forward(*case.inputs)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert out.dim() == 2 and out.shape[0] == BATCH
    assert 0 <= case.target < out.shape[1]
    assert torch.isfinite(out).all()
    assert out.std() > 0, "constant scores: the explained output would be trivial"


@pytest.mark.parametrize("name", ["gpt2-eager", "llama3.2-sdpa", "vit-eager", "whisper-sdpa"])
def test_zoo_case_is_deterministic(name: str) -> None:
    a, b = ZOO[name](), ZOO[name]()
    for x, y in zip(a.inputs, b.inputs):
        assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(a.forward(*a.inputs), b.forward(*b.inputs))


@pytest.mark.parametrize("arch", sorted({k.rsplit("-", 1)[0] for k in ZOO if k.endswith("-sdpa")}))
def test_eager_and_sdpa_agree(arch: str) -> None:
    eager, sdpa = ZOO[f"{arch}-eager"](), ZOO[f"{arch}-sdpa"]()
    with torch.no_grad():
        torch.testing.assert_close(eager.forward(*eager.inputs), sdpa.forward(*sdpa.inputs), rtol=1e-4, atol=1e-5)
