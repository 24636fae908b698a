"""Real FID: the FID Inception-v3 in Flax, its weights from a local file, and `flowtok fid`.

FID (Heusel et al. 2017) compares the Gaussian fits of Inception-v3 pool features (2048-d, the
global average pool after Mixed_7c) of two image sets. The network is the TensorFlow graph of
2015-12-05 that every published FID uses; its weights are read from a local file, never
downloaded:

  * pytorch-fid's port `pt_inception-2015-12-05-6726825d.pth` (a state dict; reading a .pth
    needs torch), the same state dict saved as .npz (name -> array), or
  * the directory that `flowtok convert --kind inception --src FILE --out DIR` writes from
    either (DIR/inception.msgpack; no torch needed afterwards).

Parity quirks of that graph, kept here exactly as pytorch-fid keeps them (a feature-level parity
test against pytorch-fid runs in the suite from a stored fixture, tests/evaluation/):
  * Mixed_5b-d, 6b-e and 7b pool their branch with a 3x3 *average that ignores the padding*;
    Mixed_7c pools it with a 3x3 *max* (a quirk of that graph, not of the paper's network).
  * BatchNorm epsilon 1e-3, in inference form (running statistics), convolutions without bias.
  * Input: RGB in [0, 1], resized to 299x299 bilinearly *without antialiasing* and with
    half-pixel centres (torch's `interpolate(..., align_corners=False)`), then mapped to [-1, 1].
    The resize runs on the host (`resize`), so any mix of image sizes meets one compiled
    network.

The Fréchet distance itself is `image_metrics.frechet_distance`. Statistics files are .npz with
`mu` [2048] and `sigma` [2048, 2048], the format pytorch-fid reads and writes.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError
from flowtok_jax.models import layers

FEATURES = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name for the weights.
# The files of a folder that count, as pytorch-fid picks them: these extensions, lower case
# only (so both tools see the same images in the same folder).
IMAGE_EXTS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
# The 1008-way classifier: in the state dict, not in the pool features.
_UNUSED = ("fc.weight", "fc.bias")


# ---------------------------------------------------------------------------------------------
# The network. Module and parameter names follow the reference state dict's, so the weight map
# is mechanical: 'Mixed_5b/branch1x1/conv/kernel' <- 'Mixed_5b.branch1x1.conv.weight'.


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg3(x):
  """3x3 stride-1 average over the valid neighbours only (TF's pool; padding not counted)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _Block(nn.Module):
  """An Inception block: `conv` builds its named conv-BN-ReLU units."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.nowrap
  def conv(self, features: int, kernel: tuple[int, int], name: str,
           padding: tuple[int, int] = (0, 0), strides: tuple[int, int] = (1, 1)) -> BasicConv:
    return BasicConv(features, kernel, strides, padding, self.precision, name=name)


# (kernel, padding) of the factorised 1x7 / 7x1 and 1x3 / 3x1 convolutions.
_ROW7, _COL7, _ROW3, _COL3 = ((1, 7), (0, 3)), ((7, 1), (3, 0)), ((1, 3), (0, 1)), ((3, 1), (1, 0))


class InceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b1 = c(64, (1, 1), "branch1x1")(x)
    b5 = c(64, (5, 5), "branch5x5_2", (2, 2))(c(48, (1, 1), "branch5x5_1")(x))
    b3 = c(64, (1, 1), "branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), "branch3x3dbl_2", (1, 1))(b3)
    b3 = c(96, (3, 3), "branch3x3dbl_3", (1, 1))(b3)
    bp = c(self.pool_features, (1, 1), "branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """The grid reduction 35 -> 17 (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b3 = c(384, (3, 3), "branch3x3", strides=(2, 2))(x)
    bd = c(64, (1, 1), "branch3x3dbl_1")(x)
    bd = c(96, (3, 3), "branch3x3dbl_2", (1, 1))(bd)
    bd = c(96, (3, 3), "branch3x3dbl_3", strides=(2, 2))(bd)
    return jnp.concatenate([b3, bd, _max3_s2(x)], axis=-1)


class InceptionC(_Block):
  """Factorised 7x7 convolutions (Mixed_6b-e)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c, c7 = self.conv, self.channels_7x7
    b1 = c(192, (1, 1), "branch1x1")(x)
    b7 = c(c7, (1, 1), "branch7x7_1")(x)
    b7 = c(c7, _ROW7[0], "branch7x7_2", _ROW7[1])(b7)
    b7 = c(192, _COL7[0], "branch7x7_3", _COL7[1])(b7)
    bd = c(c7, (1, 1), "branch7x7dbl_1")(x)
    for i, (features, (kernel, pad)) in enumerate(
        [(c7, _COL7), (c7, _ROW7), (c7, _COL7), (192, _ROW7)], start=2):
      bd = c(features, kernel, f"branch7x7dbl_{i}", pad)(bd)
    bp = c(192, (1, 1), "branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """The grid reduction 17 -> 8 (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b3 = c(320, (3, 3), "branch3x3_2", strides=(2, 2))(c(192, (1, 1), "branch3x3_1")(x))
    b7 = c(192, (1, 1), "branch7x7x3_1")(x)
    b7 = c(192, _ROW7[0], "branch7x7x3_2", _ROW7[1])(b7)
    b7 = c(192, _COL7[0], "branch7x7x3_3", _COL7[1])(b7)
    b7 = c(192, (3, 3), "branch7x7x3_4", strides=(2, 2))(b7)
    return jnp.concatenate([b3, b7, _max3_s2(x)], axis=-1)


class InceptionE(_Block):
  """Expanded filter banks (Mixed_7b with an average pool, Mixed_7c with the graph's max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.conv
    split = lambda y, name: jnp.concatenate([c(384, _ROW3[0], name + "a", _ROW3[1])(y),
                                             c(384, _COL3[0], name + "b", _COL3[1])(y)], axis=-1)
    b1 = c(320, (1, 1), "branch1x1")(x)
    b3 = split(c(384, (1, 1), "branch3x3_1")(x), "branch3x3_2")
    bd = c(384, (3, 3), "branch3x3dbl_2", (1, 1))(c(448, (1, 1), "branch3x3dbl_1")(x))
    bd = split(bd, "branch3x3dbl_3")
    if self.max_pool:  # Mixed_7c of the FID graph: a max pool where the paper has an average.
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg3(x)
    bp = c(192, (1, 1), "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize(image: np.ndarray, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> np.ndarray:
  """One image [H, W, C] -> float32 [*size, C], torch's bilinear resize without antialiasing
  (`layers.bilinear_matrix`, as pytorch-fid), along H, then W.

  On the host, so that images of every size feed one compiled network (a folder of photos
  would otherwise compile once per distinct size).
  """
  image = np.asarray(image, np.float32)
  if image.shape[:2] == tuple(size):
    return image
  h, w, c = image.shape
  x = layers.bilinear_matrix(h, size[0]).astype(np.float32) @ image.reshape(h, w * c)
  x = x.reshape(size[0], w, c).transpose(1, 0, 2).reshape(w, size[0] * c)
  x = layers.bilinear_matrix(w, size[1]).astype(np.float32) @ x
  return x.reshape(size[1], size[0], c).transpose(1, 0, 2)


class FIDInceptionV3(nn.Module):
  """Images [B, 299, 299, 3] in [0, 1] (`resize` first) -> pool features [B, 2048]."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    x = 2.0 * images.astype(jnp.float32) - 1.0
    p = self.precision
    x = BasicConv(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)    # 149
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)            # 147
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = _max3_s2(x)                                                            # 73
    x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)           # 71
    x = _max3_s2(x)                                                            # 35
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(precision=p, pool_features=pool, name=name)(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)                                      # 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(precision=p, channels_7x7=c7, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)                                      # 8
    x = InceptionE(precision=p, name="Mixed_7b")(x)
    x = InceptionE(precision=p, max_pool=True, name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))


def abstract_variables() -> dict:
  """{'params', 'batch_stats'} of `FIDInceptionV3` as ShapeDtypeStructs (nothing computed)."""
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Weights.

# Our leaf name -> the reference state dict's (params: kernel, scale, bias; batch_stats: mean, var).
_SOURCE_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


def ignored_key(key: str) -> bool:
  """A reference key the pool features do not use (the classifier, BatchNorm step counters)."""
  return key in _UNUSED or key.endswith(".num_batches_tracked")


def ignored_summary(sd: Mapping[str, Any]) -> list[str]:
  """What of `sd` the features leave out, in short: ['fc.*', '*.num_batches_tracked']."""
  keys = [k for k in sd if ignored_key(k)]
  return (["fc.*"] if any(k.startswith("fc.") for k in keys) else []) + (
      ["*.num_batches_tracked"] if any(k.endswith(".num_batches_tracked") for k in keys) else [])


def variables_from_state_dict(sd: Mapping[str, np.ndarray], src_name: str = "state dict"):
  """Maps pytorch-fid's Inception state dict onto `FIDInceptionV3`'s variables.

  Every target leaf takes exactly one source key (conv weights OIHW -> HWIO); the source may
  also hold the classifier (`fc.*`) and BatchNorm step counters, which are ignored. Anything
  else missing, extra or mis-shaped is a `UserError` naming the key and both shapes.
  Returns:
    {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  out, used = {}, set()
  for path, leaf in traverse_util.flatten_dict(abstract_variables()).items():
    *modules, name = path[1:]  # path[0]: the collection.
    key = ".".join(modules) + "." + _SOURCE_NAME[name]
    if key not in sd:
      raise UserError(f"{src_name}: missing '{key}' (expected by {'/'.join(path)}; is this the "
                      f"FID Inception state dict, {WEIGHTS_FILE}?)")
    arr = np.asarray(sd[key], np.float32)
    if name == "kernel":
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    if arr.shape != tuple(leaf.shape):
      raise UserError(f"{src_name}: '{key}' has shape {tuple(np.shape(sd[key]))}, expected "
                      f"{tuple(leaf.shape)} for {'/'.join(path)}")
    out[path] = arr
    used.add(key)
  extra = [k for k in sd if k not in used and not ignored_key(k)]
  if extra:
    raise UserError(f"{src_name}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all): "
                    "not the FID Inception state dict?")
  return traverse_util.unflatten_dict(out)


def load_variables(path: str) -> dict:
  """Weights from a state dict file (.pth / .npz / .safetensors) or a `flowtok convert` dir."""
  from flowtok_jax import paths  # pylint: disable=g-import-not-at-top
  from flowtok_jax.tools import convert  # pylint: disable=g-import-not-at-top
  path = paths.local(path, "--inception")
  if os.path.isdir(path):
    tree = convert.load_converted(path, ["inception"])["inception"]
    variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    convert.check_tree(abstract_variables(), variables, f"{path} (inception)")
    return variables
  if not os.path.exists(path):
    raise UserError(f"--inception {path} does not exist (the FID Inception weights: "
                    f"{WEIGHTS_FILE}, its .npz, or a `flowtok convert --kind inception` dir)")
  return variables_from_state_dict(convert.load_state_dict(path, "--inception"),
                                   os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# Features and statistics.


# One jitted function for every `InceptionFeatures`: its compiles (one per batch shape) are shared.
_apply = jax.jit(FIDInceptionV3().apply)


class InceptionFeatures:
  """Pool features of images of any sizes: resized on the host, batches of a few fixed shapes.

  Args:
    variables: {'params', 'batch_stats'} (`load_variables`).
    batch_size: images per call.
  """

  def __init__(self, variables, batch_size: int = 50):
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size

  def __call__(self, images, progress: Optional[Callable[[int], Any]] = None) -> np.ndarray:
    """Images [N, H, W, 3], or a list of [H_i, W_i, 3] (uint8, or float in [0, 1]) ->
    float32 [N, 2048]; `progress(n)` after each batch of n."""
    outs = []
    for i in range(0, len(images), self.batch_size):
      chunk = [resize(_unit_rgb(im)) for im in images[i:i + self.batch_size]]
      n = len(chunk)
      # A short batch is padded to a power of two (at most batch_size): a handful of compiled
      # shapes in all, and little work on padding rows, which are dropped.
      rows = min(self.batch_size, 1 << (n - 1).bit_length())
      chunk += [np.zeros_like(chunk[0])] * (rows - n)
      outs.append(np.asarray(_apply(self.variables, np.stack(chunk)))[:n])
      if progress is not None:
        progress(n)
    return np.concatenate(outs) if outs else np.zeros((0, FEATURES), np.float32)


def _unit_rgb(image) -> np.ndarray:
  """uint8 [H, W, 3], or float already in [0, 1], as float32 in [0, 1]."""
  x = np.asarray(image)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise UserError(f"expected an RGB image [H, W, 3], got shape {x.shape}")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if x.dtype.kind != "f" or x.size and not 0.0 <= x.min() <= x.max() <= 1.0:
    raise UserError(f"expected uint8 images or floats in [0, 1], got {x.dtype} in "
                    f"[{x.min()}, {x.max()}]")
  return x.astype(np.float32)


def list_images(folder: str, num: Optional[int] = None) -> list[str]:
  """The image files directly in `folder`, sorted, the first `num`; at least 2 (FID's minimum)."""
  if not os.path.isdir(folder):
    raise UserError(f"{folder} is not a directory of images or a statistics .npz")
  files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                 if n.rsplit(".", 1)[-1] in IMAGE_EXTS and "." in n)[:num]
  if len(files) < 2:
    raise UserError(f"{folder} holds {len(files)} image(s) (.{', .'.join(IMAGE_EXTS)}; "
                    "lower-case extensions, as pytorch-fid reads them); FID needs at least 2")
  return files


def check_image(path: str) -> None:
  """A UserError unless PIL recognises the file as an image (its header only: cheap)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path):
      pass
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read image {path}: {e}") from None


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3] (greyscale and RGBA converted as PIL converts them)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read image {path}: {e}") from None


def files_features(files: Sequence[str], net: InceptionFeatures,
                   progress: Optional[Callable[[int], Any]] = None,
                   workers: Optional[int] = None) -> np.ndarray:
  """Features [N, 2048] of image files.

  On an accelerator, decoding and resizing (PIL and numpy release the GIL) run in `workers`
  threads (default: the host's cores, at most 32), one batch ahead of the network, so the chip
  does not wait on one decoding core; at most two batches of images are in memory. Where the
  network itself runs on the CPU it already uses every core and threads gain nothing (2 cores,
  200 PNGs: 32.3-35.2 s threaded against 32.6-32.9 s in line), so decoding stays in line.
  """
  load = lambda f: resize(_unit_rgb(read_image(f)))
  batches = [files[a:a + net.batch_size] for a in range(0, len(files), net.batch_size)]
  if workers is None:
    workers = 0 if jax.devices()[0].platform == "cpu" else min(32, os.cpu_count() or 1)
  if not workers:
    return np.concatenate([net([load(f) for f in batch], progress) for batch in batches])
  outs = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    ahead = [pool.submit(load, f) for f in batches[0]] if batches else []
    for k in range(len(batches)):
      images = [job.result() for job in ahead]
      ahead = [pool.submit(load, f) for f in batches[k + 1]] if k + 1 < len(batches) else []
      outs.append(net(images, progress))
  return np.concatenate(outs)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, num: int) -> None:
  """Writes `path` (compressed .npz: mu, sigma, num_images) whole or not at all."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, mu=mu, sigma=sigma, num_images=np.int64(num))
  os.replace(tmp, path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [2048], sigma [2048, 2048]) from a statistics .npz (ours or pytorch-fid's)."""
  try:
    with np.load(path) as f:
      mu, sigma = f["mu"], f["sigma"]
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{path} is not a statistics file (.npz with 'mu' and 'sigma'): {e}") from None
  if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
    raise UserError(f"{path}: statistics of shape mu {mu.shape}, sigma {sigma.shape}; FID "
                    f"needs mu [{FEATURES}] and sigma [{FEATURES}, {FEATURES}]")
  return mu, sigma


def _is_stats_file(source: str) -> bool:
  return source.endswith(".npz") and os.path.isfile(source)


def files_stats(files: Sequence[str], net: InceptionFeatures, desc: str, show_progress: bool):
  """(mu, sigma, n) of image files, with a progress bar named `desc`."""
  from flowtok_jax import progress  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import image_metrics  # pylint: disable=g-import-not-at-top
  bar = progress.meter(len(files), f"inception {desc}", unit="img") if show_progress else None
  try:
    feats = files_features(files, net, bar.update if bar else None)
  finally:
    if bar is not None:
      bar.close()
  return (*image_metrics.gaussian_stats(feats), len(files))


def fid(sources: Sequence[str], weights: str, batch_size: int = 50, num: Optional[int] = None,
        save_stats_to: Optional[str] = None, show_progress: bool = True) -> dict[str, Any]:
  """`flowtok fid`: FID between two sources, or the statistics of one.

  Args:
    sources: one or two paths, each an image folder or a statistics .npz.
    weights: the Inception weights (`load_variables`).
    batch_size: images per Inception call.
    num: use at most this many images of each folder (the first by file name).
    save_stats_to: with one source, write its statistics here (required then).
  Returns:
    {'fid': float, 'num_images': [n_a, n_b]} for two sources; {'stats': path, 'num_images'}.
  """
  from flowtok_jax import paths  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import image_metrics  # pylint: disable=g-import-not-at-top
  if len(sources) not in (1, 2):
    raise UserError(f"fid takes one source (with --save_stats) or two, got {len(sources)}")
  if len(sources) == 1 and not save_stats_to:
    raise UserError("with one source, pass --save_stats OUT.npz (or give two sources)")
  if save_stats_to:
    if len(sources) != 1 or _is_stats_file(sources[0]):
      raise UserError("--save_stats takes exactly one source, an image folder")
    save_stats_to = paths.writable_file(save_stats_to, "--save_stats")
    if not save_stats_to.endswith(".npz"):
      raise UserError(f"--save_stats {save_stats_to}: the statistics file must end in .npz")
    if os.path.exists(save_stats_to):
      raise UserError(f"--save_stats {save_stats_to} exists (delete it to write new statistics)")
  # Refuse a bad source before loading weights or reading images.
  loaded = {s: load_stats(s) for s in sources if _is_stats_file(s)}
  listed = {s: list_images(s, num) for s in sources if s not in loaded}
  for files in listed.values():  # A file that is no image at all, before hours of features.
    for f in files:
      check_image(f)
  net = InceptionFeatures(load_variables(weights), batch_size) if listed else None
  stats = [(*loaded[s], None) if s in loaded else
           files_stats(listed[s], net, os.path.basename(os.path.normpath(s)), show_progress)
           for s in sources]
  if save_stats_to:
    mu, sigma, n = stats[0]
    save_stats(save_stats_to, mu, sigma, n)
    return {"stats": save_stats_to, "num_images": n}
  (mu_a, s_a, n_a), (mu_b, s_b, n_b) = stats
  return {"fid": image_metrics.frechet_distance(mu_a, s_a, mu_b, s_b), "num_images": [n_a, n_b]}
