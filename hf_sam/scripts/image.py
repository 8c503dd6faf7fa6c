# Copyright 2026 The hf_sam contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Images for `recipes/run_image_classification.py`: finding the columns, checking that every image decodes, the image
processor's geometry (resize, centre crop) and normalisation, and the transforms, all in torch (no torchvision).
"""

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Image


logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
# CIFAR-10 channel statistics: the default normalisation of a model trained from scratch.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# PIL resampling filters (`image_processor.resample`) as `torch.nn.functional.interpolate` modes.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def find_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, split: str) -> str:
    """The column named `given`, or the first of `candidates` present; a `ValueError` naming the columns otherwise."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"The {split} data has no {what} column {given!r}; its columns are {columns}.")
        return given
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"The {split} data has no {what} column (looked for {list(candidates)}); its columns are {columns}. "
        f"Pass `--{what}_column_name`."
    )


def find_undecodable_images(dataset: Dataset, image_column: str, batch_size: int = 256) -> list[tuple[int, str, str]]:
    """
    The rows of `dataset` whose image does not decode, as `(row index, the image's file or "row N", the error)`.
    Each image is decoded in full (a truncated file fails too) and thrown away.
    """
    from PIL import Image as PILImage

    bad = []
    if isinstance(dataset.features[image_column], Image):
        encoded = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
        for start in range(0, len(encoded), batch_size):
            for offset, item in enumerate(encoded[start : start + batch_size][image_column]):
                source = item.get("path") or f"row {start + offset}"
                try:
                    with PILImage.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                        image.load()
                except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... for a bad file
                    bad.append((start + offset, source, f"{type(error).__name__}: {error}"))
        return bad
    for index in range(len(dataset)):
        try:
            to_tensor(dataset[index][image_column])
        except Exception as error:
            bad.append((index, f"row {index}", f"{type(error).__name__}: {error}"))
    return bad


def drop_undecodable_images(dataset: Dataset, image_column: str, split: str, skip: bool) -> Dataset:
    """
    `dataset` after checking that every image decodes. An image that does not raises a `ValueError` naming the rows
    and files, unless `skip`: then those rows are dropped, and counted in a warning.
    """
    bad = find_undecodable_images(dataset, image_column)
    if not bad:
        return dataset
    listed = "; ".join(f"row {index} ({source}): {error}" for index, source, error in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    if not skip:
        raise ValueError(
            f"{len(bad)} of the {len(dataset)} {split} images do not decode: {listed}{more}. Fix or remove them, or "
            "pass `--skip_corrupt_images` to train without them."
        )
    logger.warning(f"Skipping {len(bad)} of the {len(dataset)} {split} images, which do not decode: {listed}{more}.")
    bad_rows = {index for index, _, _ in bad}
    return dataset.select([index for index in range(len(dataset)) if index not in bad_rows])


@dataclass(frozen=True)
class ProcessorGeometry:
    """
    What an image processor does to an image, in order: resize, centre crop, normalise.

    `resize`: `(height, width)` to resize to, or an int, the length the shortest edge is resized to (keeping the aspect
    ratio), or `None` (no resize). `crop`: the `(height, width)` of the centre crop after it, or `None`. `mode`: the
    `torch.nn.functional.interpolate` mode of the processor's resampling filter. `mean`, `std`: per channel, applied to
    pixels in [0, 1].
    """

    resize: tuple[int, int] | int | None
    crop: tuple[int, int] | None
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop a (3, H, W) float tensor as the processor does (normalisation not included)."""
        if self.resize is not None:
            pixels = resize(pixels, self._resize_to(*pixels.shape[-2:]), self.mode)
        if self.crop is not None:
            pixels = center_crop(pixels, self.crop)
        return pixels

    def _resize_to(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.resize, int):
            return self.resize
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)  # as transformers' image_transforms
        return (new_short, new_long) if height <= width else (new_long, new_short)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (height, width) of every image after `__call__`, or `None` when it depends on the image."""
        if self.crop is not None:
            return self.crop
        return None if self.resize is None or isinstance(self.resize, int) else self.resize


def processor_geometry(image_processor) -> ProcessorGeometry:
    """
    The geometry of a transformers image processor, from its configuration: `size` as `height`/`width` (resize to
    that), or as `shortest_edge` (resize the shortest edge, then centre-crop to `crop_size` when `do_center_crop`;
    ConvNeXt's `crop_pct`: resize to `shortest_edge / crop_pct` and crop a `shortest_edge` square below 384). A
    `shortest_edge` with no crop is centre-cropped to a square, as transformers' example does, so that batches stack.
    """

    def read(value, key):
        if value is None:
            return None
        return value.get(key) if isinstance(value, dict) else getattr(value, key, None)

    size = getattr(image_processor, "size", None)
    crop_size = getattr(image_processor, "crop_size", None)
    crop = None
    if getattr(image_processor, "do_center_crop", False) and read(crop_size, "height") is not None:
        crop = (int(read(crop_size, "height")), int(read(crop_size, "width")))
    if not getattr(image_processor, "do_resize", True):
        resize_to = None
    elif read(size, "height") is not None and read(size, "width") is not None:
        resize_to = (int(read(size, "height")), int(read(size, "width")))
    elif read(size, "shortest_edge") is not None:
        edge = int(read(size, "shortest_edge"))
        crop_pct = getattr(image_processor, "crop_pct", None)
        if crop_pct is not None and edge >= 384:
            resize_to = (edge, edge)  # ConvNeXt warps at 384 and above
        else:
            resize_to = int(edge / crop_pct) if crop_pct is not None else edge
            crop = crop or (edge, edge)
    else:
        raise ValueError(f"Cannot read an output size from the image processor's `size` {size!r}.")
    mean = tuple(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5))
    if not getattr(image_processor, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mode = _RESAMPLE_MODES.get(int(getattr(image_processor, "resample", 2) or 2), "bilinear")
    return ProcessorGeometry(resize=resize_to, crop=crop, mode=mode, mean=mean, std=std)


def build_image_processor(image_size: int):
    """The image processor of a model trained from scratch: resize to `image_size`, CIFAR-10 mean and std."""
    try:
        from transformers import ViTImageProcessorPil as processor_class  # no torchvision needed
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    return processor_class(
        size={"height": image_size, "width": image_size}, image_mean=list(CIFAR10_MEAN), image_std=list(CIFAR10_STD)
    )


def to_tensor(image) -> torch.Tensor:
    """A PIL image (or array) as a float (3, H, W) tensor in [0, 1]."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def resize(pixels: torch.Tensor, hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """A (3, H, W) tensor resized to `hw` (antialiased when shrinking with a bilinear or bicubic filter)."""
    if tuple(pixels.shape[-2:]) == tuple(hw):
        return pixels
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(pixels[None], size=hw, mode=mode, align_corners=False if smooth else None, antialias=smooth)[0]
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def center_crop(pixels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The centre `hw` window of a (3, H, W) tensor, zero-padded first where the image is smaller (as transformers)."""
    height, width = pixels.shape[-2:]
    crop_h, crop_w = hw
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        pixels = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
        height, width = pixels.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]


def random_crop_with_padding(pixels: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding` pixels on every side, then crop a random window of the original size."""
    if padding == 0:
        return pixels
    height, width = pixels.shape[-2:]
    padded = F.pad(pixels, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    return padded[:, top : top + height, left : left + width]


def make_transforms(
    image_processor, image_column: str, label_to_id: Callable, *, padding: int, flip: bool
) -> tuple[Callable[[dict], dict], Callable[[dict], dict]]:
    """
    The `with_transform` functions of the training data (the processor's geometry, then a random crop with
    `padding` and a random horizontal flip, then normalisation) and of the evaluation data (geometry and
    normalisation). Each maps a batch with `image_column` and `__label__` to `pixel_values` and `labels`.
    """
    geometry = processor_geometry(image_processor)
    mean, std = torch.tensor(geometry.mean).view(3, 1, 1), torch.tensor(geometry.std).view(3, 1, 1)

    def convert(batch, train: bool) -> dict:
        pixel_values = []
        for image in batch[image_column]:
            pixels = geometry(to_tensor(image))
            if train:
                pixels = random_crop_with_padding(pixels, padding)
                if flip and torch.rand(()) < 0.5:
                    pixels = pixels.flip(-1)
            pixel_values.append((pixels - mean) / std)
        return {"pixel_values": pixel_values, "labels": [label_to_id(label) for label in batch["__label__"]]}

    return (lambda batch: convert(batch, True)), (lambda batch: convert(batch, False))


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the examples' `pixel_values` and `labels` into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }
