"""Class names and the ``--target`` argument."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

from .errors import DemoError


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class descriptions in index order ("tabby, tabby cat", ...).

    They come from timm (``timm.data.ImageNetInfo``). When timm cannot be imported (it
    pulls torchvision), its two text files are read directly; without timm the names
    are ``"class 0"`` ... ``"class 999"``.
    """
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
        synsets_file, lemmas_file = folder / "imagenet_synsets.txt", folder / "imagenet_synset_to_lemma.txt"
        if synsets_file.exists() and lemmas_file.exists():
            synsets = synsets_file.read_text().split()
            lemmas = dict(line.split("\t", 1) for line in lemmas_file.read_text().splitlines() if "\t" in line)
            if len(synsets) == 1000:
                return [lemmas.get(s, s).strip() for s in synsets]
    return [f"class {i}" for i in range(1000)]


def short_label(description: str) -> str:
    """The first name of a comma-separated class description ("tabby, tabby cat" -> "tabby")."""
    return description.split(",")[0].strip()


def resolve_class(
    target: Optional[str], labels: Optional[Sequence[str]], num_classes: Optional[int] = None
) -> Optional[int]:
    """Turn ``--target`` into a class index.

    Accepts an index (``"281"``), a class name matched case-insensitively against
    ``labels`` (a whole description, or one of its comma-separated names), or None
    (the predicted class, decided by the caller). With ``num_classes`` None (unknown
    before a forward pass) the range is checked by the caller.

    Raises:
        DemoError: for an index out of range or a name that matches no class.
    """
    if target is None:
        return None
    text = target.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        num_classes = num_classes if num_classes is not None else (len(labels) if labels else None)
        if num_classes is not None and not 0 <= index < num_classes:
            raise DemoError(
                f"target {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return index
    if labels:
        wanted = text.lower()
        for index, label in enumerate(labels):
            names = [label.lower()] + [part.strip().lower() for part in label.split(",")]
            if wanted in names:
                return index
        close = [label for label in labels if wanted in label.lower()][:5]
        hint = f"; did you mean one of: {'; '.join(close)}" if close else ""
        raise DemoError(f"target {target!r} matches no class name of the model{hint}")
    raise DemoError(f"target {target!r} is not a class index, and the model has no class names")
