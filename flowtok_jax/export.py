"""`flowtok export`: a trained flowtok-stage workdir -> a self-contained inference bundle.

    flowtok export --workdir runs/demo/flowtok --out runs/demo/bundle \\
        [--dtype bfloat16] [--programs]

The bundle (layout in `inference.py`, which reads it) holds everything serving needs and nothing
of training: the flowtok stage's EMA parameters (DiT, text VAE, alignment MLP, text decoder), the
frozen parts inference needs (CLIP text tower and tokenizer encoder exactly as the run loaded
them, and the tokenizer *decoder*, which the flowtok stage never loads: it comes from the full
tokenizer checkpoint `config.init.tokenizer_from`), the config, the sentencepiece model, the
latent scale, sampler defaults and a format version. `--programs` adds `jax.export`-serialised
T2I and I2T programs with a symbolic batch dimension, runnable without this package.

The bundle is written to a temporary directory beside `--out` and renamed into place, so a
crash never leaves a half-written bundle where a good one was.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowtok_jax import inference
from flowtok_jax import paths
from flowtok_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
# Platforms the exported programs are lowered for, tried in this order of preference; lowering
# falls back to the current backend alone if a multi-platform lowering is refused.
PROGRAM_PLATFORMS = ("cpu", "cuda", "tpu")
T2I_DEFAULTS = {"steps": 20, "cfg_scale": 2.0, "sampler": "euler", "grid": "parity"}
I2T_DEFAULTS = {"steps": 20, "cfg_scale": 1.0, "sampler": "euler", "grid": "parity"}


# -- reading the run -------------------------------------------------------------------------------

def read_run_meta(workdir: str) -> tuple[dict, int]:
  """The metadata (stage, config, ...) and step of a workdir's latest checkpoint.

  Raises:
    UserError: no such directory, no committed checkpoint, or unreadable metadata.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise UserError(f"no workdir at {os.path.abspath(workdir)}")
  ckpt_lib.quiet_orbax()
  directory, step = ckpt_lib.resolve_dir(workdir)
  try:
    mngr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=("meta",), item_handlers={"meta": ocp.JsonCheckpointHandler()})
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read checkpoints in {directory}: {type(e).__name__}") from None
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {workdir} ({_no_checkpoint_hint(workdir)})")
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"checkpoint {directory}/{step} has unreadable metadata "
                      f"({type(e).__name__})") from None
  finally:
    mngr.close()
  if not isinstance(meta, dict) or "config" not in meta:
    raise UserError(f"checkpoint {directory}/{step} has no config in its metadata")
  return dict(meta), int(step)


def _no_checkpoint_hint(workdir: str) -> str:
  """What to do about a workdir without checkpoints: it may be a demo's root or a bundle."""
  if os.path.isfile(os.path.join(workdir, inference.BUNDLE_JSON)):
    return "it is an exported bundle; give the flowtok run it came from"
  if os.path.isdir(os.path.join(workdir, "flowtok", "checkpoints")):
    return f"a demo's workdir? its flowtok run is --workdir {os.path.join(workdir, 'flowtok')}"
  return "train the flowtok stage there first"


def _text_tokenizer_path(config, workdir: str) -> str:
  """Where the flowtok stage found its sentencepiece model (its own lookup)."""
  from flowtok_jax.train import stages  # pylint: disable=g-import-not-at-top
  found, candidates = stages.text_tokenizer_file(config, workdir)
  if found:
    return found
  raise UserError(f"no text tokenizer model for {workdir} (looked for {', '.join(candidates)}); "
                  "copy the run's text_tokenizer.model there")


def _init_get(config, key: str, default=None):
  init = config.get("init")
  return init.get(key, default) if init else default


def _follow_moved_runs(config, workdir: str) -> None:
  """Points `init.clip_from` / `init.tokenizer_from` at the workdir's siblings when the recorded
  paths are gone but a sibling of the same name is there: the runs' parent directory was moved
  or copied (the demo keeps W/clip, W/tokenizer and W/flowtok side by side). The recorded steps
  and the parameter shapes are still checked when they load."""
  init = config.get("init")
  for key in ("clip_from", "tokenizer_from"):
    recorded = init.get(key) if init else None
    if not recorded or os.path.exists(recorded):
      continue
    sibling = os.path.join(os.path.dirname(workdir), os.path.basename(os.path.normpath(recorded)))
    if os.path.isdir(sibling):
      logging.warning("init.%s %s is gone; using %s beside the run (moved?)", key, recorded,
                      sibling)
      init[key] = sibling


def _p_i2t(config) -> float:
  from flowtok_jax.train import stages  # pylint: disable=g-import-not-at-top
  section = config.get("flowtok_stage") or {}
  return float(section.get("p_i2t", stages.stage_defaults().flowtok_stage.p_i2t))


def _i2t_missing(config, params) -> Optional[str]:
  """Why this run cannot caption, or None when it can."""
  if not config.flow.get("two_directions", False):
    return "its DiT has no direction input (flow.two_directions = False)"
  if _p_i2t(config) <= 0:
    return "it was trained text-to-image only (flowtok_stage.p_i2t = 0)"
  if "text_decoder" not in params:
    return "it has no text decoder (flowtok_stage.dec_weight = 0)"
  return None


def _load_run_params(workdir: str, config: ml_collections.ConfigDict,
                     step: Optional[int] = None, pinned: Optional[dict] = None
                     ) -> tuple[dict, list[str]]:
  """EMA params + frozen parts + tokenizer decoder of a flowtok run, as one tree of arrays.

  `step`: the run's checkpoint step to read (None: the latest), the one whose metadata the
  caller read, so a run that saves meanwhile cannot pair one step's config with another's params.

  `pinned`: the checkpoint steps the run recorded for its frozen parts (its metadata's "frozen";
  None for runs that predate it: the latest steps), so the bundle holds what training saw.

  Returns:
    (params {clip_text, text_vae, align_mlp, flow[, text_decoder], tokenizer/{encoder, decoder}},
     names of the parts that had no checkpoint and are random initialisations).
  """
  from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop, stage_api  # pylint: disable=g-import-not-at-top

  # One device is enough to read parameters, whatever topology the run trained on.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (1, 1, 1)}), jax.devices()[:1])
  rules = sharding.logical_rules(config.get("sharding"))
  ctx = stage_api.StageContext(mesh=mesh, rules=rules, workdir=workdir, process_index=0,
                               process_count=1, global_batch_size=int(config.train.batch_size),
                               seed=int(config.seed))
  stage = stage_api.get_builder("flowtok")(config, ctx)
  for part in stage.frozen:
    if part.checkpoint and not os.path.exists(part.checkpoint):
      raise UserError(f"the run's frozen {part.name} came from {part.checkpoint}, which is gone "
                      "(config.init.*_from): export needs it")
  batch1 = loop.example_batch_1(stage)
  init = lambda r: stage.init(r, {k: jnp.asarray(v) for k, v in batch1.items()})
  target, _ = sharding.abstract_with_shardings(init, mesh, rules, jax.random.PRNGKey(0))
  # The step whose metadata was read, even if the run has saved a newer one since.
  params, _ = ckpt_lib.load_params(ckpt_lib.pin(workdir, step), target, use_ema=True)
  # The frozen parts exactly as training saw them (same loader, same seeds when random).
  frozen, _, sources = loop.load_frozen(stage, batch1, mesh, rules, int(config.seed),
                                        pinned=pinned)
  random_parts = [p.name for p in stage.frozen if not p.checkpoint]

  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer,
                                           dtype=config.get("model_dtype", "float32"))
  decoder = tok_lib.FlowTiTokDecoder(tc)
  z1 = jnp.zeros((1, tc.num_tokens, tc.token_channels), jnp.float32)
  f1 = jnp.zeros((1, tc.text_len, tc.text_width), jnp.float32) if tc.text_aware else None
  dec_init = lambda r: decoder.init(r, z1, f1)["params"]
  tokenizer_from = _init_get(config, "tokenizer_from")
  if tokenizer_from:
    select = tuple(_init_get(config, "tokenizer_select", ()) or ()) + ("decoder",)
    dec_target, _ = sharding.abstract_with_shardings(dec_init, mesh, rules,
                                                     jax.random.PRNGKey(0))
    # The decoder of the very tokenizer step whose encoder the run trained with.
    dec_params, _ = ckpt_lib.load_params(
        ckpt_lib.pin(tokenizer_from, sources.get("image_encoder")), dec_target, select=select)
  else:
    logging.warning("config.init.tokenizer_from is unset: the bundle's tokenizer decoder is a "
                    "random initialisation (images will be noise)")
    dec_params, _ = sharding.born_sharded(dec_init, mesh, rules,
                                          jax.random.fold_in(jax.random.PRNGKey(0), 2000))
    random_parts.append("tokenizer_decoder")
  out = dict(params)
  out["clip_text"] = frozen["clip_text"]
  out["tokenizer"] = {"encoder": frozen["image_encoder"], "decoder": dec_params}
  return jax.device_get(out), random_parts


def _first_non_finite(params) -> Optional[str]:
  """The '/'-joined path of the first floating leaf holding a NaN or inf (None: all finite)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      return "/".join(str(getattr(k, "key", k)) for k in path)
  return None


def _cast(params, dtype: str):
  """Floating leaves to `dtype` (numpy); integer leaves unchanged."""
  want = jnp.dtype(dtype)
  def one(x):
    x = np.asarray(x)
    return x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(one, params)


# -- programs --------------------------------------------------------------------------------------

def _check_serialisable():
  try:
    import flatbuffers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError("exporting programs needs the 'flatbuffers' package (jax.export "
                    "serialisation): pip install flatbuffers") from None


def _lower(fn, args, name: str):
  """`jax.export` for every platform in PROGRAM_PLATFORMS, else the current backend only."""
  try:
    return jax.export.export(jax.jit(fn), platforms=PROGRAM_PLATFORMS)(*args)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("%s program: multi-platform lowering failed (%s: %s); exporting for %s only",
                    name, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                    jax.default_backend())
    return jax.export.export(jax.jit(fn))(*args)


def export_programs(models: inference.Models, params, *, t2i: Optional[dict],
                    i2t: Optional[dict]) -> dict[str, tuple[bytes, dict]]:
  """Serialised T2I / I2T programs with a symbolic batch `b` and the parameters as an argument.

  Args:
    models: the bundle's modules.
    params: the bundle's parameter tree (dtypes as stored).
    t2i, i2t: sampler knobs {steps, sampler, grid} of each program, or None to skip it.
  Returns:
    name -> (serialised bytes, description for bundle.json).
  """
  _check_serialisable()
  (b,) = jax.export.symbolic_shape("b")
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params)
  cfg = jax.ShapeDtypeStruct((), jnp.float32)
  out = {}
  if t2i:
    knobs = {k: t2i[k] for k in ("steps", "sampler", "grid")}
    fn = lambda p, ids, seeds, g: inference.text_to_image(models, p, ids, seeds, g, **knobs)
    exp = _lower(fn, (specs, jax.ShapeDtypeStruct((b, models.text_len), jnp.int32),
                      jax.ShapeDtypeStruct((b,), jnp.uint32), cfg), "t2i")
    out["t2i"] = (exp.serialize(), dict(knobs, platforms=list(exp.platforms), call=(
        "call(params, ids int32 [b, L], seeds uint32 [b], cfg_scale float32 []) -> "
        "uint8 images [b, S, S, 3]")))
  if i2t:
    knobs = {k: i2t[k] for k in ("steps", "sampler", "grid")}
    s = models.image_size
    fn = lambda p, images, g: inference.image_to_text(models, p, images, g, **knobs)
    exp = _lower(fn, (specs, jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32), cfg), "i2t")
    out["i2t"] = (exp.serialize(), dict(knobs, platforms=list(exp.platforms), call=(
        "call(params, images float32 [b, S, S, 3] in [0, 1], cfg_scale float32 []) -> "
        "int32 ids [b, L] (cut at bundle.json's text_tokenizer.eos_id; detokenize with "
        "the bundle's text tokenizer)")))
  return out


# -- writing ---------------------------------------------------------------------------------------

def _prepare_out(out: str) -> str:
  out = paths.writable_dir(out, "--out")
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(
      os.path.join(out, inference.BUNDLE_JSON)):
    raise UserError(f"--out {out} is a non-empty directory that is not a bundle; "
                    "refusing to overwrite it")
  if os.path.isdir(out):
    # Replacing a bundle replaces the whole directory: anything else in it (an evaluation
    # written there with `flowtok eval --out BUNDLE/...`) would go with it.
    owned = {inference.BUNDLE_JSON, inference.CONFIG_JSON, inference.PARAMS_FILE,
             inference.TOKENIZER_FILE, *inference.PROGRAM_FILES.values()}
    foreign = sorted(set(os.listdir(out)) - owned)
    if foreign:
      raise UserError(f"--out {out} holds files a new export would delete "
                      f"({', '.join(foreign)}); move them or choose another --out")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  return out


def _replace_dir(tmp: str, out: str):
  """Moves the finished bundle into place (an old bundle is removed only afterwards)."""
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out)


def export_bundle(workdir: str, out: str, *, dtype: str = "float32", programs: bool = False,
                  steps: Optional[int] = None, sampler: Optional[str] = None,
                  grid: Optional[str] = None, i2t_steps: Optional[int] = None
                  ) -> dict[str, Any]:
  """Writes the inference bundle of a trained flowtok-stage workdir.

  Args:
    workdir: the flowtok stage's run directory (its latest checkpoint is exported).
    out: bundle directory (replaced atomically if it already holds a bundle).
    dtype: parameter dtype in the bundle: float32 | bfloat16.
    programs: also write `jax.export` T2I / I2T programs.
    steps, sampler, grid: sampler defaults recorded in the bundle and used by the programs
      (None: 20 Euler steps on the parity grid).
    i2t_steps: image-to-text steps, where they differ from `steps` (e.g. chosen on held-out
      images: `evaluation.run_eval.select_i2t_steps`).
  Returns:
    A summary: bundle path, step, dtype, size in bytes, capabilities, sampler defaults,
    programs.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if programs:
    _check_serialisable()
  t2i_knobs, i2t_knobs = dict(T2I_DEFAULTS), dict(I2T_DEFAULTS)
  for knobs in (t2i_knobs, i2t_knobs):
    knobs.update({k: v for k, v in (("steps", steps), ("sampler", sampler)) if v is not None})
    if knobs is i2t_knobs and i2t_steps is not None:
      knobs["steps"] = i2t_steps
    knobs["grid"] = inference.check_knobs(
        knobs["steps"], knobs["cfg_scale"], knobs["sampler"],
        grid or (knobs["grid"] if knobs["sampler"] == "euler" else None))
  workdir = paths.local(workdir, "--workdir")
  out = _prepare_out(out)
  meta, step = read_run_meta(workdir)
  if meta.get("stage") != "flowtok":
    raise UserError(f"{workdir} holds a {meta.get('stage')!r}-stage checkpoint; export needs a "
                    "trained flowtok-stage workdir")
  config = ml_collections.ConfigDict(meta["config"])
  _follow_moved_runs(config, workdir)
  scale = config.tokenizer.get("latent_scale")
  if scale is None:
    if _init_get(config, "tokenizer_from"):
      raise UserError(f"checkpoint metadata in {workdir} lacks tokenizer.latent_scale")
    logging.warning("tokenizer.latent_scale is None and init.tokenizer_from unset: using 1.0, "
                    "as the run did")
    scale = config.tokenizer.latent_scale = 1.0
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  tokenizer_path = _text_tokenizer_path(config, workdir)
  clash = loop.fingerprint_clash({"text_tokenizer": inference.file_sha256(tokenizer_path)},
                                 meta)
  if clash:
    raise UserError(f"{tokenizer_path} is not the text tokenizer {workdir} trained with "
                    f"({clash}): its token ids would not match the model; put the run's own back")
  tokenizer = text_tokenizer.load(tokenizer_path)
  params, random_parts = _load_run_params(workdir, config, step, meta.get("frozen"))
  bad = _first_non_finite(params)
  if bad:
    raise UserError(f"checkpoint step {step} of {workdir} (or a frozen part it reads) holds "
                    f"non-finite values in {bad}: damaged or diverged; nothing exported")
  planned = (config.get("train") or {}).get("total_steps")
  if planned and step < int(planned):
    logging.warning("exporting step %d of a run planned for %d steps (training stopped early or "
                    "is still going)", step, int(planned))
  params = _cast(params, dtype)
  models = inference.build_models(config, scale)
  i2t_missing = _i2t_missing(config, params)
  if not programs:
    inference.check_params(models, params, i2t_missing is None)
  # (Exporting the programs traces the same code, so the check is not repeated then.)
  progs = export_programs(models, params, t2i=t2i_knobs,
                          i2t=i2t_knobs if i2t_missing is None else None) if programs else {}
  bundle_meta = {
      "format": inference.FORMAT_NAME, "format_version": inference.FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": {"workdir": workdir, "step": step, "stage": "flowtok",
                 "total_steps": int(planned) if planned else None,
                 "jax_version": jax.__version__},
      "param_dtype": dtype, "latent_scale": float(scale), "text_len": models.text_len,
      "image_size": models.image_size, "vocab_size": tokenizer.vocab_size,
      "text_tokenizer": {"kind": tokenizer.kind, "pad_id": tokenizer.pad_id,
                         "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
      "capabilities": {"t2i": True, "i2t": i2t_missing is None, "i2t_missing": i2t_missing},
      "defaults": {"t2i": t2i_knobs, "i2t": i2t_knobs},
      "random_parts": random_parts,
      "programs": {name: desc for name, (_, desc) in progs.items()},
      "files": {},
  }
  try:
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
  except OSError as e:
    raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the bundle from other users.
    files = {inference.PARAMS_FILE: flax.serialization.msgpack_serialize(params),
             inference.TOKENIZER_FILE: tokenizer.to_bytes(),
             inference.CONFIG_JSON: config.to_json_best_effort(indent=1).encode()}
    files.update({inference.PROGRAM_FILES[name]: data for name, (data, _) in progs.items()})
    for name, data in files.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
    bundle_meta["files"] = {name: inference.file_sha256(os.path.join(tmp, name))
                            for name in files}
    with open(os.path.join(tmp, inference.BUNDLE_JSON), "w") as f:
      json.dump(bundle_meta, f, indent=1, sort_keys=True)
    _replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
  logging.info("exported %s step %d -> %s (%.1f MiB)", workdir, step, out, size / 2**20)
  return {"bundle": out, "step": step, "dtype": dtype, "bytes": size,
          "t2i": True, "i2t": i2t_missing is None, "programs": sorted(progs),
          "defaults": bundle_meta["defaults"], "random_parts": random_parts}
