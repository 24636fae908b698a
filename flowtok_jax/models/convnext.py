"""ConvNeXt-S (Liu et al. 2022; torchvision's `convnext_small`) in Flax: the second network of the
reference tokenizer's perceptual loss.

    --config.tokenizer_stage.perceptual=lpips-convnext_s-1.0-0.1
    --config.tokenizer_stage.perceptual_weight=1.1
    --config.tokenizer_stage.perceptual_path=lpips=VGG16,lpips=HEADS,convnext_s=CONVNEXT

The term (`logit_mse`), as the reference computes it: both images, RGB in [0, 1], resized to
224 x 224 by bilinear interpolation *with antialiasing* (torch's `interpolate(...,
antialias=True, align_corners=False)`; exact, as two matrices), normalised by ImageNet's mean and
std, through the classifier to its 1000 logits; the loss is the mean squared difference of the
logits over batch and classes. Weights from torchvision's ImageNet state dict (a local file,
never downloaded: .pth needs torch; .npz or .safetensors do not). Parity with torchvision:
tests/models/test_convnext.py (a stored fixture).

The network: a 4x4 stride-4 stem and a LayerNorm; four stages of ConvNeXt blocks (depths 3, 3,
27, 3; widths 96, 192, 384, 768) with a LayerNorm and a 2x2 stride-2 convolution between them;
each block: 7x7 depthwise convolution, LayerNorm, Linear to 4x, exact GELU, Linear back, times a
per-channel layer scale, plus the input (stochastic depth is off in inference). Every LayerNorm
has eps 1e-6 and the two-pass variance. Head: global average pool, LayerNorm, Linear.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers

INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SMALL = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))


def _norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class Block(nn.Module):
  """One ConvNeXt block on NHWC features (torchvision's `CNBlock`; `block_K` = its `block.K`)."""
  dim: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                precision=p, name="block_0")(x)
    y = _norm("block_2")(y)
    y = nn.Dense(4 * self.dim, precision=p, name="block_3")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.dim, precision=p, name="block_5")(y)
    gamma = self.param("layer_scale", nn.initializers.constant(1e-6), (self.dim,))
    return x + gamma * y


class ConvNeXt(nn.Module):
  """Normalised images [B, H, W, 3] -> logits [B, num_classes]; module names follow torchvision's
  `features.I.J` / `classifier.I` paths with dots as underscores."""
  depths: Sequence[int] = SMALL["depths"]
  dims: Sequence[int] = SMALL["dims"]
  num_classes: int = 1000
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = nn.Conv(self.dims[0], (4, 4), (4, 4), padding="VALID", precision=p,
                name="features_0_0")(x.astype(jnp.float32))
    x = _norm("features_0_1")(x)
    for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if s:  # Downsampling: features.(2s) = LayerNorm2d, 2x2 stride-2 conv.
        x = _norm(f"features_{2 * s}_0")(x)
        x = nn.Conv(dim, (2, 2), (2, 2), padding="VALID", precision=p,
                    name=f"features_{2 * s}_1")(x)
      for k in range(depth):
        x = Block(dim, p, name=f"features_{2 * s + 1}_{k}")(x)
    x = _norm("classifier_0")(x.mean(axis=(1, 2)))
    return nn.Dense(self.num_classes, precision=p, name="classifier_2")(x)


def prepare(images: jax.Array) -> jax.Array:
  """Images [B, H, W, 3] in [0, 1] -> [B, 224, 224, 3]: antialiased bilinear resize (torch's,
  exactly: a fixed matrix per axis, so gradients flow), then ImageNet normalisation."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    hi = jax.lax.Precision.HIGHEST
    rh = jnp.asarray(layers.bilinear_matrix(h, INPUT_SIZE, antialias=True), jnp.float32)
    rw = jnp.asarray(layers.bilinear_matrix(w, INPUT_SIZE, antialias=True), jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=hi)
    x = jnp.einsum("pw,bowc->bopc", rw, x, precision=hi)
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def logit_mse(net: ConvNeXt, params, x: jax.Array, y: jax.Array) -> jax.Array:
  """The reference's ConvNeXt term: mean over batch and classes of (logits(x) - logits(y))^2,
  images [B, H, W, 3] in [0, 1]; one network pass for both."""
  logits = net.apply({"params": params}, prepare(jnp.concatenate([x, y])))
  b = x.shape[0]
  return jnp.mean(jnp.square(logits[:b] - logits[b:]))


def abstract_params(net: ConvNeXt | None = None) -> dict:
  net = net or ConvNeXt()
  return jax.eval_shape(net.init, jax.random.key(0),
                        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax path ('features_1_0', 'block_3', 'kernel') -> 'features.1.0.block.3.weight'."""
  *modules, leaf = path
  name = ".".join(m.replace("_", ".") for m in modules)
  if leaf == "layer_scale":
    return f"{name}.layer_scale"
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _to_flax(arr: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)  # OIHW (depthwise: [C, 1, kh, kw]) -> HWIO.
  if leaf == "kernel" and arr.ndim == 2:
    return arr.T  # Linear [out, in] -> [in, out].
  if leaf == "layer_scale" and arr.size == np.prod(target_shape):
    return arr.reshape(target_shape)  # [C, 1, 1] -> [C].
  return arr


def params_from_state_dict(sd: Mapping[str, np.ndarray], src_name: str = "state dict",
                           net: ConvNeXt | None = None) -> dict:
  """Maps torchvision's ConvNeXt state dict onto `ConvNeXt`'s params (every key used).

  Missing, extra or mis-shaped keys are a UserError naming the key (and both shapes).
  """
  out, used = {}, set()
  flat = traverse_util.flatten_dict(abstract_params(net))
  for path, target in flat.items():
    key = _torch_key(path)
    if key not in sd:
      raise UserError(f"{src_name}: missing '{key}' (torchvision's convnext_small state dict?)")
    arr = _to_flax(np.asarray(sd[key], np.float32), path[-1], tuple(target.shape))
    if arr.shape != tuple(target.shape):
      raise UserError(f"{src_name}: '{key}' has shape {tuple(np.shape(sd[key]))}, expected "
                      f"{tuple(target.shape)} in Flax layout")
    out[path] = arr
    used.add(key)
  extra = [k for k in sd if k not in used]
  if extra:
    raise UserError(f"{src_name}: unexpected key '{extra[0]}' ({len(extra)} in all): not "
                    "ConvNeXt-S weights?")
  return traverse_util.unflatten_dict(out)


def check_weight_files(paths: Sequence[str]) -> str:
  """The one weight file (reading it is `load_params`'s)."""
  if len(paths) != 1:
    raise UserError("the convnext_s perceptual network needs exactly one weight file "
                    f"(torchvision's convnext_small state dict), got {len(paths)}")
  return paths[0]


def load_params(paths: Sequence[str]) -> dict:
  """`ConvNeXt()` params from torchvision's convnext_small state dict file."""
  from flowtok_jax.tools import convert  # pylint: disable=g-import-not-at-top
  f = check_weight_files(paths)
  return params_from_state_dict(convert.load_state_dict(f, "tokenizer_stage.perceptual_path"), f)
