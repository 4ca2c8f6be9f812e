"""Photos and image files: reading, centre crop and the input normalisations of common classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .errors import DemoError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Real photos that install with scikit-image (and one with matplotlib), in the order the demo uses them.
# The comment is what EfficientNet-Lite0 sees in each.
DEMO_PHOTOS = (
    "chelsea",  # a tabby cat
    "coffee",  # a cup of espresso
    "rocket",  # a rocket on its launch pad
    "camera",  # a photographer with a camera on a tripod (greyscale)
    "motorcycle",  # a motorcycle (left view of scikit-image's stereo pair)
    "astronaut",  # Eileen Collins in her spacesuit
    "grace_hopper",  # Grace Hopper in uniform (matplotlib's sample data)
)


def demo_photo(name: str) -> np.ndarray:
    """One of :data:`DEMO_PHOTOS` as an ``H x W x 3`` uint8 RGB array."""
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            return as_rgb_uint8(np.asarray(Image.open(handle).convert("RGB")))
    try:
        import skimage.data
    except ImportError as err:
        raise DemoError("the demo photos come with scikit-image: pip install scikit-image") from err
    if name == "motorcycle":
        return as_rgb_uint8(skimage.data.stereo_motorcycle()[0])
    if name not in DEMO_PHOTOS:
        raise DemoError(f"unknown demo photo {name!r}; choose from {', '.join(DEMO_PHOTOS)}")
    return as_rgb_uint8(getattr(skimage.data, name)())


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Greyscale, RGBA or float images to ``H x W x 3`` uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        scale = 255.0 if image.max() <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def image_files(path: str | Path) -> list[Path]:
    """The image at ``path``, or every image file (by suffix) in the folder ``path``, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DemoError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
        return files
    if not path.exists():
        raise DemoError(f"image not found: {path}")
    return [path]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return as_rgb_uint8(np.asarray(image.convert("RGB")))
    except FileNotFoundError:
        raise DemoError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DemoError(f"cannot read {path} as an image: {err}") from None


def center_crop(image: np.ndarray, size: int = 224, resize: int | None = 256) -> np.ndarray:
    """Resize the short side to ``resize`` (bilinear), then cut the central ``size x size`` square."""
    from PIL import Image

    picture = Image.fromarray(as_rgb_uint8(image))
    short = resize or size
    width, height = picture.size
    scale = short / min(width, height)
    picture = picture.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    width, height = picture.size
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)))


def _pixels(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


def efficientnet_lite_input(image: np.ndarray) -> Tensor:
    """EfficientNet-Lite's normalisation: ``(pixel - 127) / 128`` (1 x 3 x H x W)."""
    return (_pixels(image) - 127.0) / 128.0


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_input(image: np.ndarray) -> Tensor:
    """torchvision's ImageNet normalisation: ``(pixel / 255 - mean) / std`` (1 x 3 x H x W)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (_pixels(image) / 255.0 - mean) / std


def unit_input(image: np.ndarray) -> Tensor:
    """Pixels scaled to [0, 1] (1 x 3 x H x W)."""
    return _pixels(image) / 255.0


PREPROCESSING: dict[str, Callable[[np.ndarray], Tensor]] = {
    "imagenet": imagenet_input,
    "efficientnet-lite": efficientnet_lite_input,
    "unit": unit_input,
}
