"""Image -> normalised pixel tensor, as a checkpoint's ``preprocessor_config.json`` says.

Follows transformers' (PIL-based) image processors for the keys image classifiers use: resize
(``size`` as ``{"height", "width"}`` or ``{"shortest_edge"}``, ConvNeXt-style ``crop_pct``),
optional center crop (``crop_size``), rescale (``rescale_factor``, 1/255 by default) and
normalise (``image_mean``/``image_std``). The classifier must see pixels prepared exactly as in
training, so a key we do not implement is refused rather than ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageProcessor"]

# Keys that describe the processor but change nothing about the pixels.
_INERT_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class",
               "do_convert_rgb", "input_data_format", "data_format", "default_to_square",
               "_processor_class", "use_fast", "return_tensors", "device"}
_KNOWN_KEYS = {"do_resize", "size", "resample", "crop_pct", "do_center_crop", "crop_size",
               "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
               *_INERT_KEYS}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageProcessor:
    resize_to: tuple[int, int] | None = None  # (height, width), exact
    shortest_edge: int | None = None  # or: scale so the shorter side is this long
    crop_size: tuple[int, int] | None = None  # (height, width) center crop
    resample: int = Image.Resampling.BILINEAR
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = _IMAGENET_MEAN
    image_std: tuple[float, ...] | None = _IMAGENET_STD

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ImageProcessor:
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an image classifier needs its "
                                    "preprocessing (size, mean, std)")
        return cls.from_dict(json.loads(path.read_text()), str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "preprocessor config"
                  ) -> ImageProcessor:
        unknown = sorted(set(cfg) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(f"{source}: keys {unknown} are not supported; supported are "
                             f"{sorted(_KNOWN_KEYS - _INERT_KEYS)}")
        resize_to, shortest_edge, crop = _geometry(cfg, source)
        normalize = cfg.get("do_normalize", True)
        return cls(resize_to=resize_to, shortest_edge=shortest_edge, crop_size=crop,
                   resample=int(cfg.get("resample", Image.Resampling.BILINEAR)),
                   rescale_factor=(float(cfg.get("rescale_factor", 1 / 255))
                                   if cfg.get("do_rescale", True) else None),
                   image_mean=tuple(cfg.get("image_mean", _IMAGENET_MEAN)) if normalize else None,
                   image_std=tuple(cfg.get("image_std", _IMAGENET_STD)) if normalize else None)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) every processed image has, when the config fixes it."""
        return self.crop_size or self.resize_to

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> float32 [3, H, W]."""
        image = image.convert("RGB")
        image = self._resize(image)
        if self.crop_size is not None:
            image = _center_crop(image, self.crop_size)
        pixels = np.asarray(image, dtype=np.float32)
        if self.rescale_factor is not None:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.image_mean is not None and self.image_std is not None:
            pixels = (pixels - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(
                self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.resize_to is not None:
            height, width = self.resize_to
            return image.resize((width, height), resample=self.resample)
        if self.shortest_edge is None:
            return image
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize(size, resample=self.resample)


def _geometry(cfg: dict[str, Any], source: str
              ) -> tuple[tuple[int, int] | None, int | None, tuple[int, int] | None]:
    """(exact resize, shortest-edge resize, center crop) from size/crop_pct/crop_size."""
    size = cfg.get("size") if cfg.get("do_resize", True) else None
    if isinstance(size, int):
        size = {"height": size, "width": size}
    crop = _hw(cfg.get("crop_size")) if cfg.get("do_center_crop") else None
    if size is None:
        return None, None, crop
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"])), None, crop
    if set(size) != {"shortest_edge"}:
        raise ValueError(f"{source}: size={size!r} is not supported: allowed is "
                         "{'height', 'width'} or {'shortest_edge'}")
    edge = int(size["shortest_edge"])
    crop_pct = cfg.get("crop_pct")
    if crop_pct is not None and edge < 384:
        # ConvNeXt's processor (used by the ResNet checkpoints): resize to edge / crop_pct,
        # then crop the center edge x edge.
        return None, int(edge / crop_pct), (edge, edge)
    if crop_pct is not None:
        return (edge, edge), None, None  # ConvNeXt warps large sizes without cropping
    return None, edge, crop


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size["height"]), int(size["width"])


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    top, left = (image.height - height) // 2, (image.width - width) // 2
    # PIL pads with black where the crop reaches outside a small image, as transformers does.
    return image.crop((left, top, left + width, top + height))
