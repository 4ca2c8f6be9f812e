"""A zoo of small, randomly initialised architectures for checking DynamicLRP's op coverage.

Every entry of :data:`ZOO` is a zero-argument builder returning a :class:`ZooCase`:

* ``model``: the ``nn.Module`` (eval mode, float32, random weights, built from a config);
* ``inputs``: a tuple of float tensors, batch 2, to attribute (pixels, waveforms, log-mel
  features, or ``inputs_embeds`` taken from the model's own embedding layer, detached);
* ``forward``: a callable (an ``nn.Module`` wrapper) with ``forward(*inputs)`` returning float
  scores of shape ``(2, classes)``: class logits, or the logits of the last position for
  language models and decoders. Fixed side inputs (decoder ids, masks, spatial shapes) are
  buffers of the wrapper;
* ``target``: a class index valid for ``forward``'s output;
* ``description``: one line on what the case is.

Hugging Face models with a choice of attention kernel come twice, ``<name>-eager`` and
``<name>-sdpa``. Nothing is downloaded: every model is built from a tiny config and seeded with
``torch.manual_seed(0)``, so each forward runs well under a second on a small CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

BATCH = 2
SEQ = 8
VOCAB = 128


@dataclass
class ZooCase:
    """One model of the zoo, ready to explain."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    forward: Callable[..., Tensor]
    target: int
    description: str


# --------------------------------------------------------------------------------------------
# Forward wrappers: each returns a 2-D float tensor of scores (batch, classes).
# --------------------------------------------------------------------------------------------


class Logits(nn.Module):
    """``model(x).logits`` for models that already return (batch, classes)."""

    def __init__(self, model: nn.Module, keyword: str) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, x: Tensor) -> Tensor:
        return self.model(**{self.keyword: x}).logits


class LastTokenLogits(nn.Module):
    """Logits of the last position of a causal LM fed with ``inputs_embeds``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        out = self.model(inputs_embeds=inputs_embeds, use_cache=False)
        return out.logits[:, -1, :]


class Seq2SeqLastLogits(nn.Module):
    """Logits of the last decoder position of an encoder-decoder, with fixed decoder ids."""

    def __init__(self, model: nn.Module, keyword: str, decoder_input_ids: Tensor) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword
        self.register_buffer("decoder_input_ids", decoder_input_ids)

    def forward(self, x: Tensor) -> Tensor:
        # Every example gets the same fixed decoder ids, so an example alone sees exactly
        # what it sees inside the batch.
        decoder_ids = self.decoder_input_ids[:1].expand(x.shape[0], -1)
        out = self.model(**{self.keyword: x}, decoder_input_ids=decoder_ids, use_cache=False)
        return out.logits[:, -1, :]


class PooledHead(nn.Module):
    """A vision tower's pooled output through a small linear classifier."""

    def __init__(self, tower: nn.Module, hidden: int, classes: int, **fixed: Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(hidden, classes)
        self.fixed_names = tuple(fixed)
        for name, value in fixed.items():
            self.register_buffer(name, value)

    def forward(self, pixel_values: Tensor) -> Tensor:
        batch = pixel_values.shape[0]  # the same fixed inputs for every example
        fixed = {}
        for name in self.fixed_names:
            value = getattr(self, name)[:1]
            fixed[name] = value.expand(batch, *value.shape[1:])
        out = self.tower(pixel_values=pixel_values, **fixed)
        return self.head(out.pooler_output)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _finish(model: nn.Module, forward: nn.Module, inputs: tuple[Tensor, ...], target: int, description: str) -> ZooCase:
    model.float().eval()
    forward.float().eval()
    return ZooCase(model=model, inputs=tuple(x.detach() for x in inputs), forward=forward, target=target,
                   description=description)


def _hf(cls, config, impl: Optional[str]) -> nn.Module:
    torch.manual_seed(0)
    if impl is None:
        model = cls(config)
    else:
        model = cls._from_config(config, attn_implementation=impl)
        assert model.config._attn_implementation == impl, (cls.__name__, model.config._attn_implementation)
    return model.float().eval()


def _ids(vocab: int = VOCAB, seq: int = SEQ, low: int = 3) -> Tensor:
    return torch.randint(low, vocab, (BATCH, seq))


def _embeds(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids).detach().float()


# --------------------------------------------------------------------------------------------
# torchvision CNNs and ViT
# --------------------------------------------------------------------------------------------


def vgg16() -> ZooCase:
    from torchvision.models.vgg import VGG, cfgs, make_layers

    torch.manual_seed(0)
    # torchvision's VGG16 (configuration "D": 13 convs, 5 max-pools, adaptive pool to 7x7) with the
    # classifier's layout kept (Linear-ReLU-Dropout x2, Linear) but 64 instead of 4096 hidden units.
    # The full-size classifier is only ever allocated on the meta device, so building is fast.
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    model.features = make_layers(cfgs["D"], batch_norm=False)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
        nn.Linear(64, 10),
    )
    for m in model.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    assert not any(p.is_meta for p in model.parameters())
    x = torch.randn(BATCH, 3, 32, 32)
    return _finish(model, model, (x,), 3,
                   "torchvision VGG16 features, adaptive pool to 7x7, classifier 25088-64-64-10, 32x32")


def resnet50() -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(BATCH, 3, 64, 64)
    return _finish(model, model, (x,), 3, "torchvision ResNet-50, 10 classes, 64x64")


def efficientnet_v2() -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(num_classes=10)
    x = torch.randn(BATCH, 3, 64, 64)
    return _finish(model, model, (x,), 3, "torchvision EfficientNetV2-S, 10 classes, 64x64")


def vit_torchvision() -> ZooCase:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=10)
    # torchvision zero-initialises the classification head, which would make every score 0.
    nn.init.normal_(model.heads.head.weight, std=0.2)
    nn.init.normal_(model.heads.head.bias, std=0.02)
    x = torch.randn(BATCH, 3, 32, 32)
    return _finish(model, model, (x,), 3, "torchvision VisionTransformer (ViT-B/16 layout: patch 16), 2 layers, "
                   "hidden 32, 32x32 (nn.MultiheadAttention)")


def vit_hf(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=10)
        model = _hf(ViTForImageClassification, config, impl)
        x = torch.randn(BATCH, 3, 32, 32)
        return _finish(model, Logits(model, "pixel_values"), (x,), 3,
                       f"HF ViTForImageClassification (ViT-B/16 layout), 2 layers, hidden 32, 32x32, {impl}")

    return build


# --------------------------------------------------------------------------------------------
# SigLIP-2 vision tower
# --------------------------------------------------------------------------------------------


def siglip2(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        patch, grid, channels = 4, 4, 3
        config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_channels=channels, num_patches=16,
                                     patch_size=patch)
        tower = _hf(Siglip2VisionModel, config, impl)
        n = grid * grid
        pixel_values = torch.randn(BATCH, n, channels * patch * patch)
        mask = torch.ones(BATCH, n, dtype=torch.long)
        shapes = torch.tensor([[grid, grid]] * BATCH, dtype=torch.long)
        torch.manual_seed(1)
        forward = PooledHead(tower, 32, 10, pixel_attention_mask=mask, spatial_shapes=shapes)
        return _finish(tower, forward, (pixel_values,), 3,
                       f"HF Siglip2VisionModel (patchified 16x16 image, 4x4 patches), pooled -> linear head, {impl}")

    return build


def siglip(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_channels=3, image_size=32, patch_size=8)
        tower = _hf(SiglipVisionModel, config, impl)
        x = torch.randn(BATCH, 3, 32, 32)
        torch.manual_seed(1)
        forward = PooledHead(tower, 32, 10)
        return _finish(tower, forward, (x,), 3,
                       f"HF SiglipVisionModel (SigLIP-1 tower, conv patches, 32x32), pooled -> linear head, {impl}")

    return build


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def wav2vec2(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

        config = Wav2Vec2Config(
            vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), feat_extract_norm="group",
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=4,
            classifier_proj_size=16, mask_time_prob=0.0, layerdrop=0.0,
        )
        model = _hf(Wav2Vec2ForSequenceClassification, config, impl)
        waveform = torch.randn(BATCH, 1600)
        return _finish(model, Logits(model, "input_values"), (waveform,), 1,
                       f"HF Wav2Vec2ForSequenceClassification (weight-norm positional conv), 1600 samples, {impl}")

    return build


def whisper(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        config = WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
        )
        model = _hf(WhisperForConditionalGeneration, config, impl)
        features = torch.randn(BATCH, 16, 32)  # (batch, mel bins, 2 * max_source_positions)
        decoder_ids = torch.cat([torch.ones(BATCH, 1, dtype=torch.long), _ids(seq=3)], dim=1)
        forward = Seq2SeqLastLogits(model, "input_features", decoder_ids)
        return _finish(model, forward, (features,), 5,
                       f"HF WhisperForConditionalGeneration, log-mel features (16 bins x 32 frames), "
                       f"4 fixed decoder ids, {impl}")

    return build


# --------------------------------------------------------------------------------------------
# Text: encoders, decoders, encoder-decoders, SSM
# --------------------------------------------------------------------------------------------


def gpt2(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
        model = _hf(GPT2LMHeadModel, config, impl)
        x = _embeds(model, _ids())
        return _finish(model, LastTokenLogits(model), (x,), 5, f"HF GPT2LMHeadModel, last-position logits, {impl}")

    return build


def roberta(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import RobertaConfig, RobertaForSequenceClassification

        config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=1)
        model = _hf(RobertaForSequenceClassification, config, impl)
        x = _embeds(model, _ids())
        return _finish(model, Logits(model, "inputs_embeds"), (x,), 2,
                       f"HF RobertaForSequenceClassification, 3 labels, {impl}")

    return build


def llama32(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=131072, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
        model = _hf(LlamaForCausalLM, config, impl)
        x = _embeds(model, _ids())
        return _finish(model, LastTokenLogits(model), (x,), 5,
                       f"HF LlamaForCausalLM, Llama-3.2-like (GQA 4/2, llama3 RoPE, tied embeddings), {impl}")

    return build


def gemma3(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
        )
        model = _hf(Gemma3ForCausalLM, config, impl)
        x = _embeds(model, _ids())  # the scaled embedding (includes the sqrt(hidden) factor)
        return _finish(model, LastTokenLogits(model), (x,), 5,
                       f"HF Gemma3ForCausalLM text-only (sliding + full layer, QK norm), {impl}")

    return build


def qwen3(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                             tie_word_embeddings=True)
        model = _hf(Qwen3ForCausalLM, config, impl)
        x = _embeds(model, _ids())
        return _finish(model, LastTokenLogits(model), (x,), 5, f"HF Qwen3ForCausalLM (GQA, QK RMS norm), {impl}")

    return build


def flan_t5(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = _hf(T5ForConditionalGeneration, config, impl)
        x = _embeds(model, _ids())
        decoder_ids = torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), _ids(seq=3)], dim=1)
        forward = Seq2SeqLastLogits(model, "inputs_embeds", decoder_ids)
        return _finish(model, forward, (x,), 5,
                       f"HF T5ForConditionalGeneration, Flan-T5 style (gated-gelu, untied head), "
                       f"encoder inputs_embeds, 4 fixed decoder ids, {impl}")

    return build


def pix2struct(impl: str) -> Callable[[], ZooCase]:
    def build() -> ZooCase:
        from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

        patch, grid, channels = 4, 4, 3
        config = Pix2StructConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, relative_attention_max_distance=16),
            vision_config=dict(hidden_size=32, patch_embed_hidden_size=channels * patch * patch, d_ff=64, d_kv=8,
                               num_hidden_layers=2, num_attention_heads=4, seq_len=16,
                               relative_attention_num_buckets=8, relative_attention_max_distance=16),
        )
        model = _hf(Pix2StructForConditionalGeneration, config, impl)
        n = grid * grid
        rows = torch.arange(n) // grid + 1  # 1-based row / column ids, as the processor writes them
        cols = torch.arange(n) % grid + 1
        ids = torch.stack([rows, cols], dim=-1).float().expand(BATCH, n, 2)
        patches = torch.randn(BATCH, n, channels * patch * patch)
        flattened = torch.cat([ids, patches], dim=-1)
        decoder_ids = torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), _ids(seq=3)], dim=1)
        forward = Seq2SeqLastLogits(model, "flattened_patches", decoder_ids)
        return _finish(model, forward, (flattened,), 5,
                       f"HF Pix2StructForConditionalGeneration (DePlot layout), 16 flattened 4x4 patches "
                       f"(+ row/col ids), 4 fixed decoder ids, {impl}")

    return build


def mamba() -> ZooCase:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, use_mambapy=False)
    model = _hf(MambaForCausalLM, config, None)
    x = _embeds(model, _ids())
    return _finish(model, LastTokenLogits(model), (x,), 5,
                   "HF MambaForCausalLM, pure-PyTorch slow path (no CUDA kernels), last-position logits")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _seeded(build: Callable[[], ZooCase]) -> Callable[[], ZooCase]:
    def run() -> ZooCase:
        torch.manual_seed(0)
        return build()

    run.__name__ = getattr(build, "__name__", "build")
    return run


IMPLS = ("eager", "sdpa")

ZOO: dict[str, Callable[[], ZooCase]] = {
    "vgg16": _seeded(vgg16),
    "resnet50": _seeded(resnet50),
    "efficientnet_v2_s": _seeded(efficientnet_v2),
    "vit_b16-torchvision": _seeded(vit_torchvision),
    **{f"vit-{i}": _seeded(vit_hf(i)) for i in IMPLS},
    **{f"siglip2-{i}": _seeded(siglip2(i)) for i in IMPLS},
    **{f"siglip-{i}": _seeded(siglip(i)) for i in IMPLS},
    **{f"wav2vec2-{i}": _seeded(wav2vec2(i)) for i in IMPLS},
    **{f"whisper-{i}": _seeded(whisper(i)) for i in IMPLS},
    **{f"gpt2-{i}": _seeded(gpt2(i)) for i in IMPLS},
    **{f"roberta-{i}": _seeded(roberta(i)) for i in IMPLS},
    **{f"llama3.2-{i}": _seeded(llama32(i)) for i in IMPLS},
    **{f"gemma3-{i}": _seeded(gemma3(i)) for i in IMPLS},
    **{f"qwen3-{i}": _seeded(qwen3(i)) for i in IMPLS},
    **{f"flan_t5-{i}": _seeded(flan_t5(i)) for i in IMPLS},
    **{f"pix2struct-{i}": _seeded(pix2struct(i)) for i in IMPLS},
    "mamba": _seeded(mamba),
}

# The 15 architectures the zoo covers, each with the registry keys that build it.
ARCHITECTURES: dict[str, tuple[str, ...]] = {}
for _key in ZOO:
    _arch = _key.split("-")[0]
    ARCHITECTURES.setdefault(_arch, ())
    ARCHITECTURES[_arch] = ARCHITECTURES[_arch] + (_key,)
ARCHITECTURES["vit_b16"] = ARCHITECTURES.pop("vit_b16") + ARCHITECTURES.pop("vit")
# The SigLIP-1 tower (conv patch embedding, fixed position table) sits beside the SigLIP-2 one (patchified
# input, bilinearly resized position table) under the same architecture.
ARCHITECTURES["siglip2"] = ARCHITECTURES["siglip2"] + ARCHITECTURES.pop("siglip")

__all__ = ["ARCHITECTURES", "BATCH", "ZOO", "ZooCase"]
