"""Reading one dataset example: nested features ('captions/text'), caption lists, images.

Shared by the input pipeline and the dataset tools (builders, previews); numpy and PIL only, so
the tools do not import grain.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from flowtok_jax.errors import UserError


def pil_to_rgb_uint8(img) -> np.ndarray:
  """A PIL image -> uint8 [H, W, 3]. 16-bit and 32-bit integer greyscale (which PIL's
  convert('RGB') clips to 255) are scaled down to 8 bits first."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    arr = np.asarray(img).astype(np.int64)
    if arr.min() < 0 or arr.max() > 65535:
      raise ValueError(f"integer image values outside [0, 65535] (mode {img.mode})")
    if img.mode != "I" or arr.max() > 255:  # 16-bit data (mode I holding 8-bit values stays)
      arr = arr >> 8
    return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
  if img.mode == "F":
    raise ValueError("floating-point images are not supported")
  return np.asarray(img.convert("RGB"))


def to_rgb_uint8(value: Any) -> np.ndarray:
  """Turns a dataset image (decoded array or encoded PNG/JPEG bytes) into uint8 [H, W, 3]."""
  if isinstance(value, np.ndarray) and value.dtype == object:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    raw = bytes(value)
    with Image.open(io.BytesIO(raw)) as img:
      return pil_to_rgb_uint8(img)
  arr = np.asarray(value)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 2:
    arr = np.stack([arr] * 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
    raise ValueError(f"expected an image [H, W, 3], got shape {arr.shape}")
  if arr.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {arr.dtype}")
  return arr[..., :3]


def feature(element: dict[str, Any], key: str) -> Any:
  """`element[a][b]` for the key 'a/b': nested features (e.g. COCO's 'captions/text')."""
  value = element
  for i, part in enumerate(key.split("/")):
    if not isinstance(value, dict) or part not in value:
      where = "/".join(key.split("/")[:i]) or "the example"
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise UserError(f"dataset example has no feature {key!r} ({where} has: {have}); "
                      "set data.image_key / data.caption_key")
    value = value[part]
  return value


def text(value: Any) -> str:
  """A string feature as str (records hold UTF-8 bytes)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def captions_of(value: Any) -> list:
  """The captions a caption feature holds: [itself], or its sequence (COCO: about five)."""
  if isinstance(value, (str, bytes, np.bytes_, np.str_)):
    return [value]
  seq = list(np.ravel(value)) if isinstance(value, np.ndarray) else list(value)
  if not seq:
    raise UserError("an example has an empty list of captions")
  return seq


def pick_caption(value: Any, rng: np.random.Generator | None) -> Any:
  """One caption of a feature: itself, or one of a sequence of them (seeded; the first without rng).

  Datasets such as COCO store several captions per image; training sees a different one each
  epoch because the pipeline's per-element rng depends on the seed and the position in the stream.
  """
  seq = captions_of(value)
  return seq[0] if rng is None or len(seq) == 1 else seq[int(rng.integers(len(seq)))]
