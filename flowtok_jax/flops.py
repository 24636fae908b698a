"""Analytic FLOPs of the models, a FlowTok train step and one generated image or caption.

Convention (peers_and_perf §2.4, as MaxText counts): FLOPs = 2 × multiply-adds of the matrix
products only (dense layers, convolutions, the two attention einsums); norms, activations,
softmax and the optimizer update are left out. Causal attention is counted in full, because the
models compute the masked logits too. Training costs 3 × forward for every trained part (the
backward pass is two products per forward product: input and weight gradients) and 1 × forward
for frozen parts, whose activations get no gradient. Rematerialisation is not counted: MFU
reports model FLOPs, not the extra hardware FLOPs remat spends.

Per example, with W the width, N the tokens, m the MLP hidden size, one DiT block costs
N·(8W² + 4Wm + 4NW) + 12W², i.e. the familiar N·(24W² + 4NW) + 12W² at m = 4W; `dit_forward`
adds the embedders and the final layer, so XL at 77 tokens is 69.9 GFLOPs.
"""
from __future__ import annotations

from typing import Any, Optional

from flowtok_jax import flow_matching as fm
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.models import layers
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib

# The flowtok step's trained and frozen components (the keys of `train_step_flops`).
TRAINED = ("flow", "text_vae", "align_mlp", "text_decoder")
FROZEN = ("clip_text", "image_encoder")


def dense(tokens: int, fan_in: int, fan_out: int) -> float:
  """A dense layer on `tokens` rows."""
  return 2.0 * tokens * fan_in * fan_out


def attention_core(tokens: int, width: int) -> float:
  """q·kᵀ and probs·v for full (or masked-causal) self-attention over `tokens`."""
  return 4.0 * tokens * tokens * width


def self_attention(tokens: int, width: int) -> float:
  """Fused qkv projection, the attention core and the output projection."""
  return dense(tokens, width, 3 * width) + attention_core(tokens, width) + dense(
      tokens, width, width)


def dit_block(tokens: int, width: int, mlp_hidden: int) -> float:
  """One adaLN-Zero DiT block (per example): adaLN on the condition, attention, MLP."""
  return (dense(1, width, 6 * width) + self_attention(tokens, width)
          + dense(tokens, width, mlp_hidden) + dense(tokens, mlp_hidden, width))


def dit_forward(fc: flow_lib.FlowConfig) -> float:
  """One velocity-network forward, per example."""
  n, w, c = fc.num_tokens, fc.width, fc.channels
  m = int(w * fc.mlp_ratio)
  embed = dense(n, c, w) + dense(1, fc.freq_dim, w) + dense(1, w, w)
  final = dense(1, w, 2 * w) + dense(n, w, c)
  return embed + fc.depth * dit_block(n, w, m) + final


def dit_forward_formula(depth: int, width: int, tokens: int) -> float:
  """The textbook L·(N·(24W² + 4NW) + 12W²) (blocks only, MLP ratio 4), for comparisons."""
  return depth * (tokens * (24.0 * width**2 + 4.0 * tokens * width) + 12.0 * width**2)


def post_ln_layer(tokens: int, width: int, ffn: int) -> float:
  """One post-LN layer of the text VAE / text decoder: attention and a ReLU FFN."""
  return self_attention(tokens, width) + dense(tokens, width, ffn) + dense(tokens, ffn, width)


def text_vae_forward(cfg: text_lib.TextVAEConfig, length: int) -> float:
  """CLIP features [L, D] -> (mean, logvar) [L, C], per example."""
  return (cfg.depth * post_ln_layer(length, cfg.width, cfg.ffn_dim)
          + dense(length, cfg.width, 2 * cfg.token_channels))


def align_mlp_forward(cfg: text_lib.AlignMLPConfig, length: int, width: int) -> float:
  """D -> hidden -> hidden -> C per token, per example."""
  return (dense(length, width, cfg.hidden) + dense(length, cfg.hidden, cfg.hidden)
          + dense(length, cfg.hidden, cfg.token_channels))


def text_decoder_forward(cfg: text_lib.TextDecoderConfig, length: int, channels: int) -> float:
  """z_T [L, C] -> logits [L, V], per example (the vocabulary projection dominates at V = 49k)."""
  return (dense(length, channels, cfg.width)
          + cfg.depth * post_ln_layer(length, cfg.width, cfg.ffn_dim)
          + dense(length, cfg.width, cfg.vocab_size))


def pre_ln_block(tokens: int, width: int, mlp: str, mlp_ratio: float = 4.0) -> float:
  """Pre-LN transformer block (CLIP, tokenizer); `mlp` 'swiglu' or an activation name."""
  if mlp == "swiglu":
    h = layers.swiglu_hidden(width, mlp_ratio)
    ffn = dense(tokens, width, 2 * h) + dense(tokens, h, width)
  else:
    h = int(width * mlp_ratio)
    ffn = dense(tokens, width, h) + dense(tokens, h, width)
  return self_attention(tokens, width) + ffn


def clip_text_forward(cfg: text_lib.CLIPTextConfig, length: Optional[int] = None) -> float:
  """The causal text tower at `length` tokens (default max_len), per example."""
  n = cfg.max_len if length is None else length
  return cfg.depth * pre_ln_block(n, cfg.width, cfg.act, cfg.mlp_ratio)


def tokenizer_encoder_forward(tc: tok_lib.TokenizerConfig) -> float:
  """image -> (mean, logvar) [K, C], per image: patch conv, grid² + K tokens, projection."""
  g2, w = tc.grid**2, tc.enc_width
  patch = dense(g2, tc.patch_size**2 * 3, w)
  blocks = tc.enc_depth * pre_ln_block(g2 + tc.num_tokens, w, "swiglu", tc.mlp_ratio)
  return patch + blocks + dense(tc.num_tokens, w, 2 * tc.token_channels)


def tokenizer_decoder_forward(tc: tok_lib.TokenizerConfig) -> float:
  """tokens [K, C] (+ text [L, D]) -> image, per image; 3×3 output conv included."""
  g2, w, k = tc.grid**2, tc.dec_width, tc.num_tokens
  seq = g2 + k + (tc.text_len if tc.text_aware else 0)
  inputs = dense(k, tc.token_channels, w) + (
      dense(tc.text_len, tc.text_width, w) if tc.text_aware else 0.0)
  blocks = tc.dec_depth * pre_ln_block(seq, w, "swiglu", tc.mlp_ratio)
  head = dense(g2, w, tc.patch_size**2 * 3) + dense(tc.image_size**2, 9 * 3, 3)
  return inputs + blocks + head


# -- whole configs ------------------------------------------------------------------------------

def _configs(config):
  """The frozen model dataclasses of a full config (as the flowtok stage builds them)."""
  dtype = config.get("model_dtype", "float32")
  out = {
      "flow": flow_lib.FlowConfig.from_config(config.flow, dtype=dtype),
      "text_vae": text_lib.TextVAEConfig.from_config(config.text_vae, dtype=dtype),
      "align_mlp": text_lib.AlignMLPConfig.from_config(config.align_mlp, dtype=dtype),
      "clip_text": text_lib.CLIPTextConfig.from_config(config.clip_text, dtype=dtype),
      "tokenizer": tok_lib.TokenizerConfig.from_config(config.tokenizer, dtype=dtype),
      "text_decoder": None,
  }
  if config.get("text_decoder") is not None:
    out["text_decoder"] = text_lib.TextDecoderConfig.from_config(config.text_decoder,
                                                                 dtype=dtype)
  return out


def _uses_text_decoder(config) -> bool:
  stage = config.get("flowtok_stage")
  weight = stage.get("dec_weight", 1.0) if stage is not None else 1.0
  return bool(weight) and config.get("text_decoder") is not None


def forward_flops(config) -> dict[str, float]:
  """Forward FLOPs per example of every component of a FlowTok config."""
  c = _configs(config)
  ct, tc = c["clip_text"], c["tokenizer"]
  length = ct.max_len
  out = {
      "flow": dit_forward(c["flow"]),
      "text_vae": text_vae_forward(c["text_vae"], length),
      "align_mlp": align_mlp_forward(c["align_mlp"], length, ct.width),
      "clip_text": clip_text_forward(ct),
      "image_encoder": tokenizer_encoder_forward(tc),
      "image_decoder": tokenizer_decoder_forward(tc),
  }
  if c["text_decoder"] is not None:
    out["text_decoder"] = text_decoder_forward(c["text_decoder"], length, c["flow"].channels)
  return out


def train_step_flops(config, batch_size: int, *, pretokenized: bool = False) -> dict[str, float]:
  """FLOPs of one flowtok train step on the global batch, per component and in total.

  Args:
    config: a full FlowTok config (model sections, `flowtok_stage.dec_weight`).
    batch_size: global examples per step.
    pretokenized: the batch carries tokenizer posteriors, so no image encoder runs.
  Returns:
    {'flow', 'text_vae', 'align_mlp', ['text_decoder'], 'clip_text', ['image_encoder'],
     'trained', 'frozen', 'total'}: FLOPs for `batch_size` examples.
  """
  fwd = forward_flops(config)
  out = {}
  for name in TRAINED:
    if name == "text_decoder" and not _uses_text_decoder(config):
      continue
    out[name] = 3.0 * batch_size * fwd[name]
  for name in FROZEN:
    if name == "image_encoder" and pretokenized:
      continue
    out[name] = 1.0 * batch_size * fwd[name]
  out["trained"] = sum(out.get(n, 0.0) for n in TRAINED)
  out["frozen"] = sum(out.get(n, 0.0) for n in FROZEN)
  out["total"] = out["trained"] + out["frozen"]
  return out


def sample_flops(config, *, steps: int = 20, cfg_scale=2.0, sampler: str = "euler",
                 direction: str = "t2i") -> dict[str, float]:
  """FLOPs to generate one image (t2i) or one caption (i2t), per component and in total.

  T2I: CLIP text tower + text VAE + `fm.function_evaluations` DiT forwards (a CFG step counts the
  null pass) + tokenizer decoder. I2T: tokenizer encoder + DiT forwards + text decoder.
  """
  if direction not in ("t2i", "i2t"):
    raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
  fwd = forward_flops(config)
  nfe = fm.function_evaluations(steps, sampler, cfg_scale)
  if direction == "t2i":
    out = {"clip_text": fwd["clip_text"], "text_vae": fwd["text_vae"],
           "flow": nfe * fwd["flow"], "image_decoder": fwd["image_decoder"]}
  else:
    if "text_decoder" not in fwd:
      raise ValueError("captioning needs a text_decoder section")
    out = {"image_encoder": fwd["image_encoder"], "flow": nfe * fwd["flow"],
           "text_decoder": fwd["text_decoder"]}
  out["total"] = sum(out.values())
  out["function_evaluations"] = float(nfe)
  return out


def summary(config) -> dict[str, Any]:
  """Analytic FLOPs of a config (`flowtok info`): forward per example per component, a FlowTok
  train step per example, and one T2I image / I2T caption at the config's sampler settings."""
  sc = config.get("sample") or {}
  steps, cfg, sampler = sc.get("steps", 20), sc.get("cfg_scale", 2.0), sc.get("sampler", "euler")
  out: dict[str, Any] = {
      "forward_per_example": forward_flops(config),
      "flowtok_train_step_per_example": train_step_flops(config, 1)["total"],
      "sample": {"steps": steps, "cfg_scale": cfg, "sampler": sampler,
                 "t2i_per_image": sample_flops(config, steps=steps, cfg_scale=cfg,
                                               sampler=sampler)["total"]}}
  if config.get("text_decoder") is not None:
    out["sample"]["i2t_per_caption"] = sample_flops(config, steps=steps, cfg_scale=cfg,
                                                    sampler=sampler, direction="i2t")["total"]
  return out


def xla_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled program by XLA's cost analysis, or None where the backend gives none.

  Loops (`lax.scan` / `fori_loop` bodies) are counted once by XLA, not once per iteration.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None
