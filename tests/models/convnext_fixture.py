"""The ConvNeXt parity fixture: torchvision's logits for seeded weights and images.

As for LPIPS (lpips_fixture.py): `synthetic_state_dict(spec)` draws a state dict (torchvision's
key names and shapes) from a seeded generator; the fixture stores what torchvision's `ConvNeXt`
computes with it, after torch's antialiased bilinear resize to 224 and ImageNet normalisation (the
reference perceptual loss's input path), and the test rebuilds the same weights without torch.
The network is a narrow, shallow ConvNeXt (`TINY`: every module kind of convnext_small, a
fraction of its cost); the fixture also stores convnext_small's own key names and shapes, so the
test checks that the weight map covers the real file.

Regenerate (needs torch and torchvision; not part of the suite):

  python tests/models/convnext_fixture.py tests/models/convnext_parity.npz
"""
from __future__ import annotations

import sys

import numpy as np

SEED = 20261203
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), num_classes=10)
SIZES = ((64, 64), (256, 240))  # Enlarged to 224 (antialiasing inactive), shrunk (active).
IMAGES = 2  # Per size.


def synthetic_state_dict(spec) -> dict[str, np.ndarray]:
  """He-normal convolutions and linears, LayerNorm scales near 1, layer scales in [0.1, 1]."""
  rng = np.random.default_rng(SEED)
  sd = {}
  for key, shape in spec:
    shape = tuple(int(s) for s in shape)
    if key.endswith("layer_scale"):
      sd[key] = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    elif key.endswith("weight") and len(shape) == 1:  # LayerNorm.
      sd[key] = (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)
    elif key.endswith("weight"):
      sd[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)
    else:
      sd[key] = rng.normal(0.0, 0.05, shape).astype(np.float32)
  return sd


def images() -> list[np.ndarray]:
  """Seeded images, float32 [IMAGES, H, W, 3] in [0, 1] per size in SIZES."""
  rng = np.random.default_rng(SEED + 1)
  return [rng.uniform(size=(IMAGES, h, w, 3)).astype(np.float32) for h, w in SIZES]


def spec_of(keys, shapes) -> list[tuple[str, tuple[int, ...]]]:
  return [(str(k), tuple(int(d) for d in s.split("x") if d)) for k, s in zip(keys, shapes)]


def _spec_arrays(spec):
  return (np.array([k for k, _ in spec]),
          np.array(["x".join(str(v) for v in s) for _, s in spec]))


def main(out: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models import convnext  # pylint: disable=g-import-not-at-top
  dims, depths = TINY["dims"], TINY["depths"]
  setting = [convnext.CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
             for i, (d, n) in enumerate(zip(dims, depths))]
  net = convnext.ConvNeXt(setting, num_classes=TINY["num_classes"]).eval()
  spec = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
  sd = synthetic_state_dict(spec)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
  logits = []
  with torch.no_grad():
    for x in images():
      t = torch.from_numpy(x).permute(0, 3, 1, 2)
      t = torch.nn.functional.interpolate(t, size=224, mode="bilinear", align_corners=False,
                                          antialias=True)
      logits.append(net((t - mean) / std).numpy())
  small = [(k, tuple(v.shape)) for k, v in
           torchvision.models.convnext_small().state_dict().items()]
  keys, shapes = _spec_arrays(spec)
  small_keys, small_shapes = _spec_arrays(small)
  np.savez_compressed(out, keys=keys, shapes=shapes, small_keys=small_keys,
                      small_shapes=small_shapes,
                      **{f"logits_{i}": l.astype(np.float32) for i, l in enumerate(logits)},
                      versions=np.array([f"torch {torch.__version__}",
                                         f"torchvision {torchvision.__version__}"]))
  print(f"wrote {out}: {len(spec)} keys ({len(small)} in convnext_small), logits "
        f"{[l.shape for l in logits]}, |logits| max {max(abs(l).max() for l in logits):.3f}")


if __name__ == "__main__":
  main(sys.argv[1])
