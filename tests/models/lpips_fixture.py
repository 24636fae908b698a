"""The LPIPS parity fixture: the `lpips` package's distances for seeded weights and images.

As for the FID Inception (tests/evaluation/inception_fixture.py): `synthetic_state_dict(spec)`
draws an LPIPS state dict (the package's key names and shapes) from a seeded generator; the
fixture stores what `lpips.LPIPS(net='vgg')` computes with it on seeded image pairs, and the
test rebuilds the same weights without torch.

Regenerate (needs torch, torchvision and lpips 0.1.4; not part of the suite):

  python tests/models/lpips_fixture.py tests/models/lpips_parity.npz
"""
from __future__ import annotations

import sys

import numpy as np

SEED = 20261202
PAIRS = 3  # The third pair is one image twice: distance 0.
SIZE = 48


def synthetic_state_dict(spec) -> dict[str, np.ndarray]:
  """He-normal convolutions, small biases, non-negative heads (as trained ones are)."""
  rng = np.random.default_rng(SEED)
  sd = {}
  for key, shape in spec:
    shape = tuple(int(s) for s in shape)
    if key.startswith("lin"):
      sd[key] = np.abs(rng.normal(0.0, 0.1, shape)).astype(np.float32)
    elif key.endswith("weight"):
      sd[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)
    else:
      sd[key] = rng.normal(0.0, 0.01, shape).astype(np.float32)
  return sd


def pairs() -> tuple[np.ndarray, np.ndarray]:
  """Seeded image pairs, float32 [PAIRS, SIZE, SIZE, 3] in [0, 1] each."""
  rng = np.random.default_rng(SEED + 1)
  x = rng.uniform(size=(PAIRS, SIZE, SIZE, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0.0, 0.2, x.shape), 0, 1).astype(np.float32)
  y[-1] = x[-1]
  return x, y


def spec_of(fixture) -> list[tuple[str, tuple[int, ...]]]:
  return [(str(k), tuple(int(d) for d in s.split("x") if d))
          for k, s in zip(fixture["keys"], fixture["shapes"])]


def main(out: str) -> None:
  import lpips  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  # `lins.K` is the package's second name for `linK` (the same tensors): drawn once, as `linK`.
  spec = [(k, tuple(v.shape)) for k, v in net.state_dict().items()
          if not k.startswith(("scaling_layer.", "lins."))]
  sd = synthetic_state_dict(spec)
  missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                                            strict=False)
  assert not unexpected and all(k.startswith(("scaling_layer.", "lins.")) for k in missing)
  x, y = pairs()
  with torch.no_grad():
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
    d = net(to_t(x), to_t(y), normalize=True).reshape(-1).numpy()  # normalize: [0, 1] inputs.
  np.savez_compressed(out, keys=np.array([k for k, _ in spec]),
                      shapes=np.array(["x".join(str(v) for v in s) for _, s in spec]),
                      distances=d.astype(np.float32),
                      versions=np.array([f"torch {torch.__version__}", "lpips 0.1.4"]))
  print(f"wrote {out}: {len(spec)} keys, distances {d}")


if __name__ == "__main__":
  main(sys.argv[1])
