"""The tokenizer's perceptual term: pluggable frozen networks with weights from local files.

`tokenizer_stage.perceptual` names one registered network or several joined by '-', optionally
followed by one weight each, as the reference names its loss:

    lpips                          LPIPS (VGG16, v0.1; models/lpips.py)
    convnext_s                     ConvNeXt-S logit MSE at 224 px (models/convnext.py)
    lpips-convnext_s-1.0-0.1       the reference tokenizer's: (1.0 LPIPS + 0.1 ConvNeXt) / 1.1

The term is the weighted average sum_k w_k L_k / sum_k w_k (weights 1 when not given), which the
stage multiplies by `perceptual_weight` (the reference: 1.1, so LPIPS + 0.1 ConvNeXt in all).
`tokenizer_stage.perceptual_path` lists the weight files, comma-separated; with more than one
network each entry names its network, `NAME=FILE`:

    lpips=vgg16-397923af.pth,lpips=vgg.pth,convnext_s=convnext_small-0c510722.pth

The weights reach the compiled step as the frozen part `perceptual` ({network: params}):
arguments of the step, not constants baked into it, and read once. Checkpoints record the files'
sha256 (the stage's fingerprint `perceptual`): resuming with other weights is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import jax

from flowtok_jax.errors import UserError
from flowtok_jax.train import stage_api

Params = dict


@dataclasses.dataclass(frozen=True)
class Network:
  """One perceptual network: `init(rng, images)` its params' shapes, `load()` them from the
  files, `loss(params, images, recon)` a scalar; images [B, H, W, 3] in [0, 1]."""
  init: Callable[[jax.Array, jax.Array], Params]
  load: Callable[[], Params]
  loss: Callable[[Params, jax.Array, jax.Array], jax.Array]


# name -> factory(weight files, each existing) -> Network. The factory only checks how many files
# it was given (cheap); `load` reads them.
NETWORKS: dict[str, Callable[[Sequence[str]], Network]] = {}


def _lpips(files: Sequence[str]) -> Network:
  from flowtok_jax.models import lpips  # pylint: disable=g-import-not-at-top
  lpips.check_weight_files(files)
  net = lpips.LPIPS()
  return Network(init=lambda rng, x: net.init(rng, x, x)["params"],
                 load=lambda: lpips.load_params(files),
                 loss=lambda p, x, y: net.apply({"params": p}, x, y).mean())


def _convnext_s(files: Sequence[str]) -> Network:
  from flowtok_jax.models import convnext  # pylint: disable=g-import-not-at-top
  convnext.check_weight_files(files)
  net = convnext.ConvNeXt()
  return Network(init=lambda rng, x: net.init(rng, convnext.prepare(x))["params"],
                 load=lambda: convnext.load_params(files),
                 loss=lambda p, x, y: convnext.logit_mse(net, p, x, y))


NETWORKS["lpips"] = _lpips
NETWORKS["convnext_s"] = _convnext_s


def parse(spec: str) -> dict[str, float]:
  """'lpips-convnext_s-1.0-0.1' -> {'lpips': 1.0, 'convnext_s': 0.1} (weights 1 if not given)."""
  parts = [p for p in str(spec).split("-")]
  names = []
  while parts and parts[0] in NETWORKS:
    names.append(parts.pop(0))
  known = ", ".join(NETWORKS)
  if not names:
    raise UserError(f"tokenizer_stage.perceptual {spec!r} names no registered perceptual network "
                    f"(known: {known}; combined as lpips-convnext_s-1.0-0.1)")
  if len(set(names)) != len(names):
    raise UserError(f"tokenizer_stage.perceptual {spec!r} names a network twice")
  try:
    weights = [float(p) for p in parts]
  except ValueError:
    raise UserError(f"tokenizer_stage.perceptual {spec!r}: {parts[0]!r} is neither a registered "
                    f"network ({known}) nor a weight") from None
  if weights and len(weights) != len(names):
    raise UserError(f"tokenizer_stage.perceptual {spec!r}: {len(names)} networks need "
                    f"{len(names)} weights, got {len(weights)}")
  weights = weights or [1.0] * len(names)
  if min(weights) < 0 or sum(weights) <= 0:
    raise UserError(f"tokenizer_stage.perceptual {spec!r}: weights must be >= 0 with a "
                    "positive sum")
  return dict(zip(names, weights))


def assign_files(names: Sequence[str], paths: str) -> dict[str, list[str]]:
  """Splits `perceptual_path` into each network's files (`NAME=FILE` entries; bare FILE entries
  when one network is named)."""
  entries = [p.strip() for p in str(paths or "").split(",") if p.strip()]
  if not entries:
    raise UserError(f"tokenizer_stage.perceptual={'-'.join(names)} needs "
                    "tokenizer_stage.perceptual_path: its weight files, comma-separated")
  files = {n: [] for n in names}
  for entry in entries:
    name, sep, path = entry.partition("=")
    if not sep:
      if len(names) > 1:
        raise UserError(f"tokenizer_stage.perceptual_path: {entry} names no network; with "
                        f"several, write NAME=FILE ({', '.join(names)})")
      name, path = names[0], entry
    if name not in files:
      raise UserError(f"tokenizer_stage.perceptual_path: {entry} is for {name!r}, which "
                      f"tokenizer_stage.perceptual does not name ({', '.join(names)})")
    files[name].append(os.path.expanduser(path))
  for name, fs in files.items():
    if not fs:
      raise UserError(f"tokenizer_stage.perceptual_path names no weight file for {name}")
    for f in fs:
      if not os.path.isfile(f):
        raise UserError(f"tokenizer_stage.perceptual_path: {f} does not exist")
  return files


def build(spec: str, paths: str) -> tuple[stage_api.FrozenPart, Callable, str]:
  """(the frozen part 'perceptual', fn(params, images, recon) -> the weighted average, the
  sha256 of the weight files' sha256s, in order: what a checkpoint records of them)."""
  weights = parse(spec)
  files = assign_files(list(weights), paths)
  nets = {name: NETWORKS[name](files[name]) for name in weights}
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256(" ".join(inference.file_sha256(f) for name in weights
                                   for f in files[name]).encode()).hexdigest()
  total = sum(weights.values())

  def loss(params, images, recon):
    return sum((w / total) * nets[n].loss(params[n], images, recon)
               for n, w in weights.items() if w)

  part = stage_api.FrozenPart(
      "perceptual", init=lambda rng, b: {n: net.init(rng, b["image"][:1])
                                         for n, net in nets.items()},
      load=lambda: {n: net.load() for n, net in nets.items()})
  return part, loss, digest
