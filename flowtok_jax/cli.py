"""The `flowtok` command (also `python -m flowtok_jax`).

Every sub-command parses its flags here and calls one library function; nothing else in the
package reads flags. Config-driven commands take `--config path[:arg]` plus any number of
`--config.key=value` overrides. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
from typing import Callable, Sequence

from flowtok_jax import paths
from flowtok_jax.errors import UserError

# Sub-command name -> (help, function adding its flags, function running it).
_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help_text: str, add_flags: Callable[[argparse.ArgumentParser], None]):
  """Registers `fn(args, config_overrides)` as the sub-command `name`."""
  def register(fn):
    _COMMANDS[name] = (help_text, add_flags, fn)
    return fn
  return register


def _int_at_least(low: int):
  """argparse type: an int >= low (so 0 or a negative count is an error, not a default)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
  return parse


def _finite_float(text: str) -> float:
  """argparse type: a finite float."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be finite, got {text}")
  return value


def _config_flags(p: argparse.ArgumentParser, required: bool = True):
  p.add_argument("--config", required=required,
                 help="config file with optional argument, e.g. configs/demo.py:runlocal; "
                      "override keys with --config.key=value")


def load_config(args, overrides):
  from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load(args.config, overrides)


# ---------------------------------------------------------------------------------------------
# data build | show | text_tokenizer | pretokenize


def _data_flags(p):
  p.add_argument("action", choices=("build", "show", "text_tokenizer", "pretokenize"),
                 help="build the dataset, write a preview, train the sentencepiece model on "
                      "the training captions (what `flowtok train` reads as text_tokenizer.model), "
                      "or store a trained tokenizer's posteriors of its records (for "
                      "config.data.latents_dir)")
  _config_flags(p)
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: config.data.data_dir)")
  p.add_argument("--split", default="train", help="split to preview (show)")
  p.add_argument("--num", type=_int_at_least(1), default=16,
                 help="images in the preview grid (show)")
  p.add_argument("--out", default=None, help="preview PNG path (show; default "
                 "DATA_DIR/preview.png), the .model file (text_tokenizer; default "
                 "config.text_tokenizer.path) or the latents directory (pretokenize; required)")
  p.add_argument("--tokenizer", default=None, help="tokenizer stage workdir (pretokenize; "
                 "default: config.init.tokenizer_from)")
  p.add_argument("--splits", default=None, help="comma-separated splits (pretokenize; default: "
                 "config.data.train_split)")
  p.add_argument("--batch_size", type=_int_at_least(1), default=64, help="images per encoder call "
                 "(pretokenize)")


@command("data", "build the configured dataset (TFDS, ArrayRecord), preview it, train its "
         "text tokenizer, or pretokenize it", _data_flags)
def _data(args, overrides):
  config = load_config(args, overrides)
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  data_dir = args.data_dir or config.data.data_dir
  if not data_dir:
    raise UserError("no data dir: pass --data_dir or set config.data.data_dir")
  if args.action == "build":
    info = builders.build(config.data, data_dir)
    print(info)
  elif args.action == "text_tokenizer":
    from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
    out = args.out or config.text_tokenizer.get("path")
    if not out:
      raise UserError("text_tokenizer needs --out (e.g. W/text_tokenizer.model, or its parent "
                      "directory's) or config.text_tokenizer.path")
    out = paths.writable_file(out, "--out")
    if os.path.exists(out):
      raise UserError(f"{out} exists; models trained with it depend on its token ids (delete it "
                      "to train a new one)")
    tokenizer = text_tokenizer.train_on_split(config, data_dir, out)
    print(json.dumps({"out": out, "vocab_size": tokenizer.vocab_size}))
  elif args.action == "pretokenize":
    from flowtok_jax.tools import pretokenize  # pylint: disable=g-import-not-at-top
    tokenizer = args.tokenizer or (config.get("init") or {}).get("tokenizer_from")
    if not tokenizer:
      raise UserError("pretokenize needs the tokenizer: pass --tokenizer or set "
                      "config.init.tokenizer_from")
    if not args.out:
      raise UserError("pretokenize needs --out (the latents directory)")
    splits = (args.splits or config.data.train_split).split(",")
    meta = pretokenize.pretokenize(config, tokenizer, data_dir, args.out, splits,
                                   batch_size=args.batch_size)
    print(json.dumps({"out": paths.resolve(args.out), "splits": meta["splits"]}))
  else:
    out = paths.writable_file(args.out or os.path.join(data_dir, "preview.png"), "--out")
    builders.write_preview(config.data, data_dir, split=args.split, num=args.num, out=out)
    print(out)


# ---------------------------------------------------------------------------------------------
# bench WHAT (speed measurements; add a choice and a branch per benchmark)


def _bench_flags(p):
  p.add_argument("what", choices=("pipeline", "train", "sample", "fid"),
                 help="pipeline: input pipeline; train: train step (compile, step time, MFU, "
                      "memory); sample: images/s and captions/s; fid: the FID Inception's "
                      "images/s (no --config)")
  _config_flags(p, required=False)
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: config.data.data_dir)")
  p.add_argument("--batch_size", type=_int_at_least(1), default=None,
                 help="examples per batch (pipeline: 64; train: config.train.batch_size; "
                      "sample: config.sample.batch_size)")
  p.add_argument("--steps", type=_int_at_least(1), default=5,
                 help="train/sample: timed calls after warm-up")
  p.add_argument("--warmup", type=_int_at_least(0), default=1,
                 help="train: untimed steps before the timed ones")
  p.add_argument("--stage", default=None, help="train: stage (default: config.train.stage)")
  p.add_argument("--sample_steps", type=_int_at_least(1), default=None,
                 help="sample: ODE steps (default: config.sample.steps, else 20)")
  p.add_argument("--cfg_scale", type=_finite_float, default=None,
                 help="sample: guidance scale (default: config.sample.cfg_scale, else 2.0)")
  p.add_argument("--num_batches", type=_int_at_least(1), default=50,
                 help="batches timed after the first")
  p.add_argument("--num_workers", type=_int_at_least(0), default=None,
                 help="grain worker processes (default: config.data.num_workers)")
  p.add_argument("--image_size", type=_int_at_least(1), default=256,
                 help="fid: side of the images resized to 299 before the network")


@command("bench", "measure speed: input pipeline, train step (MFU), sampling", _bench_flags)
def _bench(args, overrides):
  import json  # pylint: disable=g-import-not-at-top
  from flowtok_jax.tools import bench  # pylint: disable=g-import-not-at-top
  if args.what == "fid":
    if args.config or overrides:
      raise UserError("bench fid takes no --config: the FID network has one fixed shape")
    result = bench.bench_fid(batch_size=args.batch_size or 50, repeats=args.steps,
                             image_size=args.image_size)
    print(json.dumps({"bench": args.what, **result}))
    return
  if not args.config:
    raise UserError(f"bench {args.what} needs --config")
  config = load_config(args, overrides)
  if args.what == "pipeline":
    result = bench.bench_pipeline(config, args.data_dir, num_batches=args.num_batches,
                                  num_workers=args.num_workers, batch_size=args.batch_size or 64)
  elif args.what == "train":
    result = bench.bench_train(config, stage=args.stage, batch_size=args.batch_size,
                               steps=args.steps, warmup=args.warmup)
  elif args.what == "sample":
    result = bench.bench_sample(config, batch_size=args.batch_size, steps=args.sample_steps,
                                cfg_scale=args.cfg_scale, repeats=args.steps)
  print(json.dumps({"bench": args.what, **result}))


# ---------------------------------------------------------------------------------------------
# aot (compile for a TPU topology on this machine; needs libtpu, the `tpu` extra)


def _aot_flags(p):
  _config_flags(p)
  p.add_argument("--topology", required=True,
                 help="TPU slice, e.g. v5p:2x2x1 (4 chips), v5p:2x2x2 (8), v5e:4x4, v6e:2x2")
  p.add_argument("--what", default="train,sample",
                 help="comma list of train, sample (text->image), caption (image->text)")
  p.add_argument("--batch_size", type=_int_at_least(1), default=None,
                 help="global train batch (default: config.train.batch_size)")
  p.add_argument("--sample_batch", type=_int_at_least(1), default=None,
                 help="global sampling batch (default: config.sample.batch_size)")
  p.add_argument("--sample_steps", type=_int_at_least(1), default=None,
                 help="ODE steps (default: config.sample.steps)")
  p.add_argument("--stage", default=None, help="train stage (default: config.train.stage)")


@command("aot", "compile the train step / sampler for a TPU topology: per-chip memory, FLOPs",
         _aot_flags)
def _aot(args, overrides):
  from flowtok_jax.tools import aot  # pylint: disable=g-import-not-at-top
  result = aot.run(load_config(args, overrides), args.topology,
                   what=[w.strip() for w in args.what.split(",") if w.strip()],
                   batch_size=args.batch_size, sample_batch=args.sample_batch,
                   steps=args.sample_steps, stage=args.stage)
  print(aot.summary(result))
  print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# train


def _train_flags(p):
  _config_flags(p)
  p.add_argument("--workdir", required=True, help="run directory; re-running on it resumes")
  p.add_argument("--stage", default=None, help="stage to train (default: config.train.stage)")


@command("train", "train one stage (clip | tokenizer | flowtok); re-running resumes",
         _train_flags)
def _train(args, overrides):
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(load_config(args, overrides), args.workdir, args.stage)
  print(json.dumps({"step": result.step, "stopped_by": result.stopped_by,
                    **result.last_metrics, **result.last_eval}, sort_keys=True))
  return result.exit_code


# ---------------------------------------------------------------------------------------------
# info


@command("info", "print parameter counts and analytic FLOPs per model component as one JSON "
                 "object", _config_flags)
def _info(args, overrides):
  import json  # pylint: disable=g-import-not-at-top
  from flowtok_jax import flops  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import info  # pylint: disable=g-import-not-at-top
  config = load_config(args, overrides)
  print(json.dumps({**info.param_counts(config), "flops": flops.summary(config)}))


# ---------------------------------------------------------------------------------------------
# convert


def _convert_flags(p):
  p.add_argument("--kind", required=True,
                 choices=("flowtok", "flowtitok", "clip_text", "inception"),
                 help="flowtok: FlowTok-XL/H.pth (DiT + text VAE + alignment MLP); flowtitok: "
                      "FlowTiTok_512.bin; clip_text: an open_clip ViT-L-14-336 state dict; "
                      "inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (for "
                      "`flowtok fid`; takes no --config)")
  _config_flags(p, required=False)
  p.add_argument("--src", required=True, help="PyTorch checkpoint (.pth/.bin/.pt; needs torch) "
                                              "or a state dict saved as .npz")
  p.add_argument("--out", required=True, help="output directory: <tree>.msgpack + convert.json")


@command("convert", "import released PyTorch weights into our parameter trees", _convert_flags)
def _convert(args, overrides):
  from flowtok_jax.tools import convert  # pylint: disable=g-import-not-at-top
  if args.kind == "inception":
    if args.config or overrides:
      raise UserError("--kind inception takes no --config: the FID network has one fixed shape")
    config = None
  elif not args.config:
    raise UserError(f"--kind {args.kind} needs --config (the model the weights are mapped onto)")
  else:
    config = load_config(args, overrides)
  result = convert.convert(args.kind, config, args.src, args.out)
  print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# demo


def _demo_flags(p):
  p.add_argument("--workdir", default="runs/demo", help="output directory (re-running resumes)")
  p.add_argument("--config", default=None,
                 help="config path[:arg] (default: the repository's configs/demo.py; "
                      "configs/demo.py:runlocal runs every stage in ~2 minutes at a tiny size); "
                      "any --config.KEY=VALUE overrides it, e.g. "
                      "--config.budget.scale_steps=False")


@command("demo", "run the whole pipeline on the embedded captioned-shapes default", _demo_flags)
def _demo(args, overrides):
  from flowtok_jax import demo  # pylint: disable=g-import-not-at-top
  metrics = demo.run_demo(args.workdir, args.config, overrides)
  print(json.dumps(metrics, sort_keys=True))


# ---------------------------------------------------------------------------------------------


# export | generate | caption | eval: serving from an inference bundle (export.py, inference.py)


def _no_config(overrides, name):
  if overrides:
    raise UserError(f"{name} reads its config from the bundle/workdir; --config.{overrides[0]} "
                    "does not apply")


def _sampler_flags(p, cfg_default: str):
  p.add_argument("--steps", type=_int_at_least(1), default=None,
                 help="ODE steps (default: the bundle's: 20, or what its export chose; "
                      "the demo's I2T steps are chosen on val)")
  p.add_argument("--cfg", type=float, default=None,
                 help=f"guidance scale (default: the bundle's, {cfg_default})")
  p.add_argument("--sampler", choices=("euler", "heun"), default=None,
                 help="ODE solver (default: the bundle's, euler)")
  p.add_argument("--grid", choices=("parity", "uniform"), default=None,
                 help="time grid: parity (Euler, the reference's) or uniform (Heun needs it)")
  p.add_argument("--batch_size", type=_int_at_least(1), default=8, help="images per compiled call")


def _knobs(args) -> dict:
  return {"steps": args.steps, "cfg_scale": args.cfg, "sampler": args.sampler, "grid": args.grid}


def _export_flags(p):
  p.add_argument("--workdir", required=True, help="a trained flowtok-stage workdir")
  p.add_argument("--out", required=True, help="bundle directory (an old bundle is replaced)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="parameter dtype in the bundle")
  p.add_argument("--programs", action="store_true",
                 help="also write jax.export T2I / I2T programs (symbolic batch)")
  p.add_argument("--steps", type=_int_at_least(1), default=None,
                 help="default ODE steps of the bundle and its programs (20)")
  p.add_argument("--sampler", choices=("euler", "heun"), default=None,
                 help="default solver of the bundle and its programs (euler)")
  p.add_argument("--i2t_steps", type=_int_at_least(1), default=None,
                 help="image-to-text ODE steps, where they differ from --steps")


@command("export", "write an inference bundle from a trained flowtok-stage workdir",
         _export_flags)
def _export(args, overrides):
  _no_config(overrides, "export")
  from flowtok_jax import export  # pylint: disable=g-import-not-at-top
  print(json.dumps(export.export_bundle(args.workdir, args.out, dtype=args.dtype,
                                        programs=args.programs, steps=args.steps,
                                        sampler=args.sampler, i2t_steps=args.i2t_steps),
                   sort_keys=True))


def _generate_flags(p):
  p.add_argument("--bundle", required=True, help="bundle directory (flowtok export)")
  p.add_argument("--prompt", action="append", default=[],
                 help="text to draw; repeat the flag for several prompts")
  p.add_argument("--prompts_file", default=None,
                 help="UTF-8 text file with one prompt per line (blank lines skipped; '-': "
                      "stdin), drawn after any --prompt")
  p.add_argument("--num", type=_int_at_least(1), default=1, help="images per prompt")
  p.add_argument("--seed", type=int, default=0, help="seed of the first image (image j: seed+j)")
  p.add_argument("--out", required=True, help="directory for NNNN.png and samples.json")
  _sampler_flags(p, "2.0")


@command("generate", "text to image from a bundle: DIR/NNNN.png + DIR/samples.json",
         _generate_flags)
def _generate(args, overrides):
  _no_config(overrides, "generate")
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  prompts = list(args.prompt)
  if args.prompts_file is not None:
    prompts += _read_prompts(args.prompts_file)
  if not prompts:
    raise UserError("generate needs --prompt TEXT or --prompts_file FILE "
                    "(see flowtok generate --help)")
  records = inference.generate_to_dir(args.bundle, prompts, args.out, num=args.num,
                                      seed=args.seed, batch_size=args.batch_size,
                                      **_knobs(args))
  print(json.dumps({"out": paths.resolve(args.out), "images": len(records)}))


def _read_prompts(path: str) -> list[str]:
  """The non-blank lines of a prompts file ('-': stdin), stripped of surrounding whitespace."""
  what = "stdin" if path == "-" else f"--prompts_file {path}"
  try:
    if path == "-":
      text = sys.stdin.read()
    else:
      with open(path, encoding="utf-8") as f:
        text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
  prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise UserError(f"{what} holds no prompts (one per line)")
  return prompts


def _caption_flags(p):
  p.add_argument("--bundle", required=True, help="bundle directory (flowtok export)")
  p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size: resized "
                 "and centre-cropped)")
  _sampler_flags(p, "1.0: none")


@command("caption", "image to text from a bundle: one JSON line per image", _caption_flags)
def _caption(args, overrides):
  _no_config(overrides, "caption")
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  for record in inference.caption_files(args.bundle, args.images, batch_size=args.batch_size,
                                        **_knobs(args)):
    print(json.dumps(record), flush=True)


def _eval_flags(p):
  p.add_argument("--bundle", required=True, help="bundle directory (flowtok export)")
  p.add_argument("--data_dir", required=True,
                 help="TFDS data dir of the bundle's dataset (captioned_shapes is built there if "
                      "missing; other datasets must be built)")
  p.add_argument("--split", default=None,
                 help="comma-separated evaluation splits, never train (default: "
                      "test,compositional; with --inception one split, default the bundle's "
                      "data.eval_split)")
  p.add_argument("--num", type=_int_at_least(1), default=None,
                 help="examples per split (default: all)")
  p.add_argument("--t2i_num", type=_int_at_least(1), default=None,
                 help="of those, the prompts T2I generates images for (default: all; "
                      "captioned-shapes only)")
  p.add_argument("--out", default=None, help="directory for eval.json + report.html "
                                             "(default: BUNDLE-eval, beside the bundle)")
  p.add_argument("--seed", type=int, default=0, help="seed of each split's first image")
  p.add_argument("--caption_cfg", type=float, default=None,
                 help="guidance scale of the captions (default: the bundle's, 1.0)")
  p.add_argument("--frechet_steps", type=_int_at_least(0), default=None,
                 help="training steps of the shapes feature net (0: no Fréchet distance; "
                      "default 300; captioned-shapes only)")
  p.add_argument("--inception", default=None,
                 help="real data (a bundle not trained on captioned-shapes): FID of T2I, rFID "
                      "of the tokenizer and BLEU-4 / CIDEr-D of I2T instead of the pixel "
                      "parser, with these FID Inception weights (see `flowtok fid`)")
  _sampler_flags(p, "2.0 for the images")
  p.set_defaults(batch_size=32)


@command("eval", "T2I / I2T / tokenizer metrics of a bundle: the pixel parser on captioned-shapes; "
         "with --inception, FID / rFID / BLEU-4 / CIDEr-D on real data",
         _eval_flags)
def _eval(args, overrides):
  _no_config(overrides, "eval")
  from flowtok_jax.evaluation import run_eval  # pylint: disable=g-import-not-at-top
  if args.inception:
    from flowtok_jax.evaluation import real_eval  # pylint: disable=g-import-not-at-top
    if args.frechet_steps is not None:
      raise UserError("--frechet_steps is for captioned-shapes bundles (the shapes feature net); "
                      "with --inception the distance is real FID")
    if args.t2i_num is not None:
      raise UserError("--t2i_num is for captioned-shapes bundles; with --inception, --num sets "
                      "the examples of every metric")
    results = real_eval.evaluate_real(
        args.bundle, args.data_dir, args.inception, split=args.split, num=args.num,
        out=args.out, batch_size=args.batch_size, steps=args.steps, cfg_scale=args.cfg,
        sampler=args.sampler, grid=args.grid, caption_cfg_scale=args.caption_cfg, seed=args.seed)
    print(json.dumps(results["summary"], sort_keys=True))
    return
  results = run_eval.evaluate(args.bundle, args.data_dir,
                              splits=args.split or "test,compositional", num=args.num,
                              t2i_num=args.t2i_num, out=args.out,
                              batch_size=args.batch_size, steps=args.steps, cfg_scale=args.cfg,
                              sampler=args.sampler, grid=args.grid,
                              caption_cfg_scale=args.caption_cfg, seed=args.seed,
                              frechet_steps=300 if args.frechet_steps is None
                              else args.frechet_steps)
  print(json.dumps(results["summary"], sort_keys=True))


def _probe_flags(p):
  p.add_argument("--direction", choices=("i2t", "t2i", "tokenizer"), default="i2t",
                 help="i2t: where captions fail (needs a two-way bundle); t2i: where images "
                 "fail; tokenizer: where reconstructions fail (the tokenizer bar's misses)")
  p.add_argument("--bundle", required=True, help="bundle directory (flowtok export)")
  p.add_argument("--data_dir", required=True, help="TFDS data dir of captioned_shapes")
  p.add_argument("--split", default=None,
                 help="held-out split, never train (default: val for the tokenizer, the "
                 "bar's split; test otherwise)")
  p.add_argument("--num", type=_int_at_least(1), default=128, help="examples probed")
  p.add_argument("--steps", type=_int_at_least(1), default=None,
                 help="ODE steps (default: the bundle's)")
  p.add_argument("--cfg", type=_finite_float, default=None,
                 help="guidance scale (default: the bundle's)")
  p.add_argument("--blend_captions", type=_int_at_least(0), default=32,
                 help="captions per scene averaged for text/blend_exact (i2t; 0: skip)")


@command("probe", "where a bundle fails: image-to-text (default), text-to-image (--direction "
         "t2i) or the tokenizer's reconstructions (--direction tokenizer)", _probe_flags)
def _probe(args, overrides):
  _no_config(overrides, "probe")
  if args.split is None:
    args.split = "val" if args.direction == "tokenizer" else "test"
  if args.direction == "tokenizer":
    from flowtok_jax.evaluation import tokenizer_probe  # pylint: disable=g-import-not-at-top
    result = tokenizer_probe.probe(args.bundle, args.data_dir, split=args.split, num=args.num)
  elif args.direction == "t2i":
    from flowtok_jax.evaluation import t2i_probe  # pylint: disable=g-import-not-at-top
    result = t2i_probe.probe(args.bundle, args.data_dir, split=args.split, num=args.num,
                             steps=args.steps, cfg_scale=args.cfg)
  else:
    from flowtok_jax.evaluation import i2t_probe  # pylint: disable=g-import-not-at-top
    result = i2t_probe.probe(args.bundle, args.data_dir, split=args.split, num=args.num,
                             steps=args.steps, cfg_scale=args.cfg,
                             blend_captions=args.blend_captions)
  print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# fid: real FID (the FID Inception-v3, weights from a local file)


def _fid_flags(p):
  p.add_argument("sources", nargs="+", metavar="SOURCE",
                 help="two image folders or statistics .npz files (FID between them), or one "
                      "folder with --save_stats")
  p.add_argument("--inception", required=True,
                 help="the FID Inception weights: pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth (reading it needs torch), that state "
                      "dict as .npz, or the directory `flowtok convert --kind inception` wrote")
  p.add_argument("--save_stats", default=None,
                 help="write the one SOURCE folder's statistics (mu, sigma) to this .npz")
  p.add_argument("--num", type=_int_at_least(2), default=None,
                 help="at most this many images of each folder, the first by file name "
                      "(default: all)")
  p.add_argument("--batch_size", type=_int_at_least(1), default=50,
                 help="images per Inception call")


@command("fid", "real FID between image folders / statistics files (the FID Inception-v3 from "
         "a local file; for real data, not the shapes world)", _fid_flags)
def _fid(args, overrides):
  if overrides:
    raise UserError(f"fid takes no config; --config.{overrides[0]} does not apply")
  from flowtok_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  result = inception.fid(args.sources, args.inception, batch_size=args.batch_size, num=args.num,
                         save_stats_to=args.save_stats)
  print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  """argparse with the CLI's error contract: one `flowtok: error: ...` line and exit 2 (the
  usage block argparse would print first is one `--help` away)."""

  def error(self, message):
    # main() prints "flowtok: error: ", so only a subcommand names itself again.
    where = f"{self.prog}: " if self.prog != "flowtok" else ""
    raise UserError(f"{where}{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.HelpFormatter):
  """Shows a flag's default where it has one and its help does not already say it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (action.option_strings and "default" not in text and action.default not in
        (None, False, [], argparse.SUPPRESS)):
      text += " (default: %(default)s)"
    return text


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="flowtok", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  for name, (help_text, add_flags, _) in _COMMANDS.items():
    add_flags(sub.add_parser(name, help=help_text, formatter_class=_HelpFormatter))
  return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` (or `--config.key value`) overrides from other flags."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
          raise UserError(f"{a} needs a value (write {a}=VALUE)")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


# Device nodes of the accelerators JAX drives: TPU chips (v2-v4: accel, v5 on: vfio), NVIDIA
# and AMD GPUs.
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _cpu_unless_accelerator(nodes: Sequence[str] = _ACCELERATOR_NODES) -> bool:
  """Runs JAX on the CPU when JAX_PLATFORMS is unset and no accelerator is visible.

  libtpu (installed with the `test` extra for `flowtok aot`) otherwise probes for a TPU on
  every command and writes half a dozen initialisation errors to stderr on a machine without
  one. A set JAX_PLATFORMS, or any accelerator device node, leaves JAX's own choice alone.
  Returns whether it chose the CPU.
  """
  if "JAX_PLATFORMS" in os.environ or any(glob.glob(n) for n in nodes):
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # Imported already (a test process): the flag, not the env var.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  return True


def _missing_dirs(args) -> list[str]:
  """The output paths a command was given (--workdir, --out, --data_dir) that do not exist yet,
  each with its missing parents, deepest first."""
  missing = []
  for name in ("workdir", "out", "data_dir"):
    path = getattr(args, name, None)
    if not isinstance(path, str) or not path or "://" in path:
      continue
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
      missing.append(path)
      path = os.path.dirname(path)
  return missing


def _remove_empty(dirs: Sequence[str]):
  """A refused command leaves no empty directory behind (rmdir: never one that has a file)."""
  for d in dirs:
    try:
      os.rmdir(d)
    except OSError:
      pass


# glibc's malloc with transparent huge pages (glibc >= 2.35; older ones ignore the name). XLA's
# CPU runtime allocates each step's temporaries afresh (~70 MiB for the demo's tokenizer step),
# and glibc serves blocks that large by mmap: every step faulted in ~19,000 fresh 4 KiB pages
# (11.6 M minor faults in 600 tokenizer steps, 18 % of the process's CPU time in the kernel).
# With huge pages: 0.43 M faults, 8.8 -> 10.5 steps/s (docs/benchmarks.md, "seventeenth pass").
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
NO_MALLOC_TUNING = "FLOWTOK_NO_MALLOC_TUNING"  # Set (to anything) to run with glibc's defaults.


def malloc_environ(environ: dict[str, str], platform: str = sys.platform) -> dict[str, str] | None:
  """The environment to re-run the command in with `MALLOC_TUNABLE`, or None to run as is.

  None when not on Linux, when opted out, or when GLIBC_TUNABLES already names the tunable
  (the user's value, or the re-run itself). Other tunables already set are kept.
  """
  if not platform.startswith("linux") or NO_MALLOC_TUNING in environ:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  name = MALLOC_TUNABLE.split("=")[0]
  if any(t.split("=")[0] == name for t in current.split(":")):
    return None
  return {**environ, "GLIBC_TUNABLES": f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE}


def entry() -> int:
  """The `flowtok` program: `main`, in a process whose malloc is tuned (`malloc_environ`).

  glibc reads its tunables once, when the process starts, so the command re-executes itself
  (same interpreter, same arguments) with them set. `main` itself (tests, library callers)
  changes nothing.
  """
  env = malloc_environ(dict(os.environ))
  if env is not None:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    try:
      os.execve(sys.executable, argv, env)
    except OSError:  # Cannot re-execute: run untuned.
      pass
  return main()


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _cpu_unless_accelerator()
  logging.basicConfig(level=os.environ.get("FLOWTOK_LOG_LEVEL", "INFO"),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  created = []  # Output directories that did not exist before the command.
  try:
    rest, overrides = _split_overrides(argv)
    args, unknown = build_parser().parse_known_args(rest)
    if unknown:  # Named with the subcommand whose --help lists what it takes.
      raise UserError(f"flowtok {args.command}: unrecognized arguments: {' '.join(unknown)} "
                      f"(see flowtok {args.command} --help)")
    _, _, fn = _COMMANDS[args.command]
    created = _missing_dirs(args)
    code = fn(args, overrides)
  except UserError as e:
    _remove_empty(created)
    print(f"flowtok: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
          PermissionError) as e:
    _remove_empty(created)
    # A path the up-front checks did not foresee: still one line, not a traceback.
    where = f": {e.filename}" if e.filename else ""
    print(f"flowtok: error: {e.strerror or e}{where}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:  # Ctrl-C, or a demo stage stopped by SIGINT / SIGTERM.
    print(f"flowtok: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 130))
  if code:  # A command's own non-zero status (a training run stopped by a signal).
    sys.exit(code)
  return 0


if __name__ == "__main__":
  entry()
