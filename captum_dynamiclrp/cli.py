"""The ``dynamiclrp`` command."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    """Placeholder demo: a small residual CNN with random weights, explained three ways."""
    import torch
    from captum.attr import InputXGradient
    from torch import nn

    from . import DynamicLRP

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
            self.norm = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.norm(self.conv(x)))

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Block(16), nn.MaxPool2d(2), Block(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    target = model(x).argmax(1)
    lrp = DynamicLRP(model)
    start = time.perf_counter()
    attr, delta = lrp.attribute(x, target=target, return_convergence_delta=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    lrp.attribute(x, target=target)
    cached = time.perf_counter() - start
    ixg = InputXGradient(model).attribute(x, target=target)
    cosine = torch.nn.functional.cosine_similarity(attr.flatten(1), ixg.flatten(1)).mean()
    print("DynamicLRP demo (placeholder model: residual CNN with random weights)")
    print(f"  attribution shape      {tuple(attr.shape)}")
    print(f"  conservation delta     {delta.abs().max().item():.3e} (max over the batch; biases absorb it)")
    print(f"  cosine to InputXGrad   {cosine.item():.4f}")
    print(f"  time first / cached    {first * 1e3:.1f} ms / {cached * 1e3:.1f} ms")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamiclrp", description="Layer-wise Relevance Propagation for any model.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain a model and print what DynamicLRP measured")
    demo.add_argument("--batch", type=int, default=4)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
