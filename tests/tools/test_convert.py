"""Weight import: reference-named numpy state dicts (tiny sizes) -> our trees, and its refusals.

The state dicts are written here from the reference layouts (key names, PyTorch shapes), not
from the converter's tables, so a wrong table entry fails these tests.
"""
import json
import sys

import numpy as np
import pytest
from flax import traverse_util

from flowtok_jax import cli, config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.models import layers
from flowtok_jax.tools import convert

# Tiny paper-shaped config: DiT W=32/H=2/depth 2, text VAE D=24 (3 heads), CLIP D=24, K=L=6,
# C=4, tokenizer 32 px / patch 8 (grid 4), encoder 16/1/2, decoder 32/2/4.
OVERRIDES = [
    "model_dtype=float32", "clip_text.vocab_size=40", "clip_text.max_len=6",
    "clip_text.width=24", "clip_text.depth=2", "clip_text.heads=2",
    "tokenizer.image_size=32", "tokenizer.patch_size=8", "tokenizer.token_channels=4",
    "tokenizer.encoder_width=16", "tokenizer.encoder_depth=1", "tokenizer.encoder_heads=2",
    "tokenizer.decoder_width=32", "tokenizer.decoder_depth=2", "tokenizer.decoder_heads=4",
    "text_vae.depth=2", "text_vae.heads=3", "text_vae.ffn_dim=20", "align_mlp.hidden=12",
    "text_decoder.depth=1", "text_decoder.heads=3", "text_decoder.ffn_dim=20",
    "flow.depth=2", "flow.width=32", "flow.heads=2",
]
K, C, D, W, HEADS = 6, 4, 24, 32, 2


@pytest.fixture(scope="module")
def config():
  return config_lib.load("configs/flowtok.py:runlocal", OVERRIDES)


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def flowtok_sd(seed=0, depth=2):
  """FlowTok.state_dict(): DiT + context_encoder (text VAE) + context_projector, tiny sizes."""
  rng = np.random.default_rng(seed)
  sd = {"t2t_temperature": np.array(2.5, np.float32),
        "pos_embed": layers.sincos_1d(W, K)[None],
        "x_embedder.weight": _rand(rng, W, C), "x_embedder.bias": _rand(rng, W),
        "t_embedder.mlp.0.weight": _rand(rng, W, 256), "t_embedder.mlp.0.bias": _rand(rng, W),
        "t_embedder.mlp.2.weight": _rand(rng, W, W), "t_embedder.mlp.2.bias": _rand(rng, W),
        "y_embedder.embedding_table.weight": _rand(rng, 2, W)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "attn.qkv.weight": _rand(rng, 3 * W, W), b + "attn.qkv.bias": _rand(rng, 3 * W),
               b + "attn.proj.weight": _rand(rng, W, W), b + "attn.proj.bias": _rand(rng, W),
               b + "mlp.fc1.weight": _rand(rng, 4 * W, W), b + "mlp.fc1.bias": _rand(rng, 4 * W),
               b + "mlp.fc2.weight": _rand(rng, W, 4 * W), b + "mlp.fc2.bias": _rand(rng, W),
               b + "adaLN_modulation.1.weight": _rand(rng, 6 * W, W),
               b + "adaLN_modulation.1.bias": _rand(rng, 6 * W)})
  sd.update({"final_layer.linear.weight": _rand(rng, C, W),
             "final_layer.linear.bias": _rand(rng, C),
             "final_layer.adaLN_modulation.1.weight": _rand(rng, 2 * W, W),
             "final_layer.adaLN_modulation.1.bias": _rand(rng, 2 * W)})
  for i in range(2):
    b = f"context_encoder.layers.{i}."
    for n in ("W_Q", "W_K", "W_V", "W_O"):
      sd[b + f"attn.{n}.weight"] = _rand(rng, D, D)
      sd[b + f"attn.{n}.bias"] = _rand(rng, D)
    sd.update({b + "feed_forward.ffn_1.weight": _rand(rng, 20, D),
               b + "feed_forward.ffn_1.bias": _rand(rng, 20),
               b + "feed_forward.ffn_2.weight": _rand(rng, D, 20),
               b + "feed_forward.ffn_2.bias": _rand(rng, D),
               b + "norm1.g": _rand(rng, D), b + "norm1.b": _rand(rng, D),
               b + "norm2.g": _rand(rng, D), b + "norm2.b": _rand(rng, D)})
  sd.update({"context_encoder.linear.weight": _rand(rng, 2 * C, D),
             "context_encoder.linear.bias": _rand(rng, 2 * C),
             "context_projector.0.weight": _rand(rng, 12, D),
             "context_projector.0.bias": _rand(rng, 12),
             "context_projector.2.weight": _rand(rng, 12, 12),
             "context_projector.2.bias": _rand(rng, 12),
             "context_projector.4.weight": _rand(rng, C, 12),
             "context_projector.4.bias": _rand(rng, C)})
  return sd


def flowtitok_sd(seed=1):
  """FlowTiTok.state_dict() at 32 px, patch 8, with its stored RoPE buffers."""
  rng = np.random.default_rng(seed)
  p, g = 8, 4
  sd = {"latent_tokens": _rand(rng, K, 16)}
  for side, w, depth, heads in (("encoder", 16, 1, 2), ("decoder", 32, 2, 4)):
    cos, sin = layers.rope_2d(w // heads, g)
    sd.update({f"{side}.positional_embedding.freqs_cos": cos,
               f"{side}.positional_embedding.freqs_sin": sin,
               f"{side}.latent_token_positional_embedding": _rand(rng, K, w),
               f"{side}.ln_pre.weight": _rand(rng, w), f"{side}.ln_pre.bias": _rand(rng, w),
               f"{side}.ln_post.weight": _rand(rng, w), f"{side}.ln_post.bias": _rand(rng, w)})
    h = layers.swiglu_hidden(w)
    for i in range(depth):
      b = f"{side}.transformer.{i}."
      sd.update({b + "ln_1.weight": _rand(rng, w), b + "ln_1.bias": _rand(rng, w),
                 b + "attn.qkv.weight": _rand(rng, 3 * w, w),
                 b + "attn.qkv.bias": _rand(rng, 3 * w),
                 b + "attn.proj.weight": _rand(rng, w, w), b + "attn.proj.bias": _rand(rng, w),
                 b + "ln_2.weight": _rand(rng, w), b + "ln_2.bias": _rand(rng, w),
                 b + "mlp.w12.weight": _rand(rng, 2 * h, w), b + "mlp.w12.bias": _rand(rng, 2 * h),
                 b + "mlp.w3.weight": _rand(rng, w, h), b + "mlp.w3.bias": _rand(rng, w)})
  sd.update({"encoder.patch_embed.weight": _rand(rng, 16, 3, p, p),
             "encoder.patch_embed.bias": _rand(rng, 16),
             "encoder.conv_out.weight": _rand(rng, 2 * C, 16, 1, 1),
             "encoder.conv_out.bias": _rand(rng, 2 * C),
             "decoder.decoder_embed.weight": _rand(rng, 32, C),
             "decoder.decoder_embed.bias": _rand(rng, 32),
             "decoder.mask_token": _rand(rng, 1, 1, 32),
             "decoder.text_guidance_proj.weight": _rand(rng, 32, D),
             "decoder.text_guidance_proj.bias": _rand(rng, 32),
             "decoder.text_guidance_positional_embedding": _rand(rng, K, 32),
             "decoder.ffn.0.weight": _rand(rng, p * p * 3, 32, 1, 1),
             "decoder.ffn.0.bias": _rand(rng, p * p * 3),
             "decoder.conv_out.weight": _rand(rng, 3, 3, 3, 3),
             "decoder.conv_out.bias": _rand(rng, 3)})
  return sd


def clip_sd(seed=2):
  """open_clip CLIP.state_dict() text side (+ the keys FlowTok does not use)."""
  rng = np.random.default_rng(seed)
  sd = {"token_embedding.weight": _rand(rng, 40, D), "positional_embedding": _rand(rng, K, D),
        "ln_final.weight": _rand(rng, D), "ln_final.bias": _rand(rng, D),
        "text_projection": _rand(rng, D, 8), "logit_scale": np.array(4.6, np.float32),
        "visual.proj": _rand(rng, 16, 8), "visual.conv1.weight": _rand(rng, 16, 3, 4, 4)}
  for i in range(2):
    b = f"transformer.resblocks.{i}."
    sd.update({b + "ln_1.weight": _rand(rng, D), b + "ln_1.bias": _rand(rng, D),
               b + "attn.in_proj_weight": _rand(rng, 3 * D, D),
               b + "attn.in_proj_bias": _rand(rng, 3 * D),
               b + "attn.out_proj.weight": _rand(rng, D, D),
               b + "attn.out_proj.bias": _rand(rng, D),
               b + "ln_2.weight": _rand(rng, D), b + "ln_2.bias": _rand(rng, D),
               b + "mlp.c_fc.weight": _rand(rng, 4 * D, D), b + "mlp.c_fc.bias": _rand(rng, 4 * D),
               b + "mlp.c_proj.weight": _rand(rng, D, 4 * D), b + "mlp.c_proj.bias": _rand(rng, D)})
  return sd


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _targets(kind, config):
  shapes, _ = convert.target_shapes(kind, config)
  return shapes


# ---------------------------------------------------------------------------------------------
# Trees match the modules, and values land where the reference math needs them.


def test_flowtok_trees_match_modules_and_values(config):
  sd = flowtok_sd()
  trees, report = convert.convert_state_dict("flowtok", sd, config)
  targets = _targets("flowtok", config)
  for name in ("flow", "text_vae", "align_mlp"):
    want = {k: np.zeros(s) for k, s in targets[name].items()}
    convert.check_tree(traverse_util.unflatten_dict(want, sep="/"), trees[name], name)
  assert report["ignored_keys"] == []
  flow, vae = _flat(trees["flow"]), _flat(trees["text_vae"])
  np.testing.assert_array_equal(flow["null_embedder/embedding"],
                                sd["y_embedder.embedding_table.weight"])
  np.testing.assert_array_equal(flow["blocks_1/adaLN/kernel"],
                                sd["blocks.1.adaLN_modulation.1.weight"].T)
  np.testing.assert_array_equal(flow["t_embedder/fc2/bias"], sd["t_embedder.mlp.2.bias"])
  # W_Q, W_K, W_V stack in that order on the fused axis.
  for j, n in enumerate(("W_Q", "W_K", "W_V")):
    w = sd[f"context_encoder.layers.1.attn.{n}.weight"]
    np.testing.assert_array_equal(vae["layers_1/attn/qkv/kernel"][:, j].reshape(D, D), w.T)
  np.testing.assert_array_equal(vae["layers_0/norm2/scale"], sd["context_encoder.layers.0.norm2.g"])
  assert float(_flat(trees["align_mlp"])["logit_scale"]) == 2.5


def test_linear_mappings_compute_the_same_outputs(config):
  """x @ W.T + b (torch) equals our DenseGeneral contraction with the mapped kernels."""
  sd = flowtok_sd()
  flow = _flat(convert.convert_state_dict("flowtok", sd, config)[0]["flow"])
  x = np.random.default_rng(3).standard_normal((5, W)).astype(np.float32)
  ref = x @ sd["blocks.0.attn.qkv.weight"].T + sd["blocks.0.attn.qkv.bias"]
  ours = np.einsum("bw,wkhd->bkhd", x, flow["blocks_0/attn/qkv/kernel"]) \
      + flow["blocks_0/attn/qkv/bias"]
  np.testing.assert_allclose(ours.reshape(5, 3 * W), ref, rtol=1e-5, atol=1e-5)
  # The output projection contracts (heads, head_dim) = the reference's (H Dh) flattening.
  hd = x.reshape(5, HEADS, W // HEADS)
  ref = x @ sd["blocks.0.attn.proj.weight"].T + sd["blocks.0.attn.proj.bias"]
  ours = np.einsum("bhd,hdw->bw", hd, flow["blocks_0/attn/proj/kernel"]) \
      + flow["blocks_0/attn/proj/bias"]
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_flowtitok_conv_swiglu_and_pixel_head_layouts(config):
  sd = flowtitok_sd()
  trees, report = convert.convert_state_dict("flowtitok", sd, config)
  tok = _flat(trees["tokenizer"])
  targets = _targets("flowtitok", config)
  assert {k[len("encoder/"):] for k in tok if k.startswith("encoder/")} == \
      set(targets["tokenizer_encoder"])
  assert {k[len("decoder/"):] for k in tok if k.startswith("decoder/")} == \
      set(targets["tokenizer_decoder"])
  # Patch embedding: torch NCHW conv on one 8x8 patch == our HWIO kernel on the NHWC patch.
  rng = np.random.default_rng(4)
  patch = rng.standard_normal((3, 8, 8)).astype(np.float32)
  ref = np.einsum("oihw,ihw->o", sd["encoder.patch_embed.weight"], patch)
  ours = np.einsum("hwio,hwi->o", tok["encoder/patch_embed/kernel"], patch.transpose(1, 2, 0))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
  # SwiGLU: x1 (silu side) is the first half of w12's outputs.
  x = rng.standard_normal((32,)).astype(np.float32)
  h12 = sd["decoder.transformer.1.mlp.w12.weight"] @ x + sd["decoder.transformer.1.mlp.w12.bias"]
  ours = x @ tok["decoder/blocks_1/mlp/w12/kernel"].reshape(32, -1) \
      + tok["decoder/blocks_1/mlp/w12/bias"].reshape(-1)
  np.testing.assert_allclose(ours, h12, rtol=1e-5, atol=1e-4)
  assert tok["decoder/blocks_1/mlp/w12/kernel"].shape[1] == 2
  # 1x1 convs become Dense kernels; channel order (p1, p2, c) is kept for our pixel_shuffle.
  np.testing.assert_array_equal(tok["decoder/pixel_head/kernel"],
                                sd["decoder.ffn.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(tok["encoder/latent_tokens"], sd["latent_tokens"])
  np.testing.assert_array_equal(tok["decoder/mask_token"], sd["decoder.mask_token"][0, 0])
  np.testing.assert_array_equal(tok["decoder/conv_out/kernel"],
                                sd["decoder.conv_out.weight"].transpose(2, 3, 1, 0))
  assert report["ignored_keys"] == []


def test_clip_text_ignores_unused_keys(config):
  sd = clip_sd()
  trees, report = convert.convert_state_dict("clip_text", sd, config)
  clip = _flat(trees["clip_text"])
  assert set(clip) == set(_targets("clip_text", config)["clip_text"])
  assert report["ignored_keys"] == ["text_projection", "logit_scale", "visual.*"]
  q = clip["blocks_1/attn/qkv/kernel"][:, 0].reshape(D, D)  # q = first D rows of in_proj
  np.testing.assert_array_equal(q, sd["transformer.resblocks.1.attn.in_proj_weight"][:D].T)
  np.testing.assert_array_equal(clip["blocks_0/mlp/fc2/kernel"],
                                sd["transformer.resblocks.0.mlp.c_proj.weight"].T)


def test_two_direction_model_gets_zero_direction_embedding():
  cfg = config_lib.load("configs/flowtok.py:runlocal", OVERRIDES + ["flow.two_directions=True"])
  flow = _flat(convert.convert_state_dict("flowtok", flowtok_sd(), cfg)[0]["flow"])
  np.testing.assert_array_equal(flow["direction_embedder/embedding"], np.zeros((2, W)))


# ---------------------------------------------------------------------------------------------
# Refusals name the first bad key and both shapes.


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"),
     r"missing key 'blocks.1.mlp.fc2.bias' \(expected shape \[32\]\)"),
    (lambda sd: sd.update({"final_layer.lin.weight": sd.pop("final_layer.linear.weight")}),
     r"missing key 'final_layer.linear.weight' \(expected shape \[4, 32\]\)"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.weight": np.zeros((96, 16), np.float32)}),
     r"key 'blocks.0.attn.qkv.weight' has shape \[96, 16\], expected \[96, 32\]"),
    (lambda sd: sd.update({"context_encoder.layers.1.norm1.g": np.zeros(25, np.float32)}),
     r"key 'context_encoder.layers.1.norm1.g' has shape \[25\], expected \[24\]"),
    (lambda sd: sd.update({"blocks.2.attn.proj.bias": np.zeros(32, np.float32)}),
     r"unexpected key 'blocks.2.attn.proj.bias' \[32\]"),
    (lambda sd: sd.update({"pos_embed": np.zeros((1, 7, 32), np.float32)}),
     r"key 'pos_embed' has shape \[1, 7, 32\], expected \[1, 6, 32\]"),
])
def test_flowtok_refuses_bad_state_dict(config, edit, match):
  sd = flowtok_sd()
  edit(sd)
  with pytest.raises(UserError, match=match):
    convert.convert_state_dict("flowtok", sd, config, "ckpt.pth")


def test_checkpoint_deeper_than_config_names_first_extra_block(config):
  with pytest.raises(UserError, match=r"unexpected key 'blocks.2.attn.qkv.weight'"):
    convert.convert_state_dict("flowtok", flowtok_sd(depth=3), config)


def test_flowtitok_refuses_other_resolution(config):
  sd = flowtitok_sd()
  cos, _ = layers.rope_2d(8, 8)  # a 64 px (grid 8) checkpoint
  sd["encoder.positional_embedding.freqs_cos"] = cos
  with pytest.raises(UserError, match=r"'encoder.positional_embedding.freqs_cos' has shape "
                                      r"\[64, 8\], expected \[16, 8\]"):
    convert.convert_state_dict("flowtitok", sd, config)


def test_check_tree_names_first_bad_leaf():
  target = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4)}
  with pytest.raises(UserError, match=r"a/kernel has shape \[3, 2\], expected \[2, 3\]"):
    convert.check_tree(target, {"a": {"kernel": np.zeros((3, 2))}, "b": np.zeros(4)})
  with pytest.raises(UserError, match=r"missing b \(expected shape \[4\]\)"):
    convert.check_tree(target, {"a": {"kernel": np.zeros((2, 3))}})
  with pytest.raises(UserError, match=r"unexpected c \[1\]"):
    convert.check_tree(target, {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4),
                                "c": np.zeros(1)})


# ---------------------------------------------------------------------------------------------
# Files and the command line.


def test_cli_convert_writes_loadable_trees(tmp_path, capsys):
  src = tmp_path / "FlowTok-tiny.npz"
  np.savez(src, **flowtok_sd())
  out = tmp_path / "out"
  argv = ["convert", "--kind", "flowtok", "--config", "configs/flowtok.py:runlocal",
          "--src", str(src), "--out", str(out)] + [f"--config.{o}" for o in OVERRIDES]
  assert cli.main(argv) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["params"]["align_mlp"] == D * 12 + 12 + 12 * 12 + 12 + 12 * C + C + 1
  loaded = convert.load_converted(str(out))
  assert sorted(loaded) == ["align_mlp", "flow", "text_vae"]
  np.testing.assert_array_equal(loaded["flow"]["x_embedder"]["kernel"],
                                flowtok_sd()["x_embedder.weight"].T)
  # A bad checkpoint: one error line, exit code 2.
  bad = flowtok_sd()
  del bad["x_embedder.bias"]
  np.savez(src, **bad)
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert "missing key 'x_embedder.bias'" in capsys.readouterr().err


def test_torch_checkpoint_without_torch_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  path = tmp_path / "FlowTok-XL.pth"
  path.write_bytes(b"PK\x03\x04 the start of a torch.save archive")
  with pytest.raises(UserError, match=r"pip install torch==2\.13\.0"):
    convert.load_state_dict(str(path))
  # A file that is no checkpoint at all is named as such, torch or not.
  notes = tmp_path / "notes"
  notes.write_text("my notes")
  with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
    convert.load_state_dict(str(notes))


def test_torch_checkpoint_with_wrapper_prefix_and_bf16(tmp_path, config):
  torch = pytest.importorskip("torch")  # Optional extra: skipped where torch is absent.
  sd = flowtok_sd()
  wrapped = {"state_dict": {"module." + k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}
  wrapped["state_dict"]["module.x_embedder.bias"] = torch.ones(W, dtype=torch.bfloat16)
  path = tmp_path / "FlowTok-tiny.pth"
  torch.save(wrapped, path)
  loaded = convert.load_state_dict(str(path))
  assert loaded["x_embedder.bias"].dtype == np.float32
  trees, _ = convert.convert_state_dict("flowtok", loaded, config)
  np.testing.assert_array_equal(trees["flow"]["x_embedder"]["bias"], np.ones(W))


def test_load_converted_refuses_empty_dir(tmp_path):
  with pytest.raises(UserError, match="no converted weights"):
    convert.load_converted(str(tmp_path))
