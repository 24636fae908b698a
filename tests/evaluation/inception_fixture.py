"""The FID Inception parity fixture: pytorch-fid's features for seeded weights and images.

The real weights (~95 MB) cannot live in the repository, and the suite runs without torch, so the
parity test works from a fixture: `synthetic_state_dict(spec)` draws a state dict with
pytorch-fid's keys and shapes from a seeded numpy generator, and the fixture stores what
pytorch-fid's `InceptionV3([3])` (resize and normalisation on, the FID blocks) computes from
that state dict on seeded images. The test draws the same state dict, converts it, and compares
our network's features with the stored ones.

Regenerate (needs torch, torchvision and pytorch-fid 0.3.0; not part of the suite):

  python tests/evaluation/inception_fixture.py tests/evaluation/inception_parity.npz
"""
from __future__ import annotations

import sys

import numpy as np

SEED = 20261201
# Images the fixture runs: 64 px (upsampled to 299, like the shapes world) and a non-square
# larger one (downsampled in both directions, where an antialiasing resize would differ).
IMAGE_SHAPES = ((2, 64, 64, 3), (1, 333, 400, 3))
# A small resize-only case: [1, 17, 40, 3] -> (11, 29) (down in one axis, up in the other).
RESIZE_IN, RESIZE_OUT = (1, 17, 40, 3), (11, 29)


def synthetic_state_dict(spec) -> dict[str, np.ndarray]:
  """A seeded state dict for `spec` [(key, shape)] whose activations stay O(1) through the net.

  Conv weights He-normal; BatchNorm gains U(0.5, 1.5), biases and running means N(0, 0.1²),
  running variances U(0.5, 1.5); the classifier small; counters 0.
  """
  rng = np.random.default_rng(SEED)
  sd = {}
  for key, shape in spec:
    shape = tuple(int(s) for s in shape)
    if key.endswith("num_batches_tracked"):
      sd[key] = np.zeros(shape, np.int64)
    elif key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      sd[key] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    elif key.endswith(("bn.weight", "running_var")):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif key.endswith(("bn.bias", "running_mean")):
      sd[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    else:  # fc.weight, fc.bias
      sd[key] = rng.normal(0.0, 0.01, shape).astype(np.float32)
  return sd


def images() -> list[np.ndarray]:
  """The seeded test images, float32 [N, H, W, 3] in [0, 1]."""
  rng = np.random.default_rng(SEED + 1)
  return [rng.uniform(0.0, 1.0, s).astype(np.float32) for s in IMAGE_SHAPES]


def resize_input() -> np.ndarray:
  return np.random.default_rng(SEED + 2).uniform(0.0, 1.0, RESIZE_IN).astype(np.float32)


def spec_of(fixture) -> list[tuple[str, tuple[int, ...]]]:
  """[(key, shape)] stored in a loaded fixture."""
  return [(str(k), tuple(int(d) for d in s.split("x") if d))
          for k, s in zip(fixture["keys"], fixture["shapes"])]


def main(out: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pfid  # pylint: disable=g-import-not-at-top

  # The keys and shapes of the FID network's state dict (the .pth's): its torchvision trunk
  # with the FID blocks swapped in, as `fid_inception_v3` builds it before loading weights.
  probe = pfid._inception_v3(  # pylint: disable=protected-access
      num_classes=1008, aux_logits=False, weights=None)
  for name, block in (("Mixed_5b", pfid.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", pfid.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", pfid.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", pfid.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", pfid.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", pfid.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", pfid.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", pfid.FIDInceptionE_1(1280)),
                      ("Mixed_7c", pfid.FIDInceptionE_2(2048))):
    setattr(probe, name, block)
  spec = [(k, tuple(v.shape)) for k, v in probe.state_dict().items()]
  sd = synthetic_state_dict(spec)
  # Then pytorch-fid's network itself, its weight download replaced by that state dict.
  pfid.load_state_dict_from_url = lambda url, progress=True: {k: torch.from_numpy(v)
                                                              for k, v in sd.items()}
  net = pfid.InceptionV3([3]).eval()
  feats = []
  with torch.no_grad():
    for x in images():
      out_t = net(torch.from_numpy(x).permute(0, 3, 1, 2))[0]
      feats.append(out_t[:, :, 0, 0].numpy().astype(np.float32))
    resized = F.interpolate(torch.from_numpy(resize_input()).permute(0, 3, 1, 2),
                            size=RESIZE_OUT, mode="bilinear", align_corners=False)
  np.savez_compressed(
      out, keys=np.array([k for k, _ in spec]),
      shapes=np.array(["x".join(str(d) for d in s) for _, s in spec]),
      features=np.concatenate(feats), resized=resized.permute(0, 2, 3, 1).numpy(),
      versions=np.array([f"torch {torch.__version__}", "pytorch-fid 0.3.0"]))
  print(f"wrote {out}: {len(spec)} keys, features {np.concatenate(feats).shape}")


if __name__ == "__main__":
  main(sys.argv[1])
