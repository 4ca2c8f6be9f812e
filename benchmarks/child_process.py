"""Helpers shared by the benchmark scripts: a measurement in a fresh child process, the device to run on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import argparse
from pathlib import Path
from typing import Mapping, Optional

REPO = Path(__file__).resolve().parents[1]


def run_child(script: str, spec: dict, python: str = sys.executable, env: Optional[Mapping[str, str]] = None) -> dict:
    """Run ``python script --child <spec as JSON>`` with the repository importable; return its last line as JSON.

    ``env`` adds variables to the child's environment (allocator settings, warning filters).
    """
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [python, str(Path(script).resolve()), "--child", json.dumps(spec)],
        env=child_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resolve_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``--device`` as given, with ``auto`` meaning CUDA where available; a parser error asking for absent CUDA."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here")
    return device
