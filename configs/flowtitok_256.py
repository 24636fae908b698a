r"""FlowTiTok tokenizer training at paper scale (SPEC §1.1, §5; TA-TiTok recipe, reference §2.3).

    flowtok train --config configs/flowtitok_256.py --workdir /gcs/BUCKET/runs/flowtitok_256 \
        --config.data.data_dir=/gcs/BUCKET/tfds --config.init.clip_from=/gcs/BUCKET/clip_l14

The models are those of configs/flowtok.py (ViT-B encoder, text-aware ViT-L decoder, 77 × 16
tokens); this file sets the `tokenizer` stage's recipe: AdamW 1e-4, betas (0.9, 0.999), wd 1e-4
(not on norms, biases, embeddings, latent/mask tokens), cosine with 10k warm-up to 1e-5,
clipping 1.0, EMA 0.999, L2 + 1e-6·KL + 0.1·hinge GAN from step 200k with LeCam 0.001.
The reference adds the perceptual loss "lpips-convnext_s-1.0-0.1" × 1.1, i.e. LPIPS + 0.1 ×
ConvNeXt-S logit MSE (train/perceptual.py; models/lpips.py, models/convnext.py). It is named here
and off (weight 0) until its weight files, which are never downloaded, are given:
`--config.tokenizer_stage.perceptual_weight=1.1 --config.tokenizer_stage.perceptual_path=
lpips=vgg16-397923af.pth,lpips=vgg.pth,convnext_s=convnext_small-0c510722.pth` (torchvision's
VGG16 and ConvNeXt-S, the lpips package's heads).

Arguments (after a colon): `res=256|512` (configs/flowtitok_512.py sets 512), `batch=256`,
`runlocal`, `sweep=lr` for get_sweep.
"""
import os

import ml_collections

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.train import optim


def _spec(arg):
  return config_lib.parse_arg(arg, res=256, batch=256, runlocal=False, sweep="lr")


def get_config(arg=None):
  arg = _spec(arg)
  if arg.res not in (256, 512):
    raise UserError(f"res={arg.res}: the FlowTiTok recipes are 256 or 512 px")
  base = config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))
  config = base.get_config(f"batch={arg.batch},runlocal={arg.runlocal}")
  if not arg.runlocal:
    config.tokenizer.image_size = arg.res  # 16 × 16 patches at 256 px, 32 × 32 at 512 px.

  tr = config.train
  tr.stage = "tokenizer"  # `flowtok train` runs the tokenizer stage.
  tr.total_steps = 20 if arg.runlocal else 650_000  # The TA-TiTok schedule length.
  tr.ema_decay = 0.999  # EMA of the tokenizer params.
  tr.eval_every_steps = 0 if arg.runlocal else 10_000  # Reconstruction evaluators.

  op = config.optim  # Generator AdamW (train/optim.py).
  op.lr = 1e-4  # Peak learning rate.
  op.warmup_steps = 2 if arg.runlocal else 10_000  # Linear warm-up.
  op.schedule = "cosine"  # Cosine decay to end_lr at total_steps.
  op.end_lr = 1e-5  # Final learning rate.
  op.b2 = 0.999  # Adam beta2.
  op.weight_decay = 1e-4  # Decoupled weight decay.
  op.decay_exclude = optim.DEFAULT_DECAY_EXCLUDE  # Norms, embeddings, latent/mask tokens.
  op.clip_norm = 1.0  # Global-norm clipping.

  disc_optim = optim.default_config()
  disc_optim.update(lr=1e-4, warmup_steps=op.warmup_steps, schedule="cosine", end_lr=1e-5,
                    clip_norm=1.0)
  config.tokenizer_stage = ml_collections.ConfigDict(dict(
      recon="l2",  # Reconstruction loss: l2 | l1.
      kl_weight=1e-6,  # β of the Gaussian KL.
      gan_weight=0.1,  # Hinge generator loss weight.
      gan_start_step=10 if arg.runlocal else 200_000,  # GAN terms start here.
      lecam_weight=0.001,  # LeCam regulariser of the discriminator.
      lecam_decay=0.999,  # EMA decay of the LeCam anchors.
      perceptual="lpips-convnext_s-1.0-0.1",  # The reference's networks and their weights.
      perceptual_weight=0.0,  # Reference: 1.1; 0 (off) until perceptual_path is given.
      perceptual_path="",  # NAME=FILE, comma-separated (see the docstring).
      disc_optim=disc_optim.to_dict(),  # Discriminator AdamW.
  ))
  return config


def get_sweep(add, arg=None):
  """Peak learning rate of the generator (the discriminator keeps 1e-4)."""
  arg = _spec(arg)
  if arg.sweep != "lr":
    raise UserError(f"sweep={arg.sweep!r} is unknown (known: lr)")
  for lr in (5e-5, 1e-4, 2e-4):
    add(**{"optim.lr": lr})
