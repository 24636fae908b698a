"""A small self-contained HTML report: sample grids with their text, metrics, times, loss curves.

The page is `path`; its pictures are PNG files in `<stem>_files/` beside it (generated images at
their true pixel size, shown enlarged with `image-rendering: pixelated`, so anyone can check
the pixels), loss curves drawn with PIL (no plotting library).
"""
from __future__ import annotations

import html
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from flowtok_jax.errors import UserError

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
td.num { text-align: right; font-family: monospace; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 160px; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; background: #000; }
figcaption { font-size: 12px; }
.curves img { margin: 4px; border: 1px solid #ddd; }
"""


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as one level with '/'-joined keys."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def format_value(value: Any) -> str:
  """Numbers to 4 significant digits (ints as they are), NaN as 'n/a', the rest as str."""
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    v = float(value)
    if math.isnan(v):
      return "n/a"
    if math.isinf(v):
      return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"
  return str(value)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
  return [lo + (hi - lo) * i / count for i in range(count + 1)]


def draw_curve(points: Sequence[tuple[float, float]], title: str, out: str,
               width: int = 480, height: int = 260) -> str:
  """Draws one (step, value) curve as a PNG; a log y axis when the values span > 30x.

  Returns:
    `out`.
  """
  pts = [(float(s), float(v)) for s, v in points if math.isfinite(float(v))]
  image = PIL.Image.new("RGB", (width, height), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(image)
  font = PIL.ImageFont.load_default()
  left, right, top, bottom = 64, 12, 24, 30
  draw.text((left, 4), title, fill=(0, 0, 0), font=font)
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  if not pts:
    draw.text((left + 10, top + 10), "no finite values", fill=(160, 0, 0), font=font)
    image.save(out)
    return out
  xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
  log = bool(ys.min() > 0 and ys.max() / ys.min() > 30)
  yv = np.log10(ys) if log else ys
  x_lo, x_hi = float(xs.min()), float(xs.max())
  y_lo, y_hi = float(yv.min()), float(yv.max())
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  if y_hi == y_lo:
    y_lo, y_hi = y_lo - max(abs(y_lo) * 0.1, 1e-3), y_hi + max(abs(y_hi) * 0.1, 1e-3)
  pw, ph = width - left - right, height - top - bottom

  def px(x):
    return left + (x - x_lo) / (x_hi - x_lo) * pw

  def py(y):
    return top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

  for y in _nice_ticks(y_lo, y_hi):
    yy = py(y)
    draw.line([left, yy, width - right, yy], fill=(230, 230, 230))
    label = f"{10 ** y:.3g}" if log else f"{y:.3g}"
    draw.text((4, yy - 6), label, fill=(0, 0, 0), font=font)
  for x in _nice_ticks(x_lo, x_hi):
    draw.text((px(x) - 10, height - bottom + 4), f"{x:.0f}", fill=(0, 0, 0), font=font)
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  coords = [(px(x), py(y)) for x, y in zip(xs, yv)]
  if len(coords) > 1:
    draw.line(coords, fill=(30, 90, 200), width=2)
  else:
    (cx, cy), = coords
    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(30, 90, 200))
  draw.text((width - right - 150, height - bottom + 16),
            ("log y, " if log else "") + f"last {ys[-1]:.4g}", fill=(80, 80, 80), font=font)
  image.save(out)
  return out


def _shown(key: str, value: Any, flat: dict[str, Any]) -> str:
  """A value as the table shows it; a T2I accuracy whose split's `valid` flag is off (the
  parser failed its ground-truth check, DESIGN §7) is marked void, not shown bare."""
  text = format_value(value)
  head, _, leaf = key.rpartition("/")
  if leaf.startswith("accuracy") and head and not flat.get(f"{head}/valid", True):
    text = f"void ({text}: the parser misreads the ground truth)"
  return text


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
  body = "".join(f"<tr><td>{html.escape(k)}</td><td class=num>{html.escape(v)}</td></tr>"
                 for k, v in rows)
  return (f"<table><tr><th>{html.escape(head[0])}</th><th>{html.escape(head[1])}</th></tr>"
          f"{body}</table>")


def write_report(path: str, metrics: dict[str, Any],
                 grids: Sequence[tuple[str, Any, Sequence[str]]] = (),
                 stage_times: dict[str, float] | None = None,
                 loss_curves: dict[str, Sequence[tuple[float, float]]] | None = None,
                 title: str = "flowtok report") -> str:
  """Writes the HTML report and its PNGs.

  Args:
    path: the HTML file to write (its PNGs go to `<stem>_files/` beside it).
    metrics: name -> value (nested dicts are flattened with '/').
    grids: (title, images uint8 [N, H, W, 3], N texts shown under the images: the prompts of
      generated images, or the captions of captioned images).
    stage_times: stage name -> seconds.
    loss_curves: curve name -> [(step, value), ...].
    title: page heading.
  Returns:
    `path`.
  """
  stage_times = stage_times or {}
  loss_curves = loss_curves or {}
  out_dir = os.path.dirname(os.path.abspath(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  asset_name = f"{stem}_files"
  assets = os.path.join(out_dir, asset_name)
  os.makedirs(assets, exist_ok=True)
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]

  flat = flatten(metrics)
  if flat:
    parts.append("<h2>Metrics</h2>")
    parts.append(_table([(k, _shown(k, v, flat)) for k, v in flat.items()], ("metric", "value")))

  if stage_times:
    rows = [(k, f"{float(v):.1f}") for k, v in stage_times.items()]
    rows.append(("total", f"{sum(float(v) for v in stage_times.values()):.1f}"))
    parts.append("<h2>Time per stage</h2>")
    parts.append(_table(rows, ("stage", "seconds")))

  for g, (grid_title, images, texts) in enumerate(grids):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f"report grid {grid_title!r}: expected images [N, H, W, 3], got "
                      f"{images.shape}")
    if len(texts) != len(images):
      raise UserError(f"report grid {grid_title!r}: {len(images)} images but {len(texts)} texts")
    if images.dtype != np.uint8:
      images = (np.clip(images.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    parts.append(f"<h2>{html.escape(grid_title)}</h2><div class=grid>")
    for i, (image, text) in enumerate(zip(images, texts)):
      name = f"grid{g}_{_slug(grid_title)[:40]}_{i:03d}.png"
      PIL.Image.fromarray(image).save(os.path.join(assets, name))
      parts.append(f"<figure><img src='{asset_name}/{name}' alt='{html.escape(text)}'>"
                   f"<figcaption>{html.escape(text)}</figcaption></figure>")
    parts.append("</div>")

  if loss_curves:
    parts.append("<h2>Loss curves</h2><div class=curves>")
    for c, (name, points) in enumerate(loss_curves.items()):
      file = f"curve{c}_{_slug(name)[:40]}.png"
      draw_curve(points, name, os.path.join(assets, file))
      parts.append(f"<img src='{asset_name}/{file}' alt='{html.escape(name)}'>")
    parts.append("</div>")

  parts.append("</body></html>\n")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(parts))
  return path
