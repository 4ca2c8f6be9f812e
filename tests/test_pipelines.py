"""Issue 4: DynamicLRP is a drop-in for Captum pipelines.

Each pipeline below is one function taking the attribution *class*; it is run
once with Captum's method and once with ours, and nothing but the constructor
differs between the two runs (IG-only keywords such as ``baselines`` and
``n_steps`` are passed to both and ignored by ours). Models are tiny, built from
configs with random weights; tokenizers are built locally from a word list.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    IntegratedGradients,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    LLMAttributionResult,
    LLMGradientAttribution,
    NoiseTunnel,
    TextTokenInput,
)
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from captum_dynamiclrp import (
    DynamicLRP,
    DynamicLRPLLMAttribution,
    LayerDynamicLRP,
    register_llm_support,
    scores_of,
)
from captum_dynamiclrp.visualization import text_record, to_image, to_image_attr, token_relevance

from .conftest import stab

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _finite(*tensors: Any) -> bool:
    return all(torch.isfinite(t).all().item() for t in tensors)


# --------------------------------------------------------------------------------------
# Image pipeline: a small CNN, IntegratedGradients then DynamicLRP.
# --------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _noise(inputs: Tensor) -> tuple[Tensor, Tensor]:
    noise = 0.01 * torch.randn_like(inputs)
    return noise, inputs - noise


def image_pipeline(method_cls: Callable, model: nn.Module, images: Tensor, targets: list[int]) -> dict:
    """A classic Captum image pipeline; ``method_cls`` is the only thing a caller varies."""
    method = method_cls(model)
    baselines = torch.zeros_like(images)
    out: dict = {}
    torch.manual_seed(1)
    out["attr"], out["delta"] = method.attribute(
        images, baselines=baselines, target=targets, n_steps=8, return_convergence_delta=True
    )
    out["nt"] = NoiseTunnel(method).attribute(
        images, nt_type="smoothgrad", nt_samples=3, stdevs=0.05, baselines=baselines, target=targets, n_steps=8
    )
    out["infidelity"] = infidelity(model, _noise, images, out["attr"], target=targets, n_perturb_samples=3)
    out["sensitivity"] = sensitivity_max(
        method.attribute, images, n_perturb_samples=2, baselines=baselines, target=targets, n_steps=8
    )
    fig, _ = viz.visualize_image_attr(
        to_image_attr(out["attr"][0]), to_image(images[0]), method="blended_heat_map", sign="all", use_pyplot=False
    )
    fig2, axes = viz.visualize_image_attr_multiple(
        to_image_attr(out["attr"][:1]),
        to_image(images[:1]),
        methods=["original_image", "heat_map", "masked_image"],
        signs=["all", "absolute_value", "positive"],
        use_pyplot=False,
    )
    out["figures"] = (fig, fig2, axes)
    return out


@pytest.fixture
def cnn() -> tuple[nn.Module, Tensor, list[int]]:
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.rand(2, 3, 12, 12), [1, 3]


@pytest.mark.parametrize("method_cls", [IntegratedGradients, DynamicLRP], ids=["IG", "DynamicLRP"])
def test_image_pipeline(method_cls, cnn, snapshot):
    model, images, targets = cnn
    before, images_before = snapshot(model), images.clone()
    out = image_pipeline(method_cls, model, images, targets)
    before.assert_unchanged(model)
    assert torch.equal(images, images_before) and not images.requires_grad
    assert out["attr"].shape == images.shape and out["nt"].shape == images.shape
    assert out["delta"].shape == (2,)
    assert out["infidelity"].shape == (2,) and out["sensitivity"].shape == (2,)
    assert _finite(out["attr"], out["delta"], out["nt"], out["infidelity"], out["sensitivity"])
    fig, fig2, axes = out["figures"]
    assert isinstance(fig, matplotlib.figure.Figure) and isinstance(fig2, matplotlib.figure.Figure)
    assert len(axes) == 3


def test_image_pipeline_dynamiclrp_is_the_plain_attribution(cnn):
    model, images, targets = cnn
    out = image_pipeline(DynamicLRP, model, images, targets)
    # The IG keywords changed nothing, and the delta is the one compute_convergence_delta gives.
    plain = DynamicLRP(model).attribute(images, target=targets)
    assert torch.equal(out["attr"], plain)
    delta = DynamicLRP(model).compute_convergence_delta(plain, images, target=targets)
    torch.testing.assert_close(out["delta"], delta)


# --------------------------------------------------------------------------------------
# NoiseTunnel on DynamicLRP.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_delta", [False, True], ids=["no_delta", "delta"])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel(nt_type, with_delta, cnn, snapshot):
    model, images, targets = cnn
    before = snapshot(model)
    lrp = DynamicLRP(model)
    nt = NoiseTunnel(lrp)
    result = nt.attribute(
        images, nt_type=nt_type, nt_samples=3, stdevs=0.05, target=targets, return_convergence_delta=with_delta
    )
    if with_delta:
        attr, delta = result
        assert delta.shape == (2 * 3,) and _finite(delta)
    else:
        attr = result
    assert attr.shape == images.shape and _finite(attr)
    if nt_type != "smoothgrad":
        assert (attr >= 0).all()
    # Without noise the tunnel reduces to the plain attribution: mean, mean of squares, variance.
    plain = lrp.attribute(images, target=targets)
    noiseless = nt.attribute(images, nt_type=nt_type, nt_samples=2, stdevs=0.0, target=targets)
    expected = {"smoothgrad": plain, "smoothgrad_sq": plain**2, "vargrad": torch.zeros_like(plain)}[nt_type]
    torch.testing.assert_close(noiseless, expected, atol=1e-6, rtol=1e-5)
    before.assert_unchanged(model)


# --------------------------------------------------------------------------------------
# Text classification: a tiny BERT, LayerIntegratedGradients then LayerDynamicLRP.
# --------------------------------------------------------------------------------------

WORDS = [
    *("the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "is", "big", "small", "red", "blue"),
    *("and", "good", "bad", "movie", "film", "was", "very", "not", "it", "i", "liked", "hated", "plot"),
    *("actors", "great", "boring", "fun"),
]


def _word_level_tokenizer(specials: list[str], template: str, **special_kwargs: str):
    """A PreTrainedTokenizerFast over WORDS, built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special_kwargs["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    used = [tok for tok in specials if tok in template]
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(tok, vocab[tok]) for tok in used]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_kwargs)


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _word_level_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "[CLS] $A [SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval(), tokenizer


def text_pipeline(layer_method_cls: Callable, model: nn.Module, tokenizer, texts: list[str], labels: list[int]):
    """Captum's BERT tutorial, condensed; ``layer_method_cls`` is the only thing a caller varies."""
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    special = torch.tensor(
        [[tok in tokenizer.all_special_ids for tok in row] for row in input_ids.tolist()], dtype=torch.bool
    )
    ref_ids = torch.where(special, input_ids, tokenizer.pad_token_id)

    def model_forward(ids: Tensor, attention_mask: Tensor) -> Tensor:
        return model(ids, attention_mask=attention_mask).logits

    with torch.no_grad():
        probs = model_forward(input_ids, mask).softmax(-1)
    predicted = probs.argmax(-1)
    method = layer_method_cls(model_forward, model.bert.embeddings)
    attr, delta = method.attribute(
        input_ids,
        baselines=ref_ids,
        additional_forward_args=(mask,),
        target=predicted,
        n_steps=8,
        internal_batch_size=16,
        return_convergence_delta=True,
    )
    per_token = token_relevance(attr)
    records = []
    for i, text in enumerate(texts):
        length = int(mask[i].sum())
        tokens = tokenizer.convert_ids_to_tokens(input_ids[i, :length].tolist())
        records.append(
            text_record(
                tokens,
                per_token[i, :length],
                probs[i, predicted[i]],
                int(predicted[i]),
                labels[i],
                int(predicted[i]),
                delta[i],
            )
        )
    html = viz.visualize_text(records)
    return attr, delta, per_token, records, html


@pytest.mark.parametrize(
    "layer_method_cls", [LayerIntegratedGradients, LayerDynamicLRP], ids=["LIG", "LayerDynamicLRP"]
)
def test_text_pipeline(layer_method_cls, bert, snapshot):
    model, tokenizer = bert
    before = snapshot(model)
    texts, labels = ["the movie was very good", "boring plot"], [1, 0]
    attr, delta, per_token, records, html = text_pipeline(layer_method_cls, model, tokenizer, texts, labels)
    before.assert_unchanged(model)
    seq_len = len(tokenizer(texts[0])["input_ids"])
    assert attr.shape == (2, seq_len, 16) and delta.shape == (2,) and per_token.shape == (2, seq_len)
    assert _finite(attr, delta)
    assert len(records) == 2 and len(records[1].raw_input_ids) == 4  # [CLS] boring plot [SEP]
    for record in records:
        assert torch.linalg.vector_norm(record.word_attributions).item() == pytest.approx(1.0, abs=1e-5)
        assert np.isfinite(record.attr_score) and np.isfinite(record.convergence_score)
    assert "boring" in html.data


def test_layer_dynamiclrp_on_token_ids_matches_dynamiclrp_on_embeddings(bert):
    # LayerDynamicLRP at the embedding output == DynamicLRP with the embedding output as its input.
    model, tokenizer = bert
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    layer_attr = LayerDynamicLRP(lambda i: model(i).logits, model.bert.embeddings).attribute(ids, target=2)
    with torch.no_grad():
        embedded = model.bert.embeddings(ids)

    def from_embeddings(e: Tensor) -> Tensor:
        # The hook makes the embedding layer return e (DynamicLRP's leaf) instead of its own output.
        handle = model.bert.embeddings.register_forward_hook(lambda mod, args, out: e)
        try:
            return model(ids).logits
        finally:
            handle.remove()

    attr = DynamicLRP(from_embeddings).attribute(embedded, target=2)
    torch.testing.assert_close(layer_attr, attr)


# --------------------------------------------------------------------------------------
# LLM: LLMGradientAttribution on a tiny Llama.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _word_level_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"],
        "<s> $A",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _llm_ig(model: nn.Module, tokenizer) -> LLMGradientAttribution:
    return LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)


def _llm_lrp(model: nn.Module, tokenizer) -> LLMGradientAttribution:
    register_llm_support()
    return LLMGradientAttribution(LayerDynamicLRP(model, model.get_input_embeddings()), tokenizer)


def _llm_subclass(model: nn.Module, tokenizer) -> LLMGradientAttribution:
    return DynamicLRPLLMAttribution(LayerDynamicLRP(model, model.get_input_embeddings()), tokenizer)


def llm_pipeline(make: Callable, model: nn.Module, tokenizer) -> LLMAttributionResult:
    llm_attr = make(model, tokenizer)
    inp = TextTokenInput("the cat sat", tokenizer, skip_tokens=["<s>"])
    result = llm_attr.attribute(inp, target="on the mat", n_steps=8)
    result.plot_token_attr(show=False)
    result.plot_seq_attr(show=False)
    return result


def _check_llm_result(result: LLMAttributionResult) -> None:
    assert isinstance(result, LLMAttributionResult)
    assert result.input_tokens == ["the", "cat", "sat"]
    assert result.output_tokens == ["on", "the", "mat"]
    assert result.seq_attr.shape == (3,) and result.token_attr.shape == (3, 3)
    assert _finite(result.seq_attr, result.token_attr)
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_llm_ig, id="LayerIntegratedGradients"),
        pytest.param(_llm_lrp, id="LayerDynamicLRP"),
        pytest.param(_llm_subclass, id="DynamicLRPLLMAttribution"),
    ],
)
def test_llm_pipeline(make, llama, snapshot):
    model, tokenizer = llama
    before = snapshot(model)
    _check_llm_result(llm_pipeline(make, model, tokenizer))
    before.assert_unchanged(model)


def test_llm_pipeline_does_not_warn_about_training_mode(llama):
    # Captum wraps the eval model in a fresh (training-mode) module without state of its own.
    model, tokenizer = llama
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The model is in training mode")
        llm_pipeline(_llm_lrp, model, tokenizer)


# --------------------------------------------------------------------------------------
# LayerDynamicLRP: tuple layers, layer inputs, batch/target semantics, hooks on error.
# --------------------------------------------------------------------------------------


class Split(nn.Module):
    """A layer with two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.relu(self.a(x)), torch.relu(self.b(x))


class Merge(nn.Module):
    """A layer with two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, p: Tensor, q: Tensor) -> Tensor:
        return self.fc(torch.cat([p, q], dim=-1))


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.split = Split()
        self.merge = Merge()

    def forward(self, x: Tensor, fail: bool = False) -> Tensor:
        if fail:
            raise RuntimeError("the model failed")
        p, q = self.split(torch.relu(self.inp(x)))
        return self.merge(p, q)


@pytest.fixture
def two_branch() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return TwoBranch().eval(), torch.randn(4, 5)


def test_layer_with_tuple_output(two_branch, snapshot):
    model, x = two_branch
    before = snapshot(model)
    targets = [0, 2, 1, 2]
    (ra, rb), delta = LayerDynamicLRP(model, model.split).attribute(x, target=targets, return_convergence_delta=True)
    before.assert_unchanged(model)
    assert ra.shape == rb.shape == (4, 4) and delta.shape == (4,)
    # Above the split there are no biases: the two outputs share the whole target logit.
    logits = model(x).detach()[torch.arange(4), targets]
    torch.testing.assert_close(ra.sum(1) + rb.sum(1), logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta, torch.zeros(4), atol=1e-5, rtol=0)


def test_layer_with_tuple_input_equals_input_x_gradient(two_branch):
    # The merge layer is linear and bias-free: epsilon-LRP at its inputs is input x gradient.
    # With the output as the seed, R = x * grad * z / (z + eps * sign(z)), z the target logit.
    model, x = two_branch
    relevance = LayerDynamicLRP(model, model.merge).attribute(x, target=1, attribute_to_layer_input=True)
    reference = LayerGradientXActivation(model, model.merge).attribute(x, target=1, attribute_to_layer_input=True)
    z = model(x).detach()[:, 1:2]
    assert isinstance(relevance, tuple) and len(relevance) == 2
    for ours, theirs in zip(relevance, reference):
        assert ours.shape == (4, 4)
        torch.testing.assert_close(ours, theirs.detach() * z / stab(z, 1e-6), atol=1e-6, rtol=1e-5)


def test_layer_input_and_output_of_a_single_tensor_layer(two_branch):
    model, x = two_branch
    lrp = LayerDynamicLRP(model, model.inp)
    assert lrp.attribute(x, target=0).shape == (4, 6)
    at_input = lrp.attribute(x, target=0, attribute_to_layer_input=True)
    assert at_input.shape == x.shape
    torch.testing.assert_close(at_input, DynamicLRP(model).attribute(x, target=0))


@pytest.mark.parametrize("target", [[0, 2, 1, 2], torch.tensor([0, 2, 1, 2])], ids=["list", "tensor"])
def test_layer_batch_equals_single_examples(two_branch, target):
    model, x = two_branch
    lrp = LayerDynamicLRP(model, model.split)
    batch = lrp.attribute(x, target=target)
    for i in range(4):
        single = lrp.attribute(x[i : i + 1], target=int(target[i]))
        for b, s in zip(batch, single):
            torch.testing.assert_close(b[i : i + 1], s, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("to_input", [False, True], ids=["output", "input"])
def test_layer_hooks_removed_on_error(two_branch, to_input, snapshot):
    model, x = two_branch
    before = snapshot(model)
    lrp = LayerDynamicLRP(model, model.split)
    with pytest.raises(ValueError):
        lrp.attribute(x, target=99, attribute_to_layer_input=to_input)
    with pytest.raises(RuntimeError, match="the model failed"):
        lrp.attribute(x, target=0, additional_forward_args=(True,), attribute_to_layer_input=to_input)
    assert not model.split._forward_hooks and not model.split._forward_pre_hooks
    before.assert_unchanged(model)
    after = lrp.attribute(x, target=0, attribute_to_layer_input=to_input)
    if to_input:  # the split layer takes one tensor and returns two
        assert isinstance(after, Tensor) and after.shape == (4, 6)
    else:
        assert isinstance(after, tuple) and [r.shape for r in after] == [(4, 4), (4, 4)]


# --------------------------------------------------------------------------------------
# Multi-input models, tuple / ModelOutput outputs.
# --------------------------------------------------------------------------------------


class MultiInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 6)
        self.fb = nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a: Tensor, b: Tensor, mask: Tensor, scale: float, mode: str) -> Tensor:
        h = torch.relu(self.fa(a) * mask + self.fb(b))
        h = h * scale if mode == "scaled" else h
        return self.head(h)


def multi_input_pipeline(method_cls: Callable, model: nn.Module, a: Tensor, b: Tensor, mask: Tensor):
    method = method_cls(model)
    return method.attribute(
        (a, b),
        baselines=(torch.zeros_like(a), torch.zeros_like(b)),
        target=[2, 0, 1],
        additional_forward_args=(mask, 0.5, "scaled"),
        n_steps=16,
        return_convergence_delta=True,
    )


@pytest.mark.parametrize("method_cls", [IntegratedGradients, DynamicLRP], ids=["IG", "DynamicLRP"])
def test_multi_input_with_non_tensor_args(method_cls, snapshot):
    torch.manual_seed(0)
    model = MultiInput().eval()
    a, b, mask = torch.randn(3, 4), torch.randn(3, 3), (torch.rand(3, 6) > 0.3).float()
    before = snapshot(model)
    (ra, rb), delta = multi_input_pipeline(method_cls, model, a, b, mask)
    before.assert_unchanged(model)
    assert ra.shape == a.shape and rb.shape == b.shape and delta.shape == (3,)
    assert _finite(ra, rb, delta)
    if method_cls is DynamicLRP:
        assert ra.abs().sum() > 0 and rb.abs().sum() > 0


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        return self.head(hidden), hidden


class ModelOutputNet(TupleOut):
    def forward(self, x: Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits, hidden = super().forward(x)
        return SequenceClassifierOutput(logits=logits, hidden_states=(hidden,))


@pytest.mark.parametrize("net_cls", [TupleOut, ModelOutputNet])
@pytest.mark.parametrize("method_cls", [IntegratedGradients, DynamicLRP], ids=["IG", "DynamicLRP"])
def test_tuple_and_model_output_via_scores_of(net_cls, method_cls):
    torch.manual_seed(0)
    model, x = net_cls().eval(), torch.randn(3, 5)
    logits_only = lambda inp: model(inp)[0] if net_cls is TupleOut else model(inp).logits
    forward = lambda inp: scores_of(model(inp))
    attr = method_cls(forward).attribute(x, target=1, baselines=torch.zeros_like(x), n_steps=8)
    expected = method_cls(logits_only).attribute(x, target=1, baselines=torch.zeros_like(x), n_steps=8)
    assert attr.shape == x.shape and _finite(attr)
    torch.testing.assert_close(attr, expected)


@pytest.mark.parametrize("net_cls", [TupleOut, ModelOutputNet])
def test_unwrapped_structured_output_gives_a_helpful_error(net_cls):
    model, x = net_cls().eval(), torch.randn(2, 5)
    with pytest.raises(TypeError, match="scores_of"):
        DynamicLRP(model).attribute(x, target=0)
    with pytest.raises(TypeError, match="scores_of"):
        LayerDynamicLRP(model, model.body).attribute(x, target=0)
    assert not model.body._forward_hooks


def test_hf_model_output_with_layer_dynamiclrp(bert):
    model, tokenizer = bert
    ids = tokenizer(["the dog ran to the park"], return_tensors="pt")["input_ids"]
    lrp = LayerDynamicLRP(lambda i: scores_of(model(i)), model.bert.embeddings)
    attr, delta = lrp.attribute(ids, target=0, return_convergence_delta=True)
    assert attr.shape == (1, ids.shape[1], 16) and _finite(attr, delta)


# --------------------------------------------------------------------------------------
# Visualisation helpers.
# --------------------------------------------------------------------------------------


def test_visualization_helpers():
    attr = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    hwc = to_image_attr(attr)
    assert isinstance(hwc, np.ndarray) and hwc.shape == (5, 7, 3) and hwc.dtype == np.float64
    np.testing.assert_array_equal(hwc, attr[0].permute(1, 2, 0).numpy())
    assert to_image_attr(attr[0]).shape == (5, 7, 3) and to_image_attr(attr[0, 0]).shape == (5, 7, 1)
    with pytest.raises(ValueError, match="batch"):
        to_image_attr(torch.zeros(2, 3, 5, 7))
    image = to_image(torch.randn(3, 5, 7) * 4)
    assert image.min() == 0.0 and image.max() == 1.0
    inside = torch.rand(3, 5, 7)
    np.testing.assert_array_equal(to_image(inside), inside.permute(1, 2, 0).numpy())
    assert to_image(np.ones((3, 5, 7), dtype=np.float32)).shape == (5, 7, 3)

    rel = token_relevance(torch.ones(2, 4, 3))
    assert torch.equal(rel, torch.full((2, 4), 3.0))
    record = text_record(["a", "b", "c"], torch.tensor([[3.0, -4.0, 0.0]]), torch.tensor(0.7), 1, 0, 1, 0.25)
    torch.testing.assert_close(record.word_attributions, torch.tensor([0.6, -0.8, 0.0]))
    assert record.attr_score == pytest.approx(-1.0) and record.pred_prob == pytest.approx(0.7)
    assert record.convergence_score == 0.25 and record.raw_input_ids == ["a", "b", "c"]
    assert torch.equal(text_record(["a"], torch.zeros(1), 1.0, 0, 0, 0, 0.0).word_attributions, torch.zeros(1))
    with pytest.raises(ValueError, match="one relevance per token"):
        text_record(["a", "b"], torch.zeros(3), 1.0, 0, 0, 0, 0.0)


# --------------------------------------------------------------------------------------
# CUDA.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipelines(cnn, bert, snapshot):
    model, images, targets = cnn
    cpu = DynamicLRP(model).attribute(images, target=targets)
    gpu_model, gpu_images = SmallCNN().eval(), images.cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    before = snapshot(gpu_model)
    out = image_pipeline(DynamicLRP, gpu_model, gpu_images, targets)
    before.assert_unchanged(gpu_model)
    assert out["attr"].device.type == "cuda" and out["nt"].device.type == "cuda"
    assert _finite(out["attr"], out["nt"], out["infidelity"], out["sensitivity"])
    torch.testing.assert_close(out["attr"].cpu(), cpu, atol=1e-4, rtol=1e-3)

    bert_model, tokenizer = bert
    ids = tokenizer(["the cat sat"], return_tensors="pt")["input_ids"]
    cpu_layer = LayerDynamicLRP(lambda i: bert_model(i).logits, bert_model.bert.embeddings).attribute(ids, target=1)
    bert_model.cuda()
    try:
        lrp = LayerDynamicLRP(lambda i: bert_model(i).logits, bert_model.bert.embeddings)
        gpu_layer = lrp.attribute(ids.cuda(), target=1)
    finally:
        bert_model.cpu()
    assert gpu_layer.device.type == "cuda"
    torch.testing.assert_close(gpu_layer.cpu(), cpu_layer, atol=1e-4, rtol=1e-3)
