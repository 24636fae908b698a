r"""Paper-scale text-to-image FlowTok (SPEC §1): 77 × 16 tokens, ViT-L/14 text tower, FlowTiTok B/L.

    flowtok info --config configs/flowtok.py:variant=XL
    flowtok train --config configs/flowtok_xl.py --workdir /gcs/BUCKET/runs/flowtok_xl

Arguments (after a colon): `variant=S|B|XL|H` picks the DiT size (depth/width/heads per SPEC §1);
`runlocal` shrinks every model to a few hundred thousand parameters (CPU smoke runs, tests).
Scale-out knobs: `batch=4096` (global batch), `strategy=fsdp|dp|tp` with `tp=N` (mesh and
sharding, see `_MESHES`), `remat=none|full|dots` (DiT block rematerialisation). `sweep=lr|batch|cfg`
picks the sweep `get_sweep` expands (launch/sweep.py).
The thin files `flowtok_{s,b,xl,h}.py` load this one with their variant.

    python launch/sweep.py --config configs/flowtok_xl.py --workdir_root /gcs/B/sweeps --dry_run
    flowtok aot --config configs/flowtok.py:variant=H,remat=full --topology v5p:4x4x2
"""
import ml_collections

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.train import optim

# strategy -> mesh (data, fsdp, tensor) with the models' logical rules (models/layers.py):
#   dp    every device holds a full copy of params and optimizer state (fine up to FlowTok-B).
#   fsdp  params, gradients and Adam moments split over all devices along 'embed' (ZeRO-3);
#         the batch is split over the same devices. The default: XL/H do not fit replicated.
#   tp    fsdp over devices / tp, plus Megatron tensor parallelism over heads and MLP hidden
#         on `tp` devices (for very wide models or small per-device batches).
_MESHES = {"dp": lambda tp: (-1, 1, 1), "fsdp": lambda tp: (1, -1, 1),
           "tp": lambda tp: (1, -1, tp)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="XL", runlocal=False, batch=4096, strategy="fsdp",
                             tp=2, remat="none", sweep="lr")
  if arg.strategy not in _MESHES:
    raise UserError(f"strategy={arg.strategy!r} is unknown "
                               f"(known: {', '.join(_MESHES)})")
  config = ml_collections.ConfigDict()
  config.seed = 1234  # Global seed: model init, per-step randomness.
  config.model_dtype = "bfloat16"  # Compute dtype of every model: float32 | bfloat16 (params f32).

  # --- CLIP text tower: OpenAI ViT-L/14(-336) text transformer, frozen (weights imported). ---
  ct = config.clip_text = ml_collections.ConfigDict()
  ct.vocab_size = 49408  # BPE vocabulary of the CLIP tokenizer.
  ct.max_len = 77  # L: context length; equals the number of image tokens K.
  ct.width = 768  # D: feature width read by the text VAE, alignment MLP and tokenizer decoder.
  ct.depth = 12  # Transformer layers.
  ct.heads = 12  # Attention heads.
  ct.mlp_ratio = 4.0  # MLP hidden = mlp_ratio · width.
  ct.act = "quick_gelu"  # MLP activation: quick_gelu (OpenAI weights) | gelu.
  ct.pad_id = 0  # Padding id (pooling of the contrastive model reads the last non-pad token).

  # --- FlowTiTok image tokenizer (1D VAE, TA-TiTok + 2D RoPE + SwiGLU). ---
  tok = config.tokenizer = ml_collections.ConfigDict()
  tok.image_size = 256  # Pixels per side.
  tok.patch_size = 16  # Patch side; grid = image_size / patch_size.
  tok.encoder_size = "base"  # small | base | large ViT (width/depth/heads), or None: explicit.
  tok.encoder_width = None  # Explicit encoder width (overrides encoder_size when set).
  tok.encoder_depth = None  # Explicit encoder depth.
  tok.encoder_heads = None  # Explicit encoder heads.
  tok.decoder_size = "large"  # small | base | large ViT, or None: explicit.
  tok.decoder_width = None  # Explicit decoder width.
  tok.decoder_depth = None  # Explicit decoder depth.
  tok.decoder_heads = None  # Explicit decoder heads.
  tok.num_tokens = ct.get_ref("max_len")  # K: latent tokens (= text length L).
  tok.token_channels = 16  # C: channels per token.
  tok.text_aware = True  # Decoder also reads the CLIP text features (TA-TiTok).
  tok.text_width = ct.get_ref("width")  # D of those text features.
  tok.text_len = ct.get_ref("max_len")  # L of those text features.
  tok.logvar_min = -30.0  # Posterior logvar clip, lower end.
  tok.logvar_max = 20.0  # Posterior logvar clip, upper end.
  tok.latent_scale = 1.0143  # Flow works on z · latent_scale; decoding divides it back out.

  # --- PatchGAN discriminator for the tokenizer's optional GAN loss. ---
  disc = config.discriminator = ml_collections.ConfigDict()
  disc.channels = 128  # Stem width; stages use up to 4x this.
  disc.num_stages = 3  # Downsampling stages (each halves the resolution).
  disc.groups = 32  # GroupNorm groups.

  # --- Text VAE ("projector"): CLIP features -> (mean, logvar) of text tokens. ---
  tv = config.text_vae = ml_collections.ConfigDict()
  tv.width = ct.get_ref("width")  # D: model width (= CLIP width).
  tv.depth = 6  # Post-LN transformer layers.
  tv.heads = 8  # Attention heads (head dim 96 at D = 768).
  tv.ffn_dim = 1024  # ReLU FFN hidden size.
  tv.dropout = 0.1  # Dropout on attention probabilities, attention output and FFN.
  tv.token_channels = tok.get_ref("token_channels")  # C: output channels (mean and logvar).

  # --- Alignment MLP: per-token target of the contrastive alignment loss. ---
  am = config.align_mlp = ml_collections.ConfigDict()
  am.hidden = 512  # Hidden width of the D -> hidden -> hidden -> C SiLU MLP.
  am.token_channels = tok.get_ref("token_channels")  # C.

  # --- Text decoder (I2T): text tokens -> per-position vocabulary logits. ---
  td = config.text_decoder = ml_collections.ConfigDict()
  td.width = ct.get_ref("width")  # Model width (= CLIP width).
  td.depth = 6  # Post-LN transformer layers, like the text VAE.
  td.heads = 8  # Attention heads.
  td.ffn_dim = 1024  # ReLU FFN hidden size.
  td.dropout = 0.1  # Dropout rate.
  td.vocab_size = ct.get_ref("vocab_size")  # Output vocabulary (the CLIP tokenizer's).
  td.max_len = ct.get_ref("max_len")  # Positions (learned table).

  # --- FlowTok DiT: velocity network over K × C tokens. ---
  fl = config.flow = ml_collections.ConfigDict()
  fl.variant = arg.variant  # S | B | L | XL | H, or None: explicit depth/width/heads.
  fl.depth = None  # Explicit depth (overrides the variant when set).
  fl.width = None  # Explicit width.
  fl.heads = None  # Explicit heads.
  fl.mlp_ratio = 4.0  # GELU-tanh MLP hidden = mlp_ratio · width.
  fl.num_tokens = tok.get_ref("num_tokens")  # K.
  fl.channels = tok.get_ref("token_channels")  # C.
  fl.two_directions = False  # Add the (zero-initialised) direction embedding for T2I + I2T.
  fl.remat = arg.remat  # DiT block remat in the backward pass: none | full | dots.

  _training_sections(config, arg)

  if arg.runlocal:
    config.model_dtype = "float32"
    ct.update(vocab_size=1000, width=64, depth=1, heads=4)
    tok.update(image_size=64, encoder_size=None, encoder_width=64, encoder_depth=1,
               encoder_heads=4, decoder_size=None, decoder_width=64, decoder_depth=1,
               decoder_heads=4)
    disc.update(channels=16, num_stages=2, groups=8)
    tv.update(depth=1, heads=4, ffn_dim=128)
    am.hidden = 64
    td.update(depth=1, heads=4, ffn_dim=128)
    fl.update(variant=None, depth=2, width=64, heads=4)
    config.train.update(batch_size=8, total_steps=20, log_every_steps=5, ckpt_every_steps=10,
                        eval_every_steps=0)
    config.flowtok_stage.shard_size = None  # One block per device at batch 8.
    config.optim.warmup_steps = 2
  return config


def _training_sections(config, arg):
  """Data, the T2I recipe (SPEC §5), mesh/sharding, checkpoints and stage knobs."""
  # --- Data: a TFDS ArrayRecord dataset of (image, caption) pairs (builders.py). ---
  data = config.data = ml_collections.ConfigDict()
  data.name = "image_caption_folder"  # TFDS dataset name; any ArrayRecord image/caption set.
  data.data_dir = None  # TFDS data dir (e.g. /gcs/BUCKET/tfds); required.
  data.folder = None  # image_caption_folder: images + captions.jsonl to build from.
  data.folder_val_fraction = 0.001  # image_caption_folder: share of the images put in 'val'.
  data.image_key = "image"  # Feature holding the uint8 image.
  data.caption_key = "caption"  # Feature holding the caption text.
  # Feature holding the one caption I2T examples learn to write; None: `caption_key`, as in the
  # paper. From a deterministic image latent the I2T ODE reaches the mean of the text tokens it
  # was trained towards, so an image with several captions gets a blend of them.
  data.i2t_caption_key = None
  data.image_size = config.tokenizer.get_ref("image_size")  # Pixels per side (256).
  data.train_split = "train"  # Split the training loop reads.
  data.eval_split = "val"  # Split evaluators read.
  data.shuffle_seed = 0  # Per-epoch shuffle seed.
  data.num_workers = 8  # grain worker processes per host (decode + resize off the train thread).
  data.on_bad_image = "skip"  # 'skip' (count and log) or 'error' on an undecodable image.
  data.max_text_len = config.clip_text.get_ref("max_len")  # L = 77 = K.
  data.read_threads = 16  # Threads reading records per process.
  data.prefetch_batches = 4  # Batches prepared ahead per reading process.
  data.cache_decoded = False  # Keep records decoded in memory (small datasets only; N·S²·3 B).
  # Read the training split into arrays before the first step and gather each batch by index
  # (small, one-caption-per-record datasets only; N·S²·3 B; the same batches as without).
  data.preload = False
  # Stored tokenizer posteriors of the train split (`flowtok data pretokenize`; str): the flowtok
  # stage then reads them instead of encoding images. None: encode on the fly.
  data.latents_dir = None

  # --- Text tokenizer: its ids must be the CLIP tower's. With the imported OpenAI tower that is
  # CLIP's BPE: set path to the tokenizer.json published with the ViT-L/14 weights (needs the
  # `clip` extra); a sentencepiece model trained here only suits a tower trained here. ---
  text = config.text_tokenizer = ml_collections.ConfigDict()
  # tokenizer.json (CLIP BPE) or a sentencepiece .model (None: W/text_tokenizer.model or W/../).
  text.path = None
  text.vocab_size = config.clip_text.get_ref("vocab_size")  # Vocabulary when trained here.
  text.model_type = "bpe"  # sentencepiece model type when trained here.
  text.lowercase = True  # Case-fold all text.
  text.num_captions = 1_000_000  # Captions read to train it.

  # --- Training loop: the released T2I recipe (SPEC §5, reference §7.2). ---
  tr = config.train = ml_collections.ConfigDict()
  tr.stage = "flowtok"  # Stage `flowtok train` runs.
  tr.batch_size = arg.batch  # Global batch over all hosts (4096 in the paper recipe).
  tr.total_steps = 1_000_000  # Optimizer steps (the released configs' n_steps).
  tr.log_every_steps = 100  # Metrics to host, metrics.jsonl and TensorBoard.
  tr.eval_every_steps = 10_000  # Evaluators and their grids (also at the last step; 0: never).
  tr.ckpt_every_steps = 2_000  # Checkpoints (plus the final one and on preemption).
  tr.ema_decay = 0.9999  # EMA of the trainable params, every step.
  tr.peak_flops_per_device = None  # MFU denominator; None: measured matmul peak at start.
  tr.progress_bar = True  # Process 0: tqdm bar (a line every 30 s when not a terminal).
  tr.compilation_cache_dir = None  # Persistent XLA cache (e.g. /gcs/BUCKET/jax_cache).

  op = config.optim = ml_collections.ConfigDict()  # AdamW (train/optim.py).
  op.name = "adamw"  # The paper's; muon: Muon on hidden transformer matrices (optim.py).
  op.muon_ns_steps = 5  # Newton-Schulz iterations per Muon update.
  op.muon_include = optim.MUON_INCLUDE  # Kernels Muon updates (the DiT blocks' attn / MLP).
  op.lr = 4e-4  # Peak learning rate.
  op.warmup_steps = 5_000  # Linear warm-up from 0.
  op.schedule = "constant"  # Constant after warm-up.
  op.end_lr = 0.0  # Unused by 'constant'.
  op.b1 = 0.9  # Adam beta1.
  op.b2 = 0.95  # Adam beta2.
  op.eps = 1e-8  # Adam epsilon.
  op.weight_decay = 0.03  # Decoupled weight decay.
  # The reference decays every parameter; here ndim < 2 leaves (biases, norms) never are
  # (optim.py), and biases by name neither, so the fused 2-D ones (qkv) are treated alike.
  op.decay_exclude = (r"(^|/)bias$",)  # Path regexes not decayed.
  op.clip_norm = None  # No gradient clipping.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = _MESHES[arg.strategy](arg.tp)  # (data, fsdp, tensor); -1 = the rest.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = None  # ((logical, mesh axes), ...); None: models/layers.py table.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.max_to_keep = 3  # Newest checkpoints kept.
  config.checkpoint.async_save = True  # Write checkpoints in the background.
  config.init = ml_collections.ConfigDict()
  config.init.params_from = None  # Run to copy trainable params from (params only) at step 0.
  config.init.clip_from = None  # CLIP text tower: `flowtok convert --kind clip_text` output dir.
  config.init.tokenizer_from = None  # FlowTiTok run (or converted release) for the encoder.

  # --- The flowtok stage (train/stages.py): T2I only, as the released recipe. ---
  config.flowtok_stage = ml_collections.ConfigDict(dict(
      p_i2t=0.0,  # Share of examples trained image->text (0: T2I, no direction input).
      null_prob=0.1,  # CFG null-indicator probability per example.
      kl_weight=0.01,  # γ1 with a batch-sum KL (the released code).
      kl_reduction="sum",  # Text KL reduction: sum | mean.
      align_weight=1.0,  # γ2: contrastive alignment weight.
      align_negatives="global",  # Alignment negatives over the whole global batch.
      dec_weight=0.0,  # Text-decoder CE weight: 0 builds no decoder (T2I recipe).
      # The released run's per-GPU blocks: its KL sum (and null roll) ran over 128 examples
      # per GPU, averaged over 32 GPUs. Per device instead, the KL's weight would scale with
      # the mesh (x4 on 8 chips at batch 4096). The batch must be a multiple of it.
      shard_size=128,
  ))

  # --- Sampling defaults (benchmarks, evaluation): SPEC §2. ---
  config.sample = ml_collections.ConfigDict(dict(
      steps=20,  # Euler steps.
      cfg_scale=2.0,  # Classifier-free guidance scale.
      sampler="euler",  # euler | heun.
      grid="parity",  # Time grid: parity (reference) | uniform.
      batch_size=64,  # Images per sampling batch (global).
  ))


def get_sweep(add, arg=None):
  """Sweeps around the released recipe; `add(**{"dotted.key": value})` adds one run.

  sweep=lr     peak lr at the recipe's batch 4096.
  sweep=batch  global batch with the lr scaled linearly (4e-4 at 4096).
  sweep=cfg    guidance scale for sampling/evaluation of one trained run (use a sampling
               command with launch/sweep.py --command).
  """
  arg = config_lib.parse_arg(arg, variant="XL", runlocal=False, batch=4096, strategy="fsdp",
                             tp=2, remat="none", sweep="lr")
  if arg.sweep == "lr":
    for lr in (2e-4, 4e-4, 8e-4):
      add(**{"optim.lr": lr})
  elif arg.sweep == "batch":
    for batch in (1024, 2048, 4096, 8192):
      add(**{"train.batch_size": batch, "optim.lr": 4e-4 * batch / 4096})
  elif arg.sweep == "cfg":
    for scale in (1.0, 1.5, 2.0, 3.0, 4.0):
      add(**{"sample.cfg_scale": scale})
  else:
    raise UserError(f"sweep={arg.sweep!r} is unknown (known: lr, batch, cfg)")
