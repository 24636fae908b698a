"""flops.py: hand-counted golden values, paper-scale anchors, and XLA's count on small models."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest

from flowtok_jax import config_lib, flops
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib
from flowtok_jax.sharding import strip_boxes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_DIT = flow_lib.FlowConfig(depth=2, width=8, heads=2, num_tokens=4, channels=3)


def test_dit_forward_matches_a_hand_count():
  # W = 8, N = 4 tokens, C = 3, MLP 32, 256 timestep frequencies; FLOPs = 2 · multiply-adds.
  embed = 2 * 4 * 3 * 8 + 2 * 256 * 8 + 2 * 8 * 8  # x_embedder, t_embedder fc1, fc2
  block = (2 * 8 * 48  # adaLN: condition -> 6W
           + 2 * 4 * 8 * 24  # qkv
           + 2 * 4 * 4 * 8 * 2  # q·kᵀ and probs·v
           + 2 * 4 * 8 * 8  # attention output projection
           + 2 * 4 * 8 * 32 * 2)  # MLP fc1 + fc2
  final = 2 * 8 * 16 + 2 * 4 * 8 * 3  # adaLN shift/scale, linear to C
  assert embed + 2 * block + final == 19712
  assert flops.dit_forward(TINY_DIT) == 19712


@pytest.mark.parametrize("variant,gflops", [("B", 13.39), ("XL", 69.89), ("H", 110.82)])
def test_paper_dits_match_the_textbook_formula(variant, gflops):
  depth, width, heads = flow_lib.FLOW_SIZES[variant]
  fc = flow_lib.FlowConfig(depth=depth, width=width, heads=heads, num_tokens=77, channels=16)
  # peers_and_perf §2.5: B 13.4, XL 69.9, H 110.8 forward GFLOPs per sample at 77 tokens.
  assert flops.dit_forward(fc) / 1e9 == pytest.approx(gflops, abs=0.01)
  # The blocks are the formula exactly; embedders and the final layer add < 0.1 %.
  assert flops.dit_forward(fc) == pytest.approx(
      flops.dit_forward_formula(depth, width, 77), rel=1e-3)


def test_text_side_hand_counts():
  vae = text_lib.TextVAEConfig(width=8, depth=1, heads=2, ffn_dim=16, token_channels=3)
  layer = 2 * 5 * 8 * 24 + 4 * 5 * 5 * 8 + 2 * 5 * 8 * 8 + 2 * 5 * 8 * 16 * 2
  assert flops.text_vae_forward(vae, 5) == layer + 2 * 5 * 8 * 6
  dec = text_lib.TextDecoderConfig(width=8, depth=1, heads=2, ffn_dim=16, vocab_size=50,
                                   max_len=5)
  assert flops.text_decoder_forward(dec, 5, 3) == 2 * 5 * 3 * 8 + layer + 2 * 5 * 8 * 50
  mlp = text_lib.AlignMLPConfig(hidden=10, token_channels=3)
  assert flops.align_mlp_forward(mlp, 5, 8) == 2 * 5 * (8 * 10 + 10 * 10 + 10 * 3)


def _paper():
  return config_lib.load(f"{REPO_ROOT}/configs/flowtok_xl.py")


def test_train_step_counts_trained_parts_three_times_and_frozen_once():
  config = _paper()
  fwd = flops.forward_flops(config)
  step = flops.train_step_flops(config, 4096)
  assert step["flow"] == 3 * 4096 * fwd["flow"]
  assert step["clip_text"] == 4096 * fwd["clip_text"]
  assert step["image_encoder"] == 4096 * fwd["image_encoder"]
  # The T2I recipe trains no text decoder (dec_weight 0): it is not counted.
  assert "text_decoder" not in step
  assert step["total"] == pytest.approx(sum(step[k] for k in (
      "flow", "text_vae", "align_mlp", "clip_text", "image_encoder")))
  # peers_and_perf §2.5: 209.6 GFLOPs of DiT training per sample, about 248 with the text
  # projector and frozen CLIP (our count adds the alignment MLP and the tokenizer encoder).
  assert step["flow"] / 4096 / 1e9 == pytest.approx(209.7, abs=0.1)
  per_sample = (step["flow"] + step["text_vae"] + step["clip_text"]) / 4096 / 1e9
  assert per_sample == pytest.approx(234.2, abs=0.2)
  pre = flops.train_step_flops(config, 4096, pretokenized=True)
  assert "image_encoder" not in pre and pre["total"] == step["total"] - step["image_encoder"]
  with config.unlocked():
    config.flowtok_stage.dec_weight = 1.0
  both = flops.train_step_flops(config, 4096)
  assert both["text_decoder"] == 3 * 4096 * fwd["text_decoder"]


def test_sample_flops_per_image_and_caption():
  config = _paper()
  fwd = flops.forward_flops(config)
  t2i = flops.sample_flops(config, steps=20, cfg_scale=2.0)
  assert t2i["function_evaluations"] == 40  # 20 Euler steps, CFG's null pass batched in
  assert t2i["flow"] == 40 * fwd["flow"]
  # peers_and_perf §2.5: about 3.1 TFLOPs per FlowTok-XL 256 px image (20 steps, CFG).
  assert t2i["total"] / 1e12 == pytest.approx(3.08, abs=0.01)
  i2t = flops.sample_flops(config, steps=10, cfg_scale=1.0, direction="i2t")
  assert i2t["total"] == fwd["image_encoder"] + 10 * fwd["flow"] + fwd["text_decoder"]


def _xla_flops(fn, *args, compile_: bool = False) -> float:
  """XLA's HLO cost analysis: of the lowered program (fast), or of the compiled one."""
  lowered = jax.jit(fn).lower(*args)
  cost = (lowered.compile() if compile_ else lowered).cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def _params(module, *args, **kw):
  # Shapes are all the cost analysis needs: no weights are created.
  return strip_boxes(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kw)))[
      "params"]


B = 4


def test_dit_within_10_percent_of_xla_forward_and_train():
  fc = dataclasses.replace(TINY_DIT, depth=2, width=64, heads=4, num_tokens=16, channels=8,
                           two_directions=True)
  model = flow_lib.FlowTransformer(fc)
  x, t, i = jnp.ones((B, 16, 8)), jnp.full((B,), 0.5), jnp.zeros((B,), jnp.int32)
  p = _params(model, x, t, i, i)
  fwd = _xla_flops(lambda p, x: model.apply({"params": p}, x, t, i, i), p, x)
  assert fwd / B == pytest.approx(flops.dit_forward(fc), rel=0.10)
  grad = jax.grad(lambda p, x: jnp.mean(model.apply({"params": p}, x, t, i, i) ** 2))
  # The compiled train program too (after XLA's optimisations and fusions).
  assert _xla_flops(grad, p, x, compile_=True) / B == pytest.approx(3 * flops.dit_forward(fc),
                                                                      rel=0.10)


def test_text_and_image_towers_within_10_percent_of_xla():
  # quick_gelu, as the paper's CLIP: XLA counts the erf of exact GELU as ~15 % more FLOPs
  # at this width (elementwise work is not in the model-FLOPs convention).
  ct = text_lib.CLIPTextConfig(vocab_size=100, max_len=16, width=64, depth=1, heads=4,
                               act="quick_gelu")
  tower = text_lib.CLIPTextTower(ct)
  ids = jnp.ones((B, 16), jnp.int32)
  p = _params(tower, ids)
  assert _xla_flops(lambda p: tower.apply({"params": p}, ids), p) / B == pytest.approx(
      flops.clip_text_forward(ct), rel=0.10)

  vc = text_lib.TextVAEConfig(width=64, depth=1, heads=4, ffn_dim=128, token_channels=8)
  vae = text_lib.TextVAE(vc)
  feats = jnp.ones((B, 16, 64))
  p = _params(vae, feats)
  assert _xla_flops(lambda p: vae.apply({"params": p}, feats), p) / B == pytest.approx(
      flops.text_vae_forward(vc, 16), rel=0.10)

  tc = tok_lib.TokenizerConfig(image_size=32, patch_size=8, enc_width=64, enc_depth=1,
                               enc_heads=4, dec_width=64, dec_depth=1, dec_heads=4,
                               num_tokens=16, token_channels=8, text_width=64, text_len=16)
  enc = tok_lib.FlowTiTokEncoder(tc)
  images = jnp.ones((B, 32, 32, 3))
  p = _params(enc, images)
  assert _xla_flops(lambda p: enc.apply({"params": p}, images), p) / B == pytest.approx(
      flops.tokenizer_encoder_forward(tc), rel=0.10)
  dec = tok_lib.FlowTiTokDecoder(tc)
  z = jnp.ones((B, 16, 8))
  p = _params(dec, z, feats)
  assert _xla_flops(lambda p: dec.apply({"params": p}, z, feats), p) / B == pytest.approx(
      flops.tokenizer_decoder_forward(tc), rel=0.10)

  tdc = text_lib.TextDecoderConfig(width=64, depth=1, heads=4, ffn_dim=128, vocab_size=100,
                                   max_len=16)
  tdec = text_lib.TextDecoder(tdc)
  p = _params(tdec, z)
  assert _xla_flops(lambda p: tdec.apply({"params": p}, z), p) / B == pytest.approx(
      flops.text_decoder_forward(tdc, 16, 8), rel=0.10)
