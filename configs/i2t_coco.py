r"""Two-direction FlowTok (T2I + I2T in one model) on COCO captions (paper §5.1, Tab. 3).

    flowtok data build --config configs/i2t_coco.py --data_dir /gcs/BUCKET/tfds
    flowtok train --config configs/i2t_coco.py --workdir /gcs/BUCKET/runs/i2t_coco \
        --config.data.data_dir=/gcs/BUCKET/tfds --config.init.clip_from=... \
        --config.init.tokenizer_from=... --config.init.params_from=/gcs/BUCKET/runs/flowtok_xl

Data: the TFDS `coco_captions` dataset (COCO 2014 with the Karpathy splits: train 82,783 +
restval 30,504 images for training, val and test 5,000 each) prepared as ArrayRecord; each image
carries about five captions under `captions/text`. The paper's I2T model is FlowTok-XL; every
example draws its direction (p_i2t), and one DiT forward covers both directions (SPEC §3).

Arguments (after a colon): `variant=XL` (any DiT size), `mode=both|i2t` (i2t: every example is
image-to-text and, as in the paper, γ1 = γ2 = 0), `p_i2t=0.5` (mode=both), `batch=1024`,
`runlocal`, `sweep=p_i2t|cfg|lr` for get_sweep.
"""
import os

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError


def _spec(arg):
  return config_lib.parse_arg(arg, variant="XL", mode="both", p_i2t=0.5, batch=1024,
                              runlocal=False, sweep="p_i2t")


def get_config(arg=None):
  arg = _spec(arg)
  if arg.mode not in ("both", "i2t"):
    raise UserError(f"mode={arg.mode!r} is unknown (known: both, i2t)")
  base = config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))
  config = base.get_config(f"variant={arg.variant},batch={arg.batch},runlocal={arg.runlocal}")

  data = config.data
  data.name = "coco_captions"  # TFDS COCO 2014 with Karpathy splits (ArrayRecord).
  data.image_key = "image"  # uint8 image feature.
  data.caption_key = "captions/text"  # One of the ~5 captions of each image.
  data.train_split = "train+restval"  # Karpathy train (113k images).
  data.eval_split = "test"  # Karpathy test (5k images), as in Tab. 3.
  data.num_workers = 4  # COCO JPEGs are larger than the pretraining shards' thumbnails.

  config.flow.two_directions = True  # Direction embedding: one model for T2I and I2T.
  st = config.flowtok_stage
  st.p_i2t = 1.0 if arg.mode == "i2t" else arg.p_i2t  # Share of image->text examples.
  st.dec_weight = 1.0  # Text decoder CE: reads the flowed text tokens back into ids.
  if arg.mode == "i2t":
    st.kl_weight = 0.0  # Paper §5.1: no KL and no alignment loss for I2T.
    st.align_weight = 0.0

  tr = config.train
  tr.total_steps = 20 if arg.runlocal else 100_000  # Fine-tuning length (UNCONFIRMED in paper).
  tr.eval_every_steps = 0 if arg.runlocal else 5_000  # Captioning metrics on Karpathy test.
  config.optim.warmup_steps = 2 if arg.runlocal else 1_000  # From a T2I checkpoint: short.
  config.sample.cfg_scale = 1.0  # I2T sampling without guidance unless swept.
  return config


def get_sweep(add, arg=None):
  """sweep=p_i2t: direction mix; sweep=cfg: guidance for captioning; sweep=lr: peak lr."""
  arg = _spec(arg)
  if arg.sweep == "p_i2t":
    for p in (0.25, 0.5, 0.75):
      add(**{"flowtok_stage.p_i2t": p})
  elif arg.sweep == "cfg":
    for scale in (1.0, 1.5, 2.0, 3.0):
      add(**{"sample.cfg_scale": scale})
  elif arg.sweep == "lr":
    for lr in (1e-4, 2e-4, 4e-4):
      add(**{"optim.lr": lr})
  else:
    raise UserError(f"sweep={arg.sweep!r} is unknown (known: p_i2t, cfg, lr)")
