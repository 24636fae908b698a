"""LPIPS (Zhang et al. 2018; v0.1, VGG16 trunk) in Flax: the tokenizer's perceptual loss.

    --config.tokenizer_stage.perceptual=lpips --config.tokenizer_stage.perceptual_weight=1.1
    --config.tokenizer_stage.perceptual_path=vgg16-397923af.pth,vgg.pth

Weights from local files, never downloaded: torchvision's ImageNet VGG16 (`features.N.*`; the
classifier is ignored) and the `lpips` package's linear heads (`lpips/weights/v0.1/vgg.pth`,
`linK.model.1.weight`), or one `lpips.LPIPS(net='vgg').state_dict()` (`net.sliceK.N.*`); each
as .pth (needs torch), .npz or .safetensors. The computation, as the `lpips` package's:
images in [0, 1] -> [-1, 1] -> (x - shift) / scale per channel; VGG16's relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3; each unit-normalised over channels (eps 1e-10 on the norm); the
squared difference weighted by a non-negative 1x1 head per layer, averaged over space, summed
over layers. Parity with the package: tests/models/test_lpips.py (a stored fixture).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError

# torchvision's vgg16.features: conv index -> output channels ('M': 2x2 max pool).
_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # features index of the ReLUs LPIPS reads: relu1_2 ... relu5_3.
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
  """Perceptual distance of image pairs [B, H, W, 3] in [0, 1] -> [B] (0 for equal images)."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x, y):
    b = x.shape[0]
    z = jnp.concatenate([x, y]).astype(jnp.float32) * 2.0 - 1.0  # One trunk pass for both.
    z = (z - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps, i = [], 0
    for layer in _LAYERS:
      if layer == "M":
        z = nn.max_pool(z, (2, 2), (2, 2))
        i += 1
        continue
      z = nn.Conv(layer, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision,
                  name=f"features_{i}")(z)
      z = nn.relu(z)  # features index i + 1.
      if i + 1 in TAPS:
        taps.append(z)
      i += 2
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(taps):
      f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)
      d = jnp.square(f[:b] - f[b:])
      w = nn.Conv(1, (1, 1), use_bias=False, precision=self.precision, name=f"lin{k}")(d)
      total = total + w.mean(axis=(1, 2, 3))
    return total


def abstract_params() -> dict:
  return jax.eval_shape(LPIPS().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                        jnp.zeros((1, 32, 32, 3)))["params"]


_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")
_LINS = re.compile(r"^lins\.(\d)\.model\.1\.weight$")


def params_from_state_dict(sd: Mapping[str, np.ndarray], src_name: str = "state dict") -> dict:
  """Maps torchvision VGG16 + lpips heads (or one LPIPS state dict) onto `LPIPS`'s params.

  Conv weights OIHW -> HWIO. Ignored: torchvision's `classifier.*`, LPIPS's scaling buffers.
  Anything else missing, extra or mis-shaped is a UserError naming the key and both shapes.
  """
  named = {}
  for key, value in sd.items():
    m, alias = _SLICE.match(key), _LINS.match(key)
    if alias:  # The package's second name for the same head tensors.
      named.setdefault(f"lin{alias.group(1)}.model.1.weight", value)
    else:
      named[f"features.{m.group(1)}.{m.group(2)}" if m else key] = value
  out, used = {}, set()
  for module, leaves in abstract_params().items():
    for leaf, target in leaves.items():
      if module.startswith("features_"):
        key = f"features.{module.split('_')[1]}.{'weight' if leaf == 'kernel' else 'bias'}"
      else:
        key = f"{module}.model.1.weight"
      if key not in named:
        raise UserError(f"{src_name}: missing '{key}' (LPIPS needs torchvision's VGG16 and the "
                        "lpips package's vgg.pth heads)")
      arr = np.asarray(named[key], np.float32)
      if leaf == "kernel":
        arr = arr.transpose(2, 3, 1, 0)
      if arr.shape != tuple(target.shape):
        raise UserError(f"{src_name}: '{key}' has shape {tuple(np.shape(named[key]))}, expected "
                        f"{tuple(target.shape)} after OIHW -> HWIO")
      out.setdefault(module, {})[leaf] = arr
      used.add(key)
  extra = [k for k in named if k not in used and not k.startswith("classifier.")
           and k not in ("scaling_layer.shift", "scaling_layer.scale")]
  if extra:
    raise UserError(f"{src_name}: unexpected key '{extra[0]}' ({len(extra)} in all): not VGG16 "
                    "or LPIPS weights?")
  return out


def check_weight_files(files: Sequence[str]) -> list[str]:
  """The weight files, at least one (reading them is `load_params`'s)."""
  files = list(files)
  if not files:
    raise UserError("the lpips perceptual network needs weight files: torchvision's VGG16 and "
                    "the lpips package's vgg.pth heads (or one LPIPS state dict)")
  return files


def load_params(files: Sequence[str]) -> dict:
  """`LPIPS` params from state-dict files (their keys merged)."""
  from flowtok_jax.tools import convert  # pylint: disable=g-import-not-at-top
  sd = {}
  for f in check_weight_files(files):
    sd.update(convert.load_state_dict(f, "tokenizer_stage.perceptual_path"))
  return params_from_state_dict(sd, " + ".join(files))
