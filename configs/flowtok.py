r"""Paper-scale text-to-image FlowTok (SPEC §1): 77 × 16 tokens, ViT-L/14 text tower, FlowTiTok B/L.

    flowtok info --config configs/flowtok.py:variant=XL
    flowtok train --config configs/flowtok_xl.py --workdir gs://BUCKET/runs/flowtok_xl

Arguments (after a colon): `variant=S|B|XL|H` picks the DiT size (depth/width/heads per SPEC §1);
`runlocal` shrinks every model to a few hundred thousand parameters (CPU smoke runs, tests).
The thin files `flowtok_{s,b,xl,h}.py` load this one with their variant.
"""
import ml_collections

from flowtok_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="XL", runlocal=False)
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
  fl.remat = False  # Rematerialise DiT blocks in the backward pass (memory for FLOPs).

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
  return config
