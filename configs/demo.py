r"""The embedded default: every stage of FlowTok on the captioned-shapes world, on a 2-core CPU.

    flowtok demo --workdir runs/demo
    flowtok data build --config configs/demo.py --data_dir runs/demo/data
    flowtok data show  --config configs/demo.py --data_dir runs/demo/data

Arguments (after a colon): `runlocal` shrinks everything to a few seconds (tests, smoke runs);
`res=32` renders the dataset at 32 px instead of 64.
"""
import ml_collections

from flowtok_jax import config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.train import optim
from flowtok_jax.train import stages as stages_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, res=64)
  if arg.res < 32 or arg.res % 32:  # The shapes world's geometry (DESIGN §6) scales by res / 64.
    raise UserError(f"configs/demo.py: res must be a positive multiple of 32, got {arg.res}")
  config = ml_collections.ConfigDict()
  config.seed = 0  # Global seed: model init, per-step randomness.

  # --- Data: the captioned-shapes dataset (DESIGN.md §6), prepared as TFDS ArrayRecord. ---
  data = config.data = ml_collections.ConfigDict()
  data.name = "captioned_shapes"  # A TFDS dataset name; any TFDS ArrayRecord dataset works.
  data.data_dir = None  # TFDS data dir (str); `flowtok demo` uses W/data.
  data.image_key = "image"  # Feature holding the uint8 image.
  data.caption_key = "caption"  # Feature holding the caption text.
  # Feature holding the caption I2T learns to write (None: caption_key). A scene's training
  # caption is one of many (paraphrases, either object first), and from its deterministic image
  # latent the I2T ODE can only reach the mean of the text tokens it was trained towards: over
  # those captions that mean decodes to none of them (`flowtok probe` on a trained text VAE:
  # 0.40 exact, vs 1.00 for the one reference caption the pixels determine).
  data.i2t_caption_key = "reference_caption"
  data.image_size = arg.res  # Pixels per side after resize / centre crop.
  data.train_split = "train"  # Split the training loop reads.
  data.eval_split = "val"  # Split periodic evaluation reads.
  data.shuffle_seed = 0  # Seed of the per-epoch shuffle (same seed -> same order).
  data.num_workers = 0  # grain worker processes (0: decode in the training process).
  data.on_bad_image = "skip"  # 'skip' (count and log) or 'error' on an undecodable image.
  data.max_text_len = 16  # L: caption tokens after padding/truncation; must equal image tokens K.
  data.read_threads = 1  # Threads preparing batches per reading process (more contend for the GIL).
  data.prefetch_batches = 2  # Batches prepared ahead per reading process (bounds host memory).
  # Keep each training record decoded in memory after its first read (234 MiB for the 20k
  # images): the tokenizer reads the split 6.4 times, and a record's protobuf + PNG parse cost
  # 0.31 ms, ~11 ms of one core per batch of 32 (docs/benchmarks.md, "eighteenth pass").
  data.cache_decoded = True
  # Read the training split into arrays before the first step (~6 s for the 20k records) and
  # gather each batch by index: the same batches, row for row, without grain's per-element map
  # (a caption pick, two sentencepiece encodes, the float conversion) on a reading thread that
  # contends with the step for the two cores (docs/benchmarks.md, "twenty-seventh pass").
  data.preload = True
  # Stored tokenizer posteriors of the train split (`flowtok data pretokenize`; str): the flowtok
  # stage then reads them instead of encoding images. None: encode on the fly.
  data.latents_dir = None
  data.folder = None  # image_caption_folder: folder with images + captions.jsonl (str).
  data.folder_val_fraction = 0.05  # image_caption_folder: share of the images put in split 'val'.
  # Captioned-shapes builder knobs (ignored for other datasets).
  data.shapes = ml_collections.ConfigDict()
  data.shapes.seed = 0  # Rendering seed: same seed -> byte-identical dataset.
  data.shapes.num_train = 20_000  # Examples in train.
  data.shapes.num_val = 1_000  # Examples in val.
  data.shapes.num_test = 1_000  # Examples in test.
  data.shapes.num_compositional = 1_000  # Examples in compositional (each has >= 1 held-out pair).
  data.shapes.two_object_fraction = 0.5  # Share of two-object scenes.
  data.shapes.heldout = ("purple triangle", "cyan circle", "yellow square")  # Never in train.
  data.shapes.paraphrase_prob = 0.3  # Chance that each optional caption slot is paraphrased.

  # --- Text tokenizer: sentencepiece trained in-process on the training captions. ---
  text = config.text_tokenizer = ml_collections.ConfigDict()
  # BPE at 128 learns every caption word as one piece (<= 13 tokens + EOS per shapes caption);
  # unigram stalls near 55 pieces on this closed grammar and truncates most captions at L = 16.
  text.vocab_size = 128  # Requested vocabulary (pad/unk/bos/eos included).
  text.model_type = "bpe"  # sentencepiece model type: unigram | bpe | word | char.
  text.lowercase = True  # Case-fold all text, so "A Red Circle" encodes like "a red circle".
  text.num_captions = 2_000  # Captions it trains on (BPE-128 on 2k covers all 20k, no <unk>).
  # A trained .model file for `flowtok train` on one stage (None: W/text_tokenizer.model or
  # W/../text_tokenizer.model; `flowtok demo` trains it into W).
  text.path = None

  # --- Models (SPEC §1), demo-sized. K = L = data.max_text_len; widths shared by reference. ---
  config.model_dtype = "float32"  # Compute dtype: float32 | bfloat16 (bf16 is slower on CPU).

  ct = config.clip_text = ml_collections.ConfigDict()  # CLIP text tower, pretrained in the demo.
  ct.vocab_size = text.get_ref("vocab_size")  # Token ids (the sentencepiece vocabulary).
  ct.max_len = data.get_ref("max_text_len")  # L: context length (= image tokens K).
  ct.width = 128  # D: feature width read by the text VAE, alignment MLP, tokenizer decoder.
  ct.depth = 2  # Causal pre-LN transformer layers.
  ct.heads = 4  # Attention heads.
  ct.mlp_ratio = 4.0  # MLP hidden = mlp_ratio · width.
  ct.act = "gelu"  # MLP activation: quick_gelu (OpenAI weights) | gelu.
  ct.pad_id = 0  # Padding id; contrastive pooling reads the last non-pad token (EOS).

  ci = config.clip_image = ml_collections.ConfigDict()  # Image tower for CLIP pretraining only.
  ci.image_size = data.get_ref("image_size")  # Pixels per side.
  ci.patch_size = 8 if arg.res >= 64 else 4  # Patch side.
  ci.width = 128  # ViT width.
  ci.depth = 2  # ViT layers.
  ci.heads = 4  # Attention heads.
  ci.embed_dim = 128  # Shared text-image embedding of the contrastive loss.

  tok = config.tokenizer = ml_collections.ConfigDict()  # FlowTiTok 1D VAE tokenizer.
  tok.image_size = data.get_ref("image_size")  # Pixels per side.
  # Patch side; grid = image_size / patch_size (4 x 4). Patch 16 halves the step against 8 (16
  # patch tokens, not 64) and trains 2x the steps in the time. Alone its outcome swung with the
  # run (parser acceptance 0.50-0.81 over six runs of ~3400 steps): some runs sat on the
  # all-black plateau for 1000+ steps. With the posterior-noise warm-up (tokenizer_stage, below)
  # every run left it by step ~400: 0.69-0.85, mean 0.76 over four seeds, against patch 8's
  # 0.62-0.70 over seven fresh clones (docs/benchmarks.md, "fifteenth pass").
  tok.patch_size = arg.res // 4
  tok.encoder_size = None  # small | base | large, or None: the explicit values below.
  tok.encoder_width = 128  # Encoder width.
  tok.encoder_depth = 2  # Encoder layers.
  tok.encoder_heads = 4  # Encoder heads (head dim must be a multiple of 4 for 2D RoPE).
  tok.decoder_size = None  # small | base | large, or None: the explicit values below.
  tok.decoder_width = 128  # Decoder width.
  tok.decoder_depth = 2  # Decoder layers.
  tok.decoder_heads = 4  # Decoder heads.
  tok.num_tokens = data.get_ref("max_text_len")  # K: latent tokens (= text length L).
  tok.token_channels = 8  # C: channels per token (the paper uses 16 for 256 px photos).
  # SwiGLU hidden = int(2/3 · mlp_ratio · width); FlowTiTok's is 4. At width 128 the MLPs were
  # 2/3 of the step's FLOPs: ratio 2 runs 2.6 steps/s against 1.95, and at the same 560 steps its
  # reconstructions pass the parser as often (0.340 vs 0.328 on val) in 45 s less, which FlowTok
  # gets (ratio 1 was worse: 0.305 at 790 steps; docs/benchmarks.md, "sixth pass").
  tok.mlp_ratio = 2.0
  tok.text_aware = True  # Decoder also reads the CLIP text features (TA-TiTok).
  tok.text_width = ct.get_ref("width")  # D of those text features.
  tok.text_len = ct.get_ref("max_len")  # L of those text features.
  tok.logvar_min = -30.0  # Posterior logvar clip, lower end.
  tok.logvar_max = 20.0  # Posterior logvar clip, upper end.
  tok.latent_scale = None  # Flow works on z · scale; None: 1/std of the trained latents.
  # Learned absolute positions on patch/mask tokens (TA-TiTok style; not in FlowTiTok, whose
  # RoPE-only patches suit deep towers). With 2 + 2 layers, RoPE alone gives the values no
  # position and the tokenizer learned ~3x slower: 0.04 vs 0.35 parser acceptance of val
  # reconstructions at 500 steps (docs/benchmarks.md, "Demo").
  tok.patch_pos_embed = True
  # A GELU layer of width 512 before the decoder's pixel head (None: FlowTiTok's linear head).
  # At patch 16 the linear head writes each 16 x 16 x 3 patch (768 values) from 128 features,
  # so its patches span at most 128 dimensions; most parser misses were shapes drawn as their
  # neighbours (small circles as squares). Paired by seed at 4025 steps (+8 % step time):
  # PSNR +0.3 to +2.0 dB in all six runs; parser 0.895 / 0.844 / 0.813 -> 0.879 / 0.867 / 0.879
  # (stage alone) and 0.883 / 0.824 / 0.746 -> 0.914 / 0.883 / 0.715 (whole demo), whose I2T
  # test read 0.605 / 0.516 / 0.570 -> 0.621 / 0.602 / 0.438 (docs/benchmarks.md, "nineteenth
  # pass"). At patch 8 (192 values per patch) a hidden layer of 256 did not help ("eleventh").
  tok.pixel_head_hidden = 512

  disc = config.discriminator = ml_collections.ConfigDict()  # PatchGAN (optional GAN loss).
  disc.channels = 32  # Stem width; stages use up to 4x this.
  disc.num_stages = 3  # Downsampling stages (each halves the resolution).
  disc.groups = 8  # GroupNorm groups.

  tv = config.text_vae = ml_collections.ConfigDict()  # CLIP features -> text-token posterior.
  tv.width = ct.get_ref("width")  # D (= CLIP width).
  tv.depth = 2  # Post-LN transformer layers.
  tv.heads = 4  # Attention heads.
  tv.ffn_dim = 256  # ReLU FFN hidden size.
  tv.dropout = 0.1  # Dropout on attention probabilities, attention output and FFN.
  tv.token_channels = tok.get_ref("token_channels")  # C.

  am = config.align_mlp = ml_collections.ConfigDict()  # Target of the alignment loss.
  am.hidden = 128  # Hidden width of the D -> hidden -> hidden -> C SiLU MLP.
  am.token_channels = tok.get_ref("token_channels")  # C.

  td = config.text_decoder = ml_collections.ConfigDict()  # I2T: text tokens -> id logits.
  td.width = ct.get_ref("width")  # Model width (= CLIP width).
  td.depth = 2  # Post-LN transformer layers.
  td.heads = 4  # Attention heads.
  td.ffn_dim = 256  # ReLU FFN hidden size.
  td.dropout = 0.1  # Dropout rate.
  td.vocab_size = text.get_ref("vocab_size")  # Output vocabulary.
  td.max_len = data.get_ref("max_text_len")  # Positions (learned table).

  fl = config.flow = ml_collections.ConfigDict()  # FlowTok DiT over K x C tokens.
  fl.variant = None  # S | B | L | XL | H, or None: the explicit depth/width/heads below.
  fl.depth = 4  # DiT blocks.
  fl.width = 192  # Model width.
  fl.heads = 4  # Attention heads.
  fl.mlp_ratio = 4.0  # GELU-tanh MLP hidden = mlp_ratio · width.
  fl.num_tokens = tok.get_ref("num_tokens")  # K.
  fl.channels = tok.get_ref("token_channels")  # C.
  fl.two_directions = True  # Direction embedding: one model for T2I and I2T.
  fl.remat = False  # Rematerialise DiT blocks in the backward pass.

  # --- Training loop (train/loop.py), shared by every stage; per-stage changes in `stages`. ---
  tr = config.train = ml_collections.ConfigDict()
  tr.stage = "flowtok"  # Stage `flowtok train` runs: clip | tokenizer | flowtok.
  tr.batch_size = 32  # Global batch (all hosts); must divide by mesh data x fsdp.
  tr.total_steps = 2000  # Optimizer steps of the run.
  tr.log_every_steps = 50  # Metrics to host, metrics.jsonl and TensorBoard.
  tr.eval_every_steps = 500  # Evaluators (scores, grids, captions), also at the end (0: never).
  tr.ckpt_every_steps = 500  # Checkpoints (plus one at the end and on SIGTERM/SIGINT).
  tr.ema_decay = 0.999  # EMA of trainable params (None: no EMA, evaluators use raw params).
  tr.peak_flops_per_device = None  # FLOP/s for perf/mfu; None: measured matmul peak at start.
  tr.progress_bar = True  # Process 0: tqdm bar with ETA (a line every 30 s when not a terminal).
  tr.compilation_cache_dir = None  # Persistent XLA cache: resumes skip compiling (None: off).

  op = config.optim = ml_collections.ConfigDict()  # AdamW (train/optim.py).
  op.name = "adamw"  # adamw | muon (Muon on hidden transformer matrices, AdamW on the rest).
  op.muon_ns_steps = 5  # Newton-Schulz iterations per Muon update.
  op.muon_include = optim.MUON_INCLUDE  # Kernels Muon updates (in FlowTok: the DiT's).
  op.lr = 4e-4  # Peak learning rate.
  op.warmup_steps = 100  # Linear warm-up from 0.
  op.schedule = "constant"  # After warm-up: constant | cosine (down to end_lr at total_steps).
  op.end_lr = 0.0  # Final learning rate of the cosine.
  op.b1 = 0.9  # Adam beta1.
  op.b2 = 0.95  # Adam beta2.
  op.eps = 1e-8  # Adam epsilon.
  op.weight_decay = 0.03  # Decoupled weight decay (masked, below).
  op.decay_exclude = optim.DEFAULT_DECAY_EXCLUDE  # Path regexes never decayed (+ all ndim < 2).
  op.clip_norm = None  # Global-norm gradient clipping (None: off).

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)  # Sizes of mesh axes (data, fsdp, tensor); -1 = the rest.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = None  # ((logical, mesh axes), ...); None: models/layers.py table.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.max_to_keep = 2  # Newest checkpoints kept in W/checkpoints.
  config.checkpoint.async_save = True  # Write checkpoints in the background.
  config.init = ml_collections.ConfigDict()
  config.init.params_from = None  # Workdir to copy trainable params from (params only) at step 0.
  config.init.clip_from = None  # Workdir of the clip stage: its text tower is frozen later.
  config.init.tokenizer_from = None  # Workdir of the tokenizer stage (encoder frozen in flowtok).

  # Stage-specific knobs (every key and its comment: train/stages.py stage_defaults()).
  config.update(stages_lib.stage_defaults())
  # Three quarters of the examples flow image -> text, the rest text -> image: one model, one step,
  # both ways. Chosen on val with the demo's CLIP and tokenizer (330 steps): p_i2t 0.5 -> 0.75
  # took I2T exact from 0.078 to 0.133 (parse rate 0.67 -> 0.81) while T2I, which this budget
  # leaves near zero either way, went from 0.004 to 0.000 (docs/benchmarks.md, "fourth pass").
  config.flowtok_stage.p_i2t = 0.75
  # The decoder's input noise ramps from 0 to the posterior's σ over the first 500 tokenizer
  # steps. At init σ ~ 1 buries the latents' signal; at patch 16, two runs in six left the
  # all-black plateau only after 1000+ steps (parser 0.50 and 0.22 at 3450 steps; a longer lr
  # warm-up did not prevent it). With the ramp all four seeds left it by step ~400 and read
  # 0.69-0.85 (docs/benchmarks.md, "fifteenth pass"). The KL always reads the full posterior.
  config.tokenizer_stage.noise_warmup_steps = 500
  # Pixels on or within 3 px of an object count 3x in the reconstruction loss (the mean weight
  # stays 1). Objects cover a tenth of these mostly-black images, and the parser's misses were
  # small objects drawn as another shape: the background inside a disc's box is where a disc and
  # a square differ, and the dilation reaches it. Paired by seed at 4025 steps: parser 0.879 /
  # 0.867 / 0.879 -> 0.918 / 0.930 / 0.906, PSNR +0.5 / +1.1 / +0.8 dB (stage alone); whole
  # demos: see docs/benchmarks.md, "twentieth pass". Step time unchanged.
  config.tokenizer_stage.object_weight = 3.0
  # Text-decoder CE × 10: with the released KL (0.01, summed over the batch) the text tokens
  # kept ~10 nats and the text VAE + decoder round trip read back only 0.41 of test captions from
  # the posterior mean; × 10 keeps ~60 nats and reads back 0.93 (the KL still keeps σ ≈ 1 noise
  # on the unused dims, the T2I source's randomness).
  config.flowtok_stage.dec_weight = 10.0
  # I2T times drawn near 0 (sigmoid(N(-3, 1)): 79 % below t = 0.1; T2I keeps SPEC's N(0, 1)).
  # I2T starts from the image's tokens and a trained velocity reads the caption off x_t for any
  # t > 0.25, so the map it must learn is at t ~ 0, where SPEC's draw rarely lands (1.4 % below
  # 0.1). Measured on the demo's own tokenizer, 360 steps: I2T exact 0.004 -> 0.047, parse rate
  # 0.41 -> 0.65, BLEU-4 0.20 -> 0.32 (docs/benchmarks.md, "Demo").
  config.flowtok_stage.i2t_t_loc = -3.0
  # I2T examples flow to the text posterior mean, not to a sample z_T (SPEC §3 samples; T2I
  # keeps its sampled source). At t ~ 0 the I2T velocity is a map from the image's tokens to the
  # caption's, and the sample's σ ~ 1 noise, half of the target's variance, cannot be predicted
  # from the image: it only made the gradient noisier. Paired by seed on the same three
  # tokenizers (FlowTok stage alone, 2484 steps): I2T test 0.754 / 0.828 / 0.824 -> 0.848 /
  # 0.848 / 0.840, val 0.766 / 0.848 / 0.863 -> 0.832 / 0.863 / 0.891, compositional 0.445 /
  # 0.547 / 0.332 -> 0.613 / 0.578 / 0.359; I2T's flow loss 0.65 -> 0.25-0.34 of its target's
  # variance (docs/benchmarks.md, "twenty-second pass").
  config.flowtok_stage.i2t_target_mean = True

  # --- The demo's wall-clock budget (`flowtok demo` only; DESIGN §5: 15 minutes on 2 cores). ---
  # The last training stage (FlowTok) stops, with a checkpoint, when training would run past
  # total_sec - after_training_sec from the demo's start; the export and evaluation then use
  # that checkpoint and metrics.json says so (flowtok/stopped_by_budget). With fill_last_stage
  # (below) that deadline is where FlowTok ends on every host measured (its learning rate is
  # constant, so any step is a fine place to stop). The time kept for what follows training is
  # margin_sec + after_training_sec / f (f: the host factor, below): export + evaluation took
  # 75-97 s on the slowest host measured (AVX2, f = 1; docs/benchmarks.md) and 33-43 s on the
  # AVX-512 hosts (f = 2.0-3.0) when they read 256 examples per split; all 1000 for I2T and the
  # reconstructions (eval.num) add ~11 s on the EPYC host at its fastest (f = 3), and a fresh
  # clone there at f = 2.14 (the host slower) took 25 + 39 s, so 150 s at f = 1, 91 s at f = 2.14
  # (~25 s to spare there), 77 s at f = 3.
  # The margin covers start-up before the clock starts, the last checkpoint, the report and the
  # host's drift (export + evaluation ran 20-30 % slower within an hour on one host).
  config.budget = ml_collections.ConfigDict()
  config.budget.total_sec = 900.0  # None: no budget.
  config.budget.after_training_sec = 110.0  # Export + evaluation at the reference speed (f = 1).
  config.budget.margin_sec = 40.0  # Not scaled by f.
  # The steps below fit the budget on the slower host measured (AVX2); a faster host trains
  # more. `flowtok demo` times the tokenizer's train step once (budget.timed_stage; 15-19 s
  # with its compile) and records the host factor f = steps/s / reference_steps_per_sec, clipped to
  # [1, max_step_scale], in metrics.json as budget/step_scale: stage s trains 1 + w_s (f - 1)
  # times its steps, w_s from scaled_stages. With these weights a stage's time grows with f but
  # levels off (the tokenizer's at 2.5 x 1150 steps at the reference rate, FlowTok's at 2 x 900),
  # and the guard above ends FlowTok in time.
  # The weights: the tokenizer gains most per second (at f ~1.8: both stages x 1.78 gave parser
  # 0.48, I2T test 0.49; tokenizer x 2.4, FlowTok x 1.78 gave 0.60, 0.47; "tenth pass"). Once
  # the tokens carry the shapes (parser ~0.93), I2T gains from FlowTok's steps: at f = 2.76,
  # FlowTok's weight 0.7 -> 1.0 (2009 -> 2484 steps, ~45 s) took I2T test 0.645 / 0.758 /
  # 0.801 -> 0.754 / 0.828 / 0.824 at seeds 0-2 (compositional 0.35 / 0.46 / 0.27 -> 0.45 /
  # 0.55 / 0.33); the tokenizer's extra steps alone (7000, FlowTok 1530) only 0.527 -> 0.555
  # ("twenty-first pass"). FlowTok 2.0: on the same tokenizer, 4068 steps against 2484 took
  # I2T test 0.754 -> 0.863 and T2I 0.008 -> 0.035 ("twenty-second pass"). At f = 2.0 that is
  # 2709 steps (~90 s more, inside the budget with ~3 min to spare); at f = 2.76 the guard ends
  # FlowTok after ~3000. The tokenizer keeps 2.5: trading its steps for FlowTok's (2.0 / 2.0)
  # lost more I2T than the steps gained (0.754 -> 0.727, same seed). With fill_last_stage
  # (below) FlowTok's weight sets only its ceiling and checkpoint period (3.0: 900 x 7 = 6300
  # steps; at 2.0 the ceiling, 4500, was 5 steps from binding at f 2.22, and a faster host would
  # have stopped short of its deadline); the tokenizer's steps set how the time is split.
  # A stage whose total_steps is set on the command line trains exactly that; scale_steps
  # False: the steps as written, on any host.
  config.budget.scale_steps = True
  config.budget.scaled_stages = ml_collections.ConfigDict(dict(tokenizer=2.5, flowtok=3.0))
  # FlowTok trains until the deadline above (at most its plan at f = max_step_scale, 6300 steps):
  # the time the tokenizer leaves is FlowTok's on every host, instead of ~3 minutes left unused
  # at f ~ 2 (the Xeon's plan; 10.3 minutes at f 2.01 on the EPYC). Both directions still gain
  # from every FlowTok step: on one tokenizer, 2484 -> 4068 steps took I2T test 0.848 -> 0.902
  # and T2I 0.016 -> 0.070 ("twenty-third pass"); at f 1.77 a fresh clone's FlowTok filled 511 s,
  # 4301 steps, where the scaled plan had 2286 (T2I 0.0625, its best). Its learning rate is
  # constant, so where the deadline ends it changes nothing else; a re-run keeps a stage that
  # reached its deadline. False: FlowTok trains its scaled steps (the guard still ends it if they
  # run past the deadline).
  config.budget.fill_last_stage = True
  config.budget.timed_stage = "tokenizer"  # The stage whose train step sets f.
  # Until the twenty-first pass f was the host's matmul peak / 1.2e11 FLOP/s, capped at 2.0. On
  # the Xeon host measured most (AVX-512; the tokenizer at ~12 steps/s in its loop, 4025 steps
  # in 336 s) the peak read 2.3-3.7e11, so the cap always bound there; on an EPYC host whose
  # peak read 4.55e11 the same 4025 steps took 240 s (17.5 steps/s), and the demo 438 s of its
  # 900. The reference keeps the Xeon's plan (f = 2.0: its step, timed, would run ~15 steps/s,
  # by the two hosts' stage times) and the EPYC's timed 21.3 steps/s gives f = 2.8.
  config.budget.reference_steps_per_sec = 7.6
  # Cap on f: 3.0 (tokenizer x 6.0, 6900 steps; FlowTok x 7.0, 6300, which the guard ends
  # earlier on the hosts measured). On the EPYC host at f = 2.76 the plan (6210 / 2484
  # steps) took 739-805 s of stage time as the host's speed drifted (FlowTok 241-311 s for the
  # same steps), inside the guard; against f = 2.0 there (4025 / 1530 steps, three seeds) the
  # tokenizer's bar rose at every seed and I2T test by 0.12-0.25 with weight 0.7 ("twenty-first
  # pass").
  config.budget.max_step_scale = 3.0
  # The plan is fixed by one timing; a host that slows down after it stretches the timed stage
  # and FlowTok gets what is left (a fresh clone timed 18.8 steps/s, its tokenizer's loop then
  # ran 12.1: 5405 steps in 467 s, FlowTok 1901 steps, I2T 0.730). So the tokenizer's loop rate
  # is checked over windows of 15 % of its steps (demo.PaceCheck); one that runs below
  # (1 - replan_tolerance) x loop_share x the timed rate stops it, f is measured again from that
  # rate (over loop_share x the reference) and the plan redone: the tokenizer resumes with the
  # steps of that f (its cosine follows), and the deadline is recomputed. loop_share: the loop's
  # rate is 0.78-0.98 of the timed step's on the fresh clones measured (0.85 typical; the loop
  # adds data, logging and the two cores' other threads: "twenty-seventh pass"); with a
  # tolerance of 0.1, a window below 0.765 x the timed rate re-plans (and only if that saves
  # a window's steps), which the fresh clones measured reached only when their host slowed.
  # None: off.
  config.budget.replan_tolerance = 0.1
  config.budget.loop_share = 0.85

  # --- Evaluation of the exported bundle (evaluation/run_eval.py; never on training images). ---
  ev = config.eval = ml_collections.ConfigDict()
  ev.splits = "test,compositional"  # Splits for T2I (prompts) and I2T (images).
  # Examples per split: all 1000 of val / test / compositional for I2T, the tokenizer's
  # reconstructions and the I2T step choice (below). On 256 a rate near 0.85 reads within ±0.02
  # (one standard error), the size of the bars' gaps; on 1000, ±0.011. Reading all of them
  # costs ~11 s on the EPYC host (the step choice 8 s of it), on the order of FlowTok's last
  # 130 steps ("twenty-sixth pass").
  ev.num = 1000
  # Of those, the prompts T2I generates images for: generating is the evaluation's cost (20
  # Euler steps with guidance, 2x the forward passes): 1000 per split took the evaluation from
  # 42 to 72 s on the EPYC host, 256 from 42 to 44 s.
  ev.t2i_num = 256
  ev.batch_size = 32  # Generation / captioning batch.
  ev.steps = None  # ODE steps (None: the bundle's default, 20 Euler steps).
  ev.cfg_scale = None  # T2I guidance scale (None: the bundle's default).
  ev.frechet_steps = 300  # Training steps of the in-project feature net (Fréchet distance).
  # I2T ODE steps the demo picks for the bundle by exact match on data.eval_split (val; never the
  # reported test / compositional splits), ties to the fewest (None: the bundle's 20). With
  # i2t_t_loc -3 the velocity is trained mostly near t = 0, and long ODEs integrate its errors at
  # later t: one step read 0.078 of 256 val captions exactly, 20 steps 0.012 (docs/benchmarks.md).
  # Every demo since has chosen 1, 20 always the worst (fresh clones on 1000 val: 0.861 / 0.830 /
  # 0.794 / 0.758 and 0.851 / 0.792 / 0.815 / 0.778 at 1 / 2 / 4 / 20); 20 was 20 of the 27 ODE
  # steps the choice ran per image, ~9 s of a slowed host's 25 s export, so it is no longer a
  # candidate (add it back on the command line).
  ev.i2t_steps_candidates = (1, 2, 4)

  # Per-stage changes to `train` / `optim` (merged by stage_api.config_for_stage).
  # Step counts are set by the 15-minute budget on 2 CPU cores, on the slower of the machines
  # measured (docs/benchmarks.md, "Demo"): CLIP 0.42 s, tokenizer 0.51 s, FlowTok 0.60 s per
  # step there at batch 64 (0.44 / 0.36 / 0.48 s on a faster one); at the demo's batch 32 in its
  # loop: tokenizer 0.39 s (mlp_ratio 2; 0.51 s at 4), FlowTok 0.25-0.29 s; plus ~1.5 min of
  # compiles, data and checkpoints and ~1.5 min of export (with the I2T step choice) and
  # evaluation. Only the final checkpoints are evaluated.
  st = config.stages = ml_collections.ConfigDict()
  st.clip = ml_collections.ConfigDict(dict(
      # Contrastive pretraining of the text tower that the tokenizer decoder, text VAE and
      # alignment read (frozen later). Short: random text features already carry every token.
      train=dict(total_steps=100, batch_size=64, ema_decay=None, eval_every_steps=100,
                 ckpt_every_steps=100),
      optim=dict(lr=1e-3, warmup_steps=20, weight_decay=0.1)))
  st.tokenizer = ml_collections.ConfigDict(dict(
      # The bottleneck of quality per CPU-second. Batch 32 (more updates beat bigger batches
      # here); lr 2e-3 after 50 warm-up steps, cosine to 1e-3 (half the peak: at 1680 steps
      # the strict parser acceptance of val reconstructions is 0.699 against 0.637 when the
      # cosine ran to 1e-4, whose low tail stalled it; a constant 2e-3 gave 0.672;
      # docs/benchmarks.md, "twelfth pass"). EMA 0.99 (a window of ~100 steps; 0.99^1150 ~ 1e-5 of
      # the init left): it leaves training unchanged, so it was compared on the same four
      # trajectories (seeds 0-3, 3450 steps): parser 0.852 / 0.816 / 0.688 / 0.699 -> 0.859 /
      # 0.816 / 0.691 / 0.758, PSNR +0.16-0.33 dB; in the fresh-clone demo 0.824 -> 0.832, and
      # I2T test 0.574 -> 0.590 from its tokens (docs/benchmarks.md, "sixteenth pass").
      # 560 steps: fresh-clone demos on the slower machine took 711-843 s at 640 (the host's speed
      # drifts ~20 % within a day), too close to the 900 s budget. At mlp_ratio 2, 730 steps
      # (the time 560 took at 4) gave 0.367, but I2T from its tokens fell (val 0.297 -> 0.254,
      # colour 0.88 -> 0.74: a longer-trained text-aware decoder takes colour from the caption).
      # Patch 16 (above) runs a step in about half the time of patch 8, so 1150 steps here where
      # patch 8 had 560 in the same seconds.
      train=dict(total_steps=1150, batch_size=32, ema_decay=0.99, eval_every_steps=1150,
                 ckpt_every_steps=575),
      optim=dict(lr=2e-3, warmup_steps=50, schedule="cosine", end_lr=1e-3, b2=0.999,
                 weight_decay=1e-4, clip_norm=1.0)))
  st.flowtok = ml_collections.ConfigDict(dict(
      # Both directions, one model, one step. Batch 32: the image-to-text map at t ~ 0 forms
      # with the number of updates, and at batch 32 a step costs half of one at 64 (4.8 vs 2.2
      # steps/s). Chosen on val (I2T exact, 256 images, the demo's CLIP and tokenizer): 64 x 330
      # 0.133, 32 x 560 0.191, 32 x 700 0.297 (EMA 0.99: 0.246), 16 x 1200 0.273 (EMA 0.99), at a
      # similar stage time (docs/benchmarks.md, "fifth pass"); 900 steps, with the 45 s the
      # tokenizer's mlp_ratio 2 saves: 0.328 ("sixth pass"). EMA 0.98: a window of ~50 steps, so
      # the random init is gone (0.98^900 ~ 1e-8) yet the last steps' noise is averaged.
      # No periodic evaluation (eval_every_steps 0): the demo evaluates the exported bundle
      # right after, on 256 test and compositional examples.
      # Muon (3 Newton-Schulz steps) on the DiT blocks' attention and MLP kernels, AdamW on the
      # rest, same lr ("ninth pass"): I2T val 0.285 -> 0.410 (test 0.258 -> 0.328) at ~12 %
      # more time per step (0.248 -> 0.279 s at batch 32). 5 steps: 0.387 at 0.393 s/step;
      # Muon on the text modules too: 0.355; lr 2e-3: 0.355; on the tokenizer: parser 0.31 -> 0.23.
      train=dict(total_steps=900, batch_size=32, ema_decay=0.98, eval_every_steps=0,
                 ckpt_every_steps=450),
      optim=dict(lr=1e-3, warmup_steps=60, name="muon", muon_ns_steps=3)))

  if arg.runlocal:
    tr.update(batch_size=8, total_steps=20, log_every_steps=5, eval_every_steps=10,
              ckpt_every_steps=10)
    op.warmup_steps = 2
    for s in (st.clip, st.tokenizer, st.flowtok):
      s.train.update(total_steps=20, batch_size=8, eval_every_steps=10,
                     ckpt_every_steps=10)
      s.optim.warmup_steps = 2
    # 0.98 / 0.99 over 20 steps would keep 2/3 / 4/5 of the random init.
    st.tokenizer.train.ema_decay = st.flowtok.train.ema_decay = 0.5
    config.tokenizer_stage.noise_warmup_steps = 5  # The full posterior noise for most steps.
    ev.update(num=16, batch_size=8, frechet_steps=20, i2t_steps_candidates=(1, 4))
    config.budget.scale_steps = False  # The few steps above on any host.

  if arg.runlocal:
    data.shapes.num_train = 256
    data.shapes.num_val = 64
    data.shapes.num_test = 64
    data.shapes.num_compositional = 64
    text.num_captions = 256
    ct.update(width=32, depth=1, heads=2)
    ci.update(width=32, depth=1, heads=2, embed_dim=32)
    tok.update(encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32,
               decoder_depth=1, decoder_heads=2, pixel_head_hidden=64)
    disc.update(channels=8, num_stages=2, groups=4)
    tv.update(depth=1, heads=2, ffn_dim=64)
    am.hidden = 32
    td.update(depth=1, heads=2, ffn_dim=64)
    fl.update(depth=2, width=32, heads=2)
  return config
