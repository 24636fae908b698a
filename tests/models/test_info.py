"""Golden parameter counts (jax.eval_shape only), `flowtok info`, config checks, logical axes."""
import contextlib
import io
import json
import os

import flax.linen as nn
import jax
import pytest

from flowtok_jax import cli, config_lib
from flowtok_jax.errors import UserError
from flowtok_jax.models import info, layers

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")

# (DiT alone, DiT + text VAE + alignment MLP) in millions: the paper's models (SPEC §1).
GOLDEN = {"b": (129.5, 153.9), "xl": (673.7, 698.1), "h": (1067.7, 1092.1)}


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_paper_parameter_counts(variant):
  config = config_lib.load(os.path.join(CONFIGS, f"flowtok_{variant}.py"))
  counts = info.param_counts(config, names=("flow", "text_vae", "align_mlp"))
  dit, total = GOLDEN[variant]
  assert abs(counts["params"]["flow"] / 1e6 - dit) / dit < 2e-3
  assert abs(counts["flowtok"] / 1e6 - total) / total < 2e-3
  assert abs(counts["params"]["text_vae"] / 1e6 - 23.67) < 0.01


def test_info_command_prints_one_json_object_for_the_demo():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.main(["info", "--config", os.path.join(CONFIGS, "demo.py:runlocal")])
  result = json.loads(out.getvalue())
  params = result["params"]
  assert set(params) == {"flow", "text_vae", "align_mlp", "text_decoder", "clip_text",
                         "tokenizer_encoder", "tokenizer_decoder", "clip_image", "discriminator"}
  assert all(isinstance(n, int) and n > 0 for n in params.values())
  assert result["flowtok"] == params["flow"] + params["text_vae"] + params["align_mlp"]
  assert result["total"] == sum(params.values())
  # Analytic FLOPs (DESIGN §3: "parameter counts, FLOPs"), the numbers bench and aot use.
  from flowtok_jax import flops  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:runlocal"))
  f = result["flops"]
  assert f["forward_per_example"] == flops.forward_flops(config)
  assert f["flowtok_train_step_per_example"] == flops.train_step_flops(config, 1)["total"]
  assert f["sample"]["steps"] == 20 and f["sample"]["cfg_scale"] == 2.0
  assert f["sample"]["t2i_per_image"] == flops.sample_flops(config)["total"] > 0
  assert f["sample"]["i2t_per_caption"] > 0


def test_unknown_model_dtype_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["info", "--config", os.path.join(CONFIGS, "demo.py:runlocal"),
              "--config.model_dtype=fp8"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err == [
      "flowtok: error: model_dtype must be one of float32, bfloat16, float16, got 'fp8'"]


def test_sections_that_disagree_on_token_shape_are_user_errors():
  config = config_lib.load_module(os.path.join(CONFIGS, "demo.py")).get_config("runlocal")
  info.check_model_config(config)
  # The demo shares K and C by reference: overriding one key moves every section together.
  config_lib.apply_overrides(config, ["flow.channels=6"])
  assert config.tokenizer.token_channels == config.text_vae.token_channels == 6
  info.check_model_config(config)
  section = config.align_mlp.to_dict()
  section["token_channels"] = 3
  config.align_mlp = section
  with pytest.raises(UserError, match="align_mlp.token_channels = 3"):
    info.check_model_config(config)


def test_every_parameter_has_logical_axes_that_map_onto_the_mesh():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:runlocal"))
  allowed = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", None}
  for name, comp in info.component_modules(config).items():
    tree = info.abstract_params(comp)
    boxes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for box in boxes:
      assert isinstance(box, nn.LogicallyPartitioned), f"{name}: unannotated parameter {box}"
      assert len(box.names) == box.value.ndim, f"{name}: {box.names} vs {box.value.shape}"
      assert set(box.names) <= allowed
      nn.logical_to_mesh_axes(box.names, layers.DEFAULT_LOGICAL_RULES)  # No duplicate names.
    # Large kernels name at least one shardable axis (small ones, e.g. the 3×3 RGB conv, may not).
    big = [b for b in boxes if b.value.ndim >= 2 and b.value.size >= 1024]
    assert big and all(any(n is not None for n in b.names) for b in big), name
