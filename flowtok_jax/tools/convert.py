"""Weight import: released PyTorch state dicts -> our Flax parameter trees (`flowtok convert`).

Three kinds of source, each mapped onto the trees of the modules the config builds:

  kind        source file                         trees written (one msgpack file each)
  flowtok     FlowTok-XL.pth / FlowTok-H.pth      flow (DiT), text_vae (`context_encoder`),
                                                  align_mlp (`context_projector` + τ)
  flowtitok   FlowTiTok_512.bin                   tokenizer ({'encoder', 'decoder'}: FlowTiTok)
  clip_text   open_clip ViT-L-14-336 (OpenAI)     clip_text (the text tower; `visual.*` ignored)
  inception   pytorch-fid's FID Inception-v3      inception ({'params', 'batch_stats'}: the
              (pt_inception-2015-12-05-*.pth)     network of evaluation/inception.py; no config)

Every target leaf gets exactly one rule (source keys + a layout transform); the rules come from
the target tree (`jax.eval_shape` of the module init), so a config that disagrees with the
checkpoint fails on the first missing, mis-shaped or unexpected key with a `UserError` naming it
and both shapes. Layout transforms: Linear weight [out, in] -> kernel [in, out] (reshaped to our
DenseGeneral axes, e.g. qkv [W, 3, H, Dh]); Conv2d OIHW -> HWIO; 1×1 convs -> Dense kernels; the
text VAE's separate W_Q/W_K/W_V -> one fused qkv. The pixel head needs no permutation: our
`pixel_shuffle` reads channels in the reference's (p1, p2, c) order.

Output: DIR/<tree>.msgpack = `flax.serialization.msgpack_serialize` of the plain nested dict of
float32 numpy arrays (the `params` collection of that module), plus DIR/convert.json (what was
converted, counts, ignored keys). `load_converted(DIR)` reads them back.

Reading .pth/.bin/.pt needs torch (`pip install torch==2.13.0`, the `torch` extra); a state dict
saved as .npz (name -> array) is read without it, a .safetensors file with `safetensors`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from flowtok_jax.errors import UserError

KINDS = ("flowtok", "flowtitok", "clip_text", "inception")
Shape = tuple[int, ...]
StateDict = Mapping[str, np.ndarray]

# ---------------------------------------------------------------------------------------------
# Reading a state dict.

# Wrappers other trainers put around a state dict, and prefixes DDP / torch.compile add.
_WRAPPER_KEYS = ("state_dict", "model", "module", "nnet", "ema", "params")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(obj: Any) -> dict:
  while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
    obj = next(iter(obj.values()))
  if not isinstance(obj, Mapping):
    raise UserError(f"expected a state dict (name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    for p in _PREFIXES:
      if k.startswith(p):
        k = k[len(p):]
    out[k] = v
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_torch_state_dict(path: str, flag: str = "--src") -> dict[str, np.ndarray]:
  """Reads a .pth/.bin/.pt checkpoint (also an OpenAI TorchScript archive) as float32 numpy;
  errors name the file as `flag`."""
  try:
    with open(path, "rb") as f:
      head = f.read(2)
  except OSError as e:
    raise UserError(f"cannot read {flag} {path}: {e.strerror or e}") from None
  # torch.save writes a zip archive (b"PK"), older versions a pickle (protocol 2+: b"\x80").
  if not (head == b"PK" or head[:1] == b"\x80"):
    raise UserError(f"{flag} {path} is not a PyTorch checkpoint (neither a torch.save zip archive "
                    "nor a pickle)")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"reading {path} needs PyTorch: pip install torch==2.13.0 "
                    "(or the flowtok_jax[torch] extra)") from e
  try:
    if _is_torchscript(path):
      # OpenAI's CLIP .pt files are TorchScript archives, which torch.load(weights_only) refuses.
      obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors, truncated files, non-tensor objects, ...
    raise UserError(f"cannot read {path} as a PyTorch state dict (torch.load, weights_only): "
                    f"{str(e).splitlines()[0]}") from e
  out = {}
  for k, v in _unwrap(obj).items():
    if isinstance(v, torch.Tensor):
      # bf16/fp16 -> float32 is exact; the import always produces float32 parameters.
      out[k] = (v.detach().float() if v.is_floating_point() else v.detach()).cpu().numpy()
  return out


def load_state_dict(path: str, flag: str = "--src") -> dict[str, np.ndarray]:
  """Reads a state dict from .npz (no torch needed), .safetensors, or a torch checkpoint."""
  if not os.path.exists(path):
    raise UserError(f"checkpoint not found: {path}")
  if path.endswith(".npz"):
    try:
      with np.load(path) as f:
        return _unwrap({k: f[k] for k in f.files})
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise UserError(f"{flag} {path} is not a readable .npz state dict: "
                      f"{str(e).splitlines()[0]}") from None
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f"reading {path} needs the safetensors package: pip install "
                      "safetensors") from e
    return _unwrap({k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v
                    for k, v in load_file(path).items()})
  return load_torch_state_dict(path, flag)


# ---------------------------------------------------------------------------------------------
# Rules: how one target leaf is built from source arrays.


@dataclasses.dataclass(frozen=True)
class Rule:
  """Builds one target leaf of shape T from `keys`; `src_shapes(T)` are the shapes they need."""
  keys: tuple[str, ...]
  src_shapes: Callable[[Shape], tuple[Shape, ...]]
  build: Callable[[list, Shape], np.ndarray]


def _prod(s) -> int:
  return int(np.prod(s, dtype=np.int64))


def linear(key: str, n_in: int = 1) -> Rule:
  """torch Linear weight [out, in] -> kernel T = (in dims..., out dims...), n_in leading dims."""
  return Rule((key,), lambda t: ((_prod(t[n_in:]), _prod(t[:n_in])),),
              lambda a, t: a[0].T.reshape(t))


def vector(key: str) -> Rule:
  """A flat torch vector (bias, LN gain) -> any target shape with as many elements."""
  return Rule((key,), lambda t: ((_prod(t),),), lambda a, t: a[0].reshape(t))


def same(key: str, src: Optional[Callable[[Shape], Shape]] = None) -> Rule:
  """Same values, same shape (or `src(T)`, e.g. the reference's [1, 1, W] mask token)."""
  return Rule((key,), lambda t: ((src(t) if src else t),), lambda a, t: a[0].reshape(t))


def conv(key: str) -> Rule:
  """torch Conv2d weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O] (NHWC)."""
  return Rule((key,), lambda t: ((t[3], t[2], t[0], t[1]),),
              lambda a, t: a[0].transpose(2, 3, 1, 0))


def conv1x1(key: str) -> Rule:
  """torch 1×1 Conv2d weight [O, I, 1, 1] -> Dense kernel [I, O] (a per-token linear map)."""
  return Rule((key,), lambda t: ((t[1], t[0], 1, 1),), lambda a, t: a[0][:, :, 0, 0].T)


def fused_linear(keys: Sequence[str]) -> Rule:
  """Separate q/k/v Linear weights [H·Dh, D] -> one kernel [D, n, H, Dh] (n = len(keys))."""
  def build(a, t):
    return np.stack([w.T.reshape(t[0], *t[2:]) for w in a], axis=1)
  return Rule(tuple(keys), lambda t: ((_prod(t[2:]), t[0]),) * len(keys), build)


def fused_vector(keys: Sequence[str]) -> Rule:
  """Separate q/k/v biases [H·Dh] -> one bias [n, H, Dh]."""
  return Rule(tuple(keys), lambda t: ((_prod(t[1:]),),) * len(keys),
              lambda a, t: np.stack([b.reshape(t[1:]) for b in a], axis=0))


def zeros() -> Rule:
  """No source: zeros (the direction embedding, absent from T2I-only checkpoints)."""
  return Rule((), lambda t: (), lambda a, t: np.zeros(t, np.float32))


# ---------------------------------------------------------------------------------------------
# Per-tree tables: regex on the target path ('/'-joined) -> rule maker. The last group of every
# pattern is the leaf name; earlier groups fill the {} in the source key.

Table = Sequence[tuple[str, Callable[..., Rule]]]


def _dense(tmpl: str, n_in: int = 1):
  def make(groups, leaf):
    key = tmpl.format(*groups)
    return linear(f"{key}.weight", n_in) if leaf == "kernel" else vector(f"{key}.bias")
  return make


def _ln(tmpl: str, gain: str = "weight", bias: str = "bias"):
  def make(groups, leaf):
    key = tmpl.format(*groups)
    return vector(f"{key}.{gain}") if leaf == "scale" else vector(f"{key}.{bias}")
  return make


def _one(rule_fn, tmpl: str, **kw):
  return lambda groups, leaf: rule_fn(tmpl.format(*groups), **kw)


def _by_leaf(**rules):
  return lambda groups, leaf: rules[leaf](groups)


_FLOW: Table = (
    (r"x_embedder/(kernel|bias)", _dense("x_embedder")),
    (r"t_embedder/fc1/(kernel|bias)", _dense("t_embedder.mlp.0")),
    (r"t_embedder/fc2/(kernel|bias)", _dense("t_embedder.mlp.2")),
    (r"null_embedder/(embedding)", _one(same, "y_embedder.embedding_table.weight")),
    (r"direction_embedder/(embedding)", lambda g, leaf: zeros()),
    (r"blocks_(\d+)/adaLN/(kernel|bias)", _dense("blocks.{}.adaLN_modulation.1")),
    (r"blocks_(\d+)/attn/qkv/(kernel|bias)", _dense("blocks.{}.attn.qkv")),
    (r"blocks_(\d+)/attn/proj/(kernel|bias)", _dense("blocks.{}.attn.proj", n_in=2)),
    (r"blocks_(\d+)/mlp/(fc1|fc2)/(kernel|bias)", _dense("blocks.{}.mlp.{}")),
    (r"final_layer/adaLN/(kernel|bias)", _dense("final_layer.adaLN_modulation.1")),
    (r"final_layer/linear/(kernel|bias)", _dense("final_layer.linear")),
)

_QKV_VAE = ["layers.{}.attn.W_Q", "layers.{}.attn.W_K", "layers.{}.attn.W_V"]
_TEXT_VAE: Table = (
    (r"layers_(\d+)/attn/qkv/(kernel|bias)", _by_leaf(
        kernel=lambda g: fused_linear([k.format(*g) + ".weight" for k in _QKV_VAE]),
        bias=lambda g: fused_vector([k.format(*g) + ".bias" for k in _QKV_VAE]))),
    (r"layers_(\d+)/attn/proj/(kernel|bias)", _dense("layers.{}.attn.W_O", n_in=2)),
    (r"layers_(\d+)/(norm1|norm2)/(scale|bias)", _ln("layers.{}.{}", "g", "b")),
    (r"layers_(\d+)/ffn/fc1/(kernel|bias)", _dense("layers.{}.feed_forward.ffn_1")),
    (r"layers_(\d+)/ffn/fc2/(kernel|bias)", _dense("layers.{}.feed_forward.ffn_2")),
    (r"out/(kernel|bias)", _dense("linear")),
)

_ALIGN: Table = (
    (r"fc1/(kernel|bias)", _dense("context_projector.0")),
    (r"fc2/(kernel|bias)", _dense("context_projector.2")),
    (r"fc3/(kernel|bias)", _dense("context_projector.4")),
    (r"(logit_scale)", _one(same, "t2t_temperature")),
)

# Pre-LN blocks shared by both tokenizer halves (prefix 'encoder.' / 'decoder.' added by the
# caller) and, with other names, by the CLIP text tower.
_TOK_BLOCKS: Table = (
    (r"blocks_(\d+)/(ln_1|ln_2)/(scale|bias)", _ln("transformer.{}.{}")),
    (r"blocks_(\d+)/attn/qkv/(kernel|bias)", _dense("transformer.{}.attn.qkv")),
    (r"blocks_(\d+)/attn/proj/(kernel|bias)", _dense("transformer.{}.attn.proj", n_in=2)),
    (r"blocks_(\d+)/mlp/(w12|w3)/(kernel|bias)", _dense("transformer.{}.mlp.{}")),
    (r"(ln_pre|ln_post)/(scale|bias)", _ln("{}")),
)

_TOK_ENCODER: Table = _TOK_BLOCKS + (
    (r"patch_embed/(kernel|bias)", _by_leaf(kernel=lambda g: conv("patch_embed.weight"),
                                            bias=lambda g: vector("patch_embed.bias"))),
    # The reference keeps the learned latent tokens on the top-level model, not the encoder.
    (r"(latent_tokens)", lambda g, leaf: same("^latent_tokens")),
    (r"(latent_pos)", _one(same, "latent_token_positional_embedding")),
    (r"out/(kernel|bias)", _by_leaf(kernel=lambda g: conv1x1("conv_out.weight"),
                                    bias=lambda g: vector("conv_out.bias"))),
)

_TOK_DECODER: Table = _TOK_BLOCKS + (
    (r"(mask_token)", _one(same, "mask_token", src=lambda t: (1, 1) + t)),
    (r"latent_embed/(kernel|bias)", _dense("decoder_embed")),
    (r"(latent_pos)", _one(same, "latent_token_positional_embedding")),
    (r"text_proj/(kernel|bias)", _dense("text_guidance_proj")),
    (r"(text_pos)", _one(same, "text_guidance_positional_embedding")),
    (r"pixel_head/(kernel|bias)", _by_leaf(kernel=lambda g: conv1x1("ffn.0.weight"),
                                           bias=lambda g: vector("ffn.0.bias"))),
    (r"conv_out/(kernel|bias)", _by_leaf(kernel=lambda g: conv("conv_out.weight"),
                                         bias=lambda g: vector("conv_out.bias"))),
)

_CLIP_TEXT: Table = (
    (r"token_embedding/(embedding)", _one(same, "token_embedding.weight")),
    (r"(positional_embedding)", _one(same, "positional_embedding")),
    (r"blocks_(\d+)/(ln_1|ln_2)/(scale|bias)", _ln("transformer.resblocks.{}.{}")),
    (r"blocks_(\d+)/attn/qkv/(kernel|bias)", _by_leaf(
        kernel=lambda g: linear(f"transformer.resblocks.{g[0]}.attn.in_proj_weight"),
        bias=lambda g: vector(f"transformer.resblocks.{g[0]}.attn.in_proj_bias"))),
    (r"blocks_(\d+)/attn/proj/(kernel|bias)",
     _dense("transformer.resblocks.{}.attn.out_proj", n_in=2)),
    (r"blocks_(\d+)/mlp/fc1/(kernel|bias)", _dense("transformer.resblocks.{}.mlp.c_fc")),
    (r"blocks_(\d+)/mlp/fc2/(kernel|bias)", _dense("transformer.resblocks.{}.mlp.c_proj")),
    (r"ln_final/(scale|bias)", _ln("ln_final")),
)


def _natural(path: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path)]


def _fmt(s) -> str:
  return "[" + ", ".join(str(int(d)) for d in s) + "]"


def _map_tree(sd: StateDict, target: Mapping[str, Shape], table: Table, prefix: str,
              src_name: str, where: str, consumed: set) -> dict[str, np.ndarray]:
  """Builds every leaf of `target` ('/'-path -> shape) from `sd`, checking each source key."""
  compiled = [(re.compile(p), make) for p, make in table]
  out = {}
  for path in sorted(target, key=_natural):
    shape = tuple(target[path])
    for pat, make in compiled:
      m = pat.fullmatch(path)
      if m:
        break
    else:
      raise UserError(f"{where}/{path} {_fmt(shape)} has no import rule: the model has a "
                      f"parameter the {src_name} format does not provide")
    rule = make(m.groups()[:-1], m.groups()[-1])
    keys = [k[1:] if k.startswith("^") else prefix + k for k in rule.keys]
    arrays = []
    for key, want in zip(keys, rule.src_shapes(shape)):
      if key not in sd:
        raise UserError(f"{src_name}: missing key '{key}' (expected shape {_fmt(want)}) for "
                        f"{where}/{path} {_fmt(shape)}")
      got = tuple(np.shape(sd[key]))
      if got != tuple(want):
        raise UserError(f"{src_name}: key '{key}' has shape {_fmt(got)}, expected "
                        f"{_fmt(want)} for {where}/{path} {_fmt(shape)}")
      arrays.append(np.asarray(sd[key], np.float32))
    # np.array, not ascontiguousarray: the latter turns a scalar (τ) into shape [1].
    out[path] = np.array(rule.build(arrays, shape), dtype=np.float32, order="C")
    consumed.update(keys)
  return out


def _check_fixed_table(sd: StateDict, key: str, want: np.ndarray, src_name: str,
                       what: str) -> None:
  """A stored non-trainable table must be the one our module computes (same grid, size)."""
  got = np.asarray(sd[key], np.float32).reshape(-1, want.shape[-1]) \
      if np.size(sd[key]) == want.size else None
  if got is None:
    raise UserError(f"{src_name}: key '{key}' has shape {_fmt(np.shape(sd[key]))}, expected "
                    f"{_fmt(want.shape)} ({what})")
  # bf16 checkpoints store these tables to ~3 digits; a wrong grid differs by O(1).
  if not np.allclose(got, want, atol=1e-2):
    raise UserError(f"{src_name}: key '{key}' is not the fixed table {what} "
                    f"(max diff {np.max(np.abs(got - want)):.3g})")


# ---------------------------------------------------------------------------------------------
# The three kinds.


@dataclasses.dataclass(frozen=True)
class _Job:
  tree: str  # Output tree (file) name.
  subpath: tuple[str, ...]  # Where in that tree this job's leaves go.
  component: str  # `info.component_modules` name of the module that defines the target.
  table: Table
  prefix: str  # Prefix of this job's source keys.


_JOBS = {
    "flowtok": (_Job("flow", (), "flow", _FLOW, ""),
                _Job("text_vae", (), "text_vae", _TEXT_VAE, "context_encoder."),
                _Job("align_mlp", (), "align_mlp", _ALIGN, "")),
    "flowtitok": (_Job("tokenizer", ("encoder",), "tokenizer_encoder", _TOK_ENCODER, "encoder."),
                  _Job("tokenizer", ("decoder",), "tokenizer_decoder", _TOK_DECODER,
                       "decoder.")),
    "clip_text": (_Job("clip_text", (), "clip_text", _CLIP_TEXT, ""),),
}

# Source keys that carry no parameter of ours: (prefix or exact key, why).
_IGNORED = {
    "flowtok": (("open_clip.", "auxiliary image CLIP of an unused loss"),
                ("open_clip_output.", "auxiliary image CLIP of an unused loss")),
    "flowtitok": (),
    "clip_text": (("visual.", "image tower"), ("text_projection", "pooled projection: unused"),
                  ("logit_scale", "contrastive scale: unused"),
                  ("logit_bias", "contrastive bias: unused"), ("attn_mask", "causal mask buffer"),
                  ("input_resolution", "metadata"), ("context_length", "metadata"),
                  ("vocab_size", "metadata")),
}


def _check_buffers(kind: str, sd: StateDict, modules: Mapping[str, Any], src_name: str,
                   consumed: set) -> None:
  """Validates the fixed tables a reference checkpoint stores as buffers, then marks them used."""
  from flowtok_jax.models import layers  # pylint: disable=g-import-not-at-top
  if kind == "flowtok":
    fc = modules["flow"].cfg
    table = layers.sincos_1d(fc.width, fc.num_tokens)[None]
    _check_fixed_table(sd, "pos_embed", table, src_name,
                       f"1D sin-cos [1, {fc.num_tokens}, {fc.width}]")
    consumed.add("pos_embed")
  elif kind == "flowtitok":
    tc = modules["tokenizer_encoder"].cfg
    for side, width, heads in (("encoder", tc.enc_width, tc.enc_heads),
                               ("decoder", tc.dec_width, tc.dec_heads)):
      cos, sin = layers.rope_2d(width // heads, tc.grid)
      for name, want in (("freqs_cos", cos), ("freqs_sin", sin)):
        key = f"{side}.positional_embedding.{name}"
        if key in sd:  # Non-persistent in some versions: absent is fine.
          _check_fixed_table(sd, key, want, src_name,
                             f"2D RoPE for a {tc.grid}x{tc.grid} grid, image_size "
                             f"{tc.image_size}")
          consumed.add(key)


def target_shapes(kind: str, config) -> tuple[dict[str, dict[str, Shape]], dict[str, Any]]:
  """Per job component: '/'-path -> shape of the module's params (no weights materialised)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import info  # pylint: disable=g-import-not-at-top
  if kind not in _JOBS:
    raise UserError(f"unknown convert kind {kind!r} (known: {', '.join(KINDS)})")
  comps = info.component_modules(config)
  shapes, modules = {}, {}
  for job in _JOBS[kind]:
    tree = nn.meta.unbox(info.abstract_params(comps[job.component]))
    flat = traverse_util.flatten_dict(tree, sep="/")
    shapes[job.component] = {k: tuple(v.shape) for k, v in flat.items()}
    modules[job.component] = comps[job.component].module
  return shapes, modules


def convert_state_dict(kind: str, sd: StateDict, config, src_name: str = "state dict"):
  """Maps a reference state dict onto our trees.

  Args:
    kind: 'flowtok' | 'flowtitok' | 'clip_text'.
    sd: source key -> numpy array (reference names, PyTorch layouts).
    config: ConfigDict with the model sections (`flowtok_jax.models.info.component_modules`).
    src_name: how error messages name the source (usually its file name).
  Returns:
    (trees, report): trees maps an output name ('flow', 'tokenizer', ...) to a nested dict of
    float32 arrays; report lists per-tree parameter counts and the ignored source keys.
  Raises:
    UserError: naming the first missing, mis-shaped or unexpected key, with both shapes.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  shapes, modules = target_shapes(kind, config)
  consumed: set = set()
  flat_trees: dict[str, dict] = {}
  for job in _JOBS[kind]:
    where = "/".join((job.tree,) + job.subpath)
    leaves = _map_tree(sd, shapes[job.component], job.table, job.prefix, src_name, where,
                       consumed)
    dest = flat_trees.setdefault(job.tree, {})
    for path, arr in leaves.items():
      dest["/".join(job.subpath + (path,))] = arr
  _check_buffers(kind, sd, modules, src_name, consumed)
  ignored = []
  for key in sd:
    if key in consumed:
      continue
    why = next((w for p, w in _IGNORED[kind] if key == p or (p.endswith(".") and
                                                             key.startswith(p))), None)
    if why is None:
      raise UserError(f"{src_name}: unexpected key '{key}' {_fmt(np.shape(sd[key]))}: the "
                      f"configured model has no parameter for it (config smaller than the "
                      f"checkpoint, or not a {kind} checkpoint?)")
    ignored.append(key)
  trees = {name: traverse_util.unflatten_dict(flat, sep="/")
           for name, flat in flat_trees.items()}
  report = {"kind": kind,
            "params": {name: int(sum(a.size for a in flat.values()))
                       for name, flat in flat_trees.items()},
            "ignored_keys": _summarise(ignored)}
  return trees, report


def _summarise(keys: Sequence[str]) -> list[str]:
  """Collapses 'visual.*'-style runs so the report stays short."""
  out, seen = [], set()
  for k in keys:
    head = k.split(".")[0] + ".*" if "." in k else k
    if head not in seen:
      seen.add(head)
      out.append(head)
  return out


def check_tree(target: Mapping, params: Mapping, what: str = "params") -> None:
  """Raises UserError on the first leaf (natural path order) missing, unexpected or mis-shaped.

  `target` leaves may be arrays or ShapeDtypeStructs (anything with `.shape`).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  want = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(target, sep="/").items()}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  for path in sorted(set(want) | set(got), key=_natural):
    if path not in got:
      raise UserError(f"{what}: missing {path} (expected shape {_fmt(want[path])})")
    if path not in want:
      raise UserError(f"{what}: unexpected {path} {_fmt(got[path])}")
    if want[path] != got[path]:
      raise UserError(f"{what}: {path} has shape {_fmt(got[path])}, expected "
                      f"{_fmt(want[path])}")


# ---------------------------------------------------------------------------------------------
# Files.


def save_converted(trees: Mapping[str, Any], out_dir: str, meta: Mapping[str, Any]) -> list:
  """Writes OUT/<name>.msgpack per tree and OUT/convert.json; returns the files written."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  files = []
  for name, tree in trees.items():
    path = os.path.join(out_dir, f"{name}.msgpack")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(serialization.msgpack_serialize(tree))
    os.replace(tmp, path)  # Never leave a half-written file under the final name.
    files.append(path)
  info_path = os.path.join(out_dir, "convert.json")
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(dict(meta, trees=sorted(trees)), f, indent=2)
  return files + [info_path]


def load_converted(out_dir: str, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Reads trees written by `save_converted` (all of them, or `names`)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  info_path = os.path.join(out_dir, "convert.json")
  if not os.path.exists(info_path):
    raise UserError(f"{out_dir} holds no converted weights (no convert.json)")
  with open(info_path, encoding="utf-8") as f:
    available = json.load(f)["trees"]
  names = available if names is None else list(names)
  out = {}
  for name in names:
    if name not in available:
      raise UserError(f"{out_dir} has no tree {name!r} (has: {', '.join(available)})")
    path = os.path.join(out_dir, f"{name}.msgpack")
    try:
      with open(path, "rb") as f:
        out[name] = serialization.msgpack_restore(f.read())
    except Exception as e:  # pylint: disable=broad-except  # msgpack's errors vary by version.
      raise UserError(f"{path} is damaged or unreadable ({type(e).__name__}); convert the "
                      "weights again") from None
  return out


def convert(kind: str, config, src: str, out_dir: str) -> dict[str, Any]:
  """`flowtok convert`: read SRC, map it onto the configured model, write OUT (see module doc).

  `config` is unused (may be None) for kind 'inception', whose network has one fixed shape.
  """
  if kind not in KINDS:
    raise UserError(f"unknown convert kind {kind!r} (known: {', '.join(KINDS)})")
  from flowtok_jax import paths  # pylint: disable=g-import-not-at-top
  out_dir = paths.writable_dir(out_dir, "--out")  # Before reading a large source.
  sd = load_state_dict(src)
  if kind == "inception":
    import jax  # pylint: disable=g-import-not-at-top
    from flowtok_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    tree = inception.variables_from_state_dict(sd, src_name=os.path.basename(src))
    trees = {"inception": tree}
    report = {"kind": kind,
              "params": {"inception": int(sum(np.size(a) for a in
                                              jax.tree_util.tree_leaves(tree["params"])))},
              "ignored_keys": inception.ignored_summary(sd)}
  else:
    trees, report = convert_state_dict(kind, sd, config, src_name=os.path.basename(src))
  del sd
  files = save_converted(trees, out_dir, dict(report, source=os.path.abspath(src)))
  return dict(report, files=files)
