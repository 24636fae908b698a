"""TFDS builders (ArrayRecord, no TensorFlow) and the one way the pipeline opens a dataset.

Two builders live here (a builder must sit in a package module: tfds looks up its metadata next to
the defining file):

* `CaptionedShapes` (`captioned_shapes`): the rendered world of `data/shapes.py`. The config knobs
  (`data.image_size`, `data.shapes.*`) become a BuilderConfig whose name is derived from them
  (`r64_n20000_1a2b3c4d`), so datasets of different sizes or resolutions coexist in one data dir.
* `ImageCaptionFolder` (`image_caption_folder`): a local folder of images plus `captions.jsonl`
  (`{"file": "a.png", "caption": "..."}` per line), for users' own data. Pixels are kept as they
  are (re-encoded losslessly as RGB PNG); the pipeline resizes and crops.

Any other name is an ordinary TFDS dataset that the user prepared with
`tfds build NAME --file_format=array_record --data_dir D`.

Both builders set `disable_shuffling`, so record i of a split is example i (shapes: the example
rendered with index i; folder: the i-th kept line of captions.jsonl). Shuffling is the pipeline's
job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import textwrap
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import tensorflow_datasets as tfds

from flowtok_jax.data import examples as example_lib
from flowtok_jax.data import shapes
from flowtok_jax import paths
from flowtok_jax.errors import UserError

log = logging.getLogger(__name__)

SHAPES_NAME = "captioned_shapes"
FOLDER_NAME = "image_caption_folder"
_ARRAY_RECORD = "array_record"


def _digest(knobs: dict[str, Any]) -> str:
  return hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]


@contextlib.contextmanager
def _absl_level(level: int):
  """Raises tfds's (absl) log level for a while: its INFO chatter hides our one-line summary."""
  logger = logging.getLogger("absl")
  old = logger.level
  logger.setLevel(max(level, old))
  try:
    yield
  finally:
    logger.setLevel(old)


def _not_the_opencv_advice(record: logging.LogRecord) -> bool:
  # tfds decodes images with PIL when OpenCV is absent and says so on every reading command;
  # PIL is this project's decoder on purpose (no OpenCV dependency), so the advice is noise.
  return not str(record.msg).startswith("OpenCV is not installed. We recommend")


logging.getLogger("absl").addFilter(_not_the_opencv_advice)


def _png(image: PIL.Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="png")
  return buf.getvalue()


# --- captioned_shapes ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ShapesBuilderConfig(tfds.core.BuilderConfig):
  """The knobs of one captioned-shapes variant; build it with `shapes_builder_config`."""
  image_size: int = 64
  seed: int = 0
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  num_compositional: int = 1_000
  two_object_fraction: float = 0.5
  paraphrase_prob: float = 0.3
  heldout: tuple[str, ...] = shapes.DEFAULT_HELDOUT

  @property
  def render_config(self) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(image_size=self.image_size,
                               two_object_fraction=self.two_object_fraction,
                               paraphrase_prob=self.paraphrase_prob, heldout=self.heldout,
                               num_train=self.num_train)

  @property
  def split_sizes(self) -> dict[str, int]:
    sizes = dict(train=self.num_train, val=self.num_val, test=self.num_test,
                 compositional=self.num_compositional)
    return {k: v for k, v in sizes.items() if v > 0}


def shapes_builder_config(image_size: int = 64, seed: int = 0, num_train: int = 20_000,
                          num_val: int = 1_000, num_test: int = 1_000,
                          num_compositional: int = 1_000, two_object_fraction: float = 0.5,
                          paraphrase_prob: float = 0.3,
                          heldout=shapes.DEFAULT_HELDOUT) -> ShapesBuilderConfig:
  """A ShapesBuilderConfig named after all its knobs (same knobs -> same name)."""
  knobs = dict(image_size=int(image_size), seed=int(seed), num_train=int(num_train),
               num_val=int(num_val), num_test=int(num_test),
               num_compositional=int(num_compositional),
               two_object_fraction=float(two_object_fraction),
               paraphrase_prob=float(paraphrase_prob), heldout=tuple(heldout))
  if knobs["num_train"] <= 0 or min(knobs[k] for k in knobs if k.startswith("num_")) < 0:
    raise UserError("captioned_shapes split sizes must be >= 0, and num_train > 0")
  shapes.ShapesConfig(image_size=knobs["image_size"],  # Validates the rendering knobs early.
                      two_object_fraction=knobs["two_object_fraction"],
                      paraphrase_prob=knobs["paraphrase_prob"], heldout=knobs["heldout"])
  name = f"r{knobs['image_size']}_n{knobs['num_train']}_{_digest(knobs)}"
  return ShapesBuilderConfig(name=name, description=json.dumps(knobs), **knobs)


def shapes_config_from_data(data_cfg) -> ShapesBuilderConfig:
  """The builder config named by a config's `data` section."""
  s = data_cfg.shapes
  return shapes_builder_config(
      image_size=data_cfg.image_size, seed=s.seed, num_train=s.num_train, num_val=s.num_val,
      num_test=s.num_test, num_compositional=s.num_compositional,
      two_object_fraction=s.two_object_fraction,
      paraphrase_prob=s.get("paraphrase_prob", 0.3), heldout=tuple(s.heldout))


class _LocalInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a dataset this project builds locally: no metadata on the TFDS bucket.

  TFDS looks there when a builder is made for a directory not prepared yet, and makes an empty
  temporary directory for the download before finding nothing (or GCS disabled): one leaked
  /tmp/tmp*tfds directory per such builder.
  """

  def initialize_from_bucket(self) -> None:
    pass


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose data is made here: TFDS's "Downloading and preparing dataset Unknown size"
  (and "downloaded") lines would mislead, so it says what it does."""

  def _log_download_bytes(self) -> None:
    print(f"Building dataset {self.name} in {self.data_dir} ...")

  def _log_download_done(self) -> None:
    print(f"Dataset {self.name} built in {self.data_dir}.")


class CaptionedShapes(_LocalBuilder):
  """Captioned shapes (DESIGN.md §6): images, captions, JSON ground truth per example."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "reference_caption: the one caption the pixels determine.",
                   "1.2.0": "val / test hold no image identical to a train image."}
  BUILDER_CONFIGS = [shapes_builder_config()]  # The default knobs; any other set is custom.

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return _LocalInfo(
        builder=self,
        description="Rendered shapes with captions; see flowtok_jax/data/shapes.py.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            # Canonical wording, left/upper object first: what I2T learns to write.
            "reference_caption": tfds.features.Text(),
            "objects": tfds.features.Text(),  # JSON list of {color, shape, size, ..., bbox}.
            "relation": tfds.features.Text(),  # '' or 'left of' | 'right of' | 'above' | 'below'.
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes.items()}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    render = cfg.render_config
    for i in range(num):
      ex = shapes.render_example(cfg.seed, split, i, render)
      # PNG bytes, never an ndarray: tfds encodes arrays through TensorFlow.
      yield i, {"image": _png(PIL.Image.fromarray(ex["image"])), "caption": ex["caption"],
                "reference_caption": shapes.reference_caption(ex["objects"], ex["relation"]),
                "objects": shapes.objects_json(ex["objects"]), "relation": ex["relation"]}


# --- image_caption_folder --------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FolderBuilderConfig(tfds.core.BuilderConfig):
  """A local folder with captions.jsonl; `val_fraction` of the lines become split 'val'."""
  folder: str = ""
  val_fraction: float = 0.0
  on_bad_image: str = "skip"


def folder_builder_config(folder: str, val_fraction: float = 0.0,
                          on_bad_image: str = "skip") -> FolderBuilderConfig:
  """A FolderBuilderConfig named after the folder's absolute path and the val fraction."""
  if not folder:
    raise UserError("data.name is image_caption_folder but data.folder is not set")
  if on_bad_image not in ("skip", "error"):
    raise UserError(f"data.on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"data.folder_val_fraction must be in [0, 1), got {val_fraction}")
  folder = os.path.abspath(os.path.expanduser(folder))
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder).lower()).strip("_") or "folder"
  name = f"{slug}_{_digest(dict(folder=folder, val_fraction=float(val_fraction)))}"
  return FolderBuilderConfig(name=name, description=folder, folder=folder,
                             val_fraction=float(val_fraction), on_bad_image=on_bad_image)


def _read_image(path: str) -> PIL.Image.Image:
  """Opens and fully decodes an image as RGB (raises OSError/ValueError when unreadable)."""
  with PIL.Image.open(path) as im:
    im.load()
    # Not im.convert("RGB"): that clips 16-bit greyscale at 255 (a white image).
    return PIL.Image.fromarray(example_lib.pil_to_rgb_uint8(im))


class ImageCaptionFolder(_LocalBuilder):
  """A user's folder of images with captions.jsonl, stored as RGB PNG + caption + file name."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(
        builder=self,
        description="Images with captions from a local folder (captions.jsonl).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "file": tfds.features.Text(),  # Path relative to the folder.
        }),
        disable_shuffling=True,
    )

  def scan(self) -> list[tuple[str, str]]:
    """Reads captions.jsonl and decodes every image once. Returns kept (file, caption) pairs.

    Raises a UserError for a missing captions.jsonl, a bad line or a missing file, and for an
    unreadable image when `on_bad_image='error'`; with 'skip' unreadable images are dropped and
    counted in one log line. Cached: `build` calls it before tfds deletes an old version.
    """
    if getattr(self, "_scanned", None) is not None:
      return self._scanned
    cfg = self.builder_config
    listing = os.path.join(cfg.folder, "captions.jsonl")
    if not os.path.isfile(listing):
      raise UserError(f"no captions.jsonl in {cfg.folder} (one JSON line per image: "
                      '{"file": "a.png", "caption": "..."})')
    entries = []
    with open(listing, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          file, caption = row["file"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise UserError(f"{listing}:{line_no}: expected {{\"file\": ..., \"caption\": ...}}, "
                          f"got {line.strip()[:80]!r}") from e
        if not isinstance(caption, str) or not caption.strip():
          raise UserError(f"{listing}:{line_no}: empty caption for {file!r}")
        if not os.path.isfile(os.path.join(cfg.folder, file)):
          raise UserError(f"{listing}:{line_no}: image file not found: {file}")
        entries.append((file, caption.strip()))
    if not entries:
      raise UserError(f"{listing} lists no images")
    kept, bad = [], []
    for file, caption in entries:
      try:
        _read_image(os.path.join(cfg.folder, file))
      except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        if cfg.on_bad_image == "error":
          raise UserError(f"unreadable image {os.path.join(cfg.folder, file)}: {e}") from e
        bad.append(file)
        continue
      kept.append((file, caption))
    if bad:
      shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
      log.warning("skipped %d unreadable images of %d: %s", len(bad), len(entries), shown)
    if not kept:
      raise UserError(f"no readable image in {cfg.folder}")
    self._scanned = kept  # pylint: disable=attribute-defined-outside-init
    self.num_skipped = len(bad)  # pylint: disable=attribute-defined-outside-init
    return kept

  def _split_generators(self, dl_manager):
    del dl_manager
    kept = self.scan()
    num_val = int(round(len(kept) * self.builder_config.val_fraction))
    if self.builder_config.val_fraction > 0 and len(kept) > 1:
      num_val = min(max(num_val, 1), len(kept) - 1)
    # A fixed permutation: the same folder always splits the same way.
    order = np.random.default_rng(0).permutation(len(kept))
    val_idx, train_idx = sorted(order[:num_val]), sorted(order[num_val:])
    splits = {"train": self._generate_examples([kept[i] for i in train_idx])}
    if num_val:
      splits["val"] = self._generate_examples([kept[i] for i in val_idx])
    return splits

  def _generate_examples(self, rows):
    for i, (file, caption) in enumerate(rows):
      image = _read_image(os.path.join(self.builder_config.folder, file))
      yield i, {"image": _png(image), "caption": caption, "file": file}


# --- Opening, building, previewing -----------------------------------------------------------


def _own_builder(data_cfg, data_dir: str) -> tfds.core.DatasetBuilder | None:
  """Our builder for `data_cfg`, or None when data.name is some other TFDS dataset."""
  if data_cfg.name == SHAPES_NAME:
    cls, config = CaptionedShapes, shapes_config_from_data(data_cfg)
  elif data_cfg.name == FOLDER_NAME:
    cls, config = ImageCaptionFolder, folder_builder_config(
        data_cfg.get("folder"), data_cfg.get("folder_val_fraction", 0.0),
        data_cfg.get("on_bad_image", "skip"))
  else:
    return None
  # tfds refuses a custom config object that reuses a listed name (also when a pickled builder,
  # e.g. in a grain worker, is rebuilt): name a listed config by its string.
  if config.name in {c.name for c in cls.BUILDER_CONFIGS}:
    config = config.name
  with _absl_level(logging.ERROR):  # "Using custom data configuration" is expected here.
    return cls(config=config, data_dir=data_dir, file_format=_ARRAY_RECORD)


def _is_prepared(builder) -> bool:
  # ERROR: on a half-built or fresh folder tfds warns "Variant folder ... has no
  # dataset_info.json", which is what "not prepared" means here.
  with _absl_level(logging.ERROR):
    return builder.is_prepared()


def _tfds_build_hint(name: str, data_dir: str) -> str:
  return f"run `tfds build {name} --file_format=array_record --data_dir {data_dir}`"


def _prepared_builder(data_cfg, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of a prepared dataset, or a UserError saying how to prepare it."""
  if not data_dir:
    raise UserError("no data dir: set config.data.data_dir (--config.data.data_dir=D) or pass "
                    "--data_dir where the command has it")
  paths.local(data_dir, "data dir")  # Read through a mount, like everything else.
  builder = _own_builder(data_cfg, data_dir)
  name = data_cfg.name
  if builder is not None:
    if not _is_prepared(builder):
      raise UserError(f"dataset {name}/{builder.builder_config.name} not found in {data_dir}: run "
                      f"`flowtok data build --config <your config> --data_dir {data_dir}`")
    return builder
  # tfds prints a banner when a dataset's code needs TensorFlow (absent here by design); the
  # error below says what to do instead.
  banner = io.StringIO()
  try:
    with contextlib.redirect_stdout(banner), contextlib.redirect_stderr(banner):
      builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    needs_tf = isinstance(e, ImportError) and "tensorflow" in (str(e) + banner.getvalue()).lower()
    raise UserError(f"dataset {name} not found in {data_dir} ({type(e).__name__}): "
                    + _tfds_build_hint(name, data_dir)
                    + (" in an environment with TensorFlow (TFDS prepares this dataset with it; "
                       "reading it here does not need it)" if needs_tf else "")) from e
  sys.stderr.write(banner.getvalue())  # Whatever tfds printed on success is its own business.
  if not _is_prepared(builder):
    raise UserError(f"dataset {name} is not prepared in {data_dir}: "
                    + _tfds_build_hint(name, data_dir))
  return builder


def _summary(builder: tfds.core.DatasetBuilder, note: str = "") -> str:
  splits = " ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items())
  config = f"/{builder.builder_config.name}" if builder.builder_config else ""
  return (f"{builder.name}{config} {builder.version}: {splits} in {builder.data_path}"
          + (f" ({note})" if note else ""))


def existing_data_dir(data_dir: str, flag: str = "--data_dir") -> str:
  """`data_dir` if it is an existing directory and not a dataset's own folder inside a TFDS
  data dir (a path one level too deep); else a UserError naming the fix. For commands that
  read data another command prepared, where building into a mistyped path would hide the slip."""
  path = paths.local(data_dir, flag)  # Absolute and normalised; a URL gets the mount hint.
  parts = path.split(os.sep)
  for name in (SHAPES_NAME, FOLDER_NAME):
    if name in parts[1:]:
      parent = os.sep.join(parts[:parts.index(name, 1)]) or os.sep
      raise UserError(f"{flag} {data_dir} is inside the TFDS data dir {parent} (its {name} "
                      f"folder): give {parent}")
  if not os.path.isdir(path):
    raise UserError(f"{flag} {data_dir} does not exist: give the demo's W/data, or build the "
                    f"data with `flowtok data build --config CFG --data_dir {data_dir}`")
  return data_dir


def build(data_cfg, data_dir: str) -> str:
  """Prepares the dataset named by `data_cfg` in `data_dir` (ArrayRecord).

  captioned_shapes is rendered unless this exact variant exists (its name fixes its content);
  image_caption_folder is always rebuilt from the folder; any other TFDS dataset is only checked
  (prepare it with `tfds build`).

  Args:
    data_cfg: the `data` section of a config.
    data_dir: TFDS data dir.
  Returns:
    One line: dataset/config version, split sizes and the path.
  """
  paths.writable_dir(data_dir, "data dir", existing_may_be_read_only=True)
  builder = _own_builder(data_cfg, data_dir)
  if builder is None:
    return _summary(_prepared_builder(data_cfg, data_dir), "prepared")
  if _is_prepared(builder) and data_cfg.name == SHAPES_NAME:
    return _summary(builder, "already built")
  inner = os.path.join(data_dir, "data")
  if (data_cfg.name == SHAPES_NAME and not os.path.isdir(os.path.join(data_dir, SHAPES_NAME))
      and os.path.isdir(inner) and _is_prepared(_own_builder(data_cfg, inner))):
    # A demo's workdir W keeps its dataset in W/data: building a second copy into W is a slip.
    raise UserError(f"{data_dir} holds no {SHAPES_NAME} but {inner} does (a demo's workdir?): "
                    f"give --data_dir {inner}")
  mode = None
  if data_cfg.name == FOLDER_NAME:
    builder.scan()  # Fail on bad input before tfds deletes the previous version.
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  # TFDS prints its progress to stdout, which belongs to the commands' results (JSON, paths);
  # its bars only on a terminal (in a log or a pipe their carriage returns make one long line).
  tfds.display_progress_bar(sys.stderr.isatty())
  # ERROR: tfds warns about its own half-written variant folder ("has no dataset_info.json")
  # while it builds; our builders report through their own logger.
  with _absl_level(logging.ERROR), contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=mode or tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  note = ""
  if getattr(builder, "num_skipped", 0):
    note = f"skipped {builder.num_skipped} unreadable images"
  return _summary(builder, note)


def data_source(data_cfg, split: str, data_dir: str, decoders=None):
  """Random-access source of a prepared split: `len(src)`, `src[i]` -> dict of numpy values.

  Works for any TFDS ArrayRecord dataset by name (`data.name`); for captioned_shapes and
  image_caption_folder it opens the variant the config's knobs name. Text comes back as bytes,
  images as uint8 [H, W, 3].

  Args:
    data_cfg: the `data` section of a config (name, image_size, shapes.*, image_key, ...).
    split: a TFDS split spec, e.g. 'train', 'val', 'train[:90%]'.
    data_dir: TFDS data dir.
    decoders: optional tfds decoders, e.g. `{'image': tfds.decode.SkipDecoding()}` to read
      captions without paying for image decoding.
  Returns:
    A tfds ArrayRecord data source (a Sequence of example dicts) wrapped so that a damaged record
    is a UserError naming it.
  """
  if "," in split:
    raise UserError(f"split {split!r}: one split spec at a time (TFDS joins splits with '+', "
                    "e.g. 'test+val')")
  builder = _prepared_builder(data_cfg, data_dir)
  info = builder.info
  for base in re.findall(r"(?:^|\+)\s*([A-Za-z0-9_]+)", split):
    if base not in info.splits:
      raise UserError(f"dataset {data_cfg.name} has no split {base!r} "
                      f"(splits: {', '.join(info.splits)})")
  for key_name in ("image_key", "caption_key", "i2t_caption_key"):
    key = data_cfg.get(key_name)
    if key and not _has_feature(info.features, key):
      hint = (f"; for a dataset without one, give its caption feature, e.g. "
              f"--config.data.i2t_caption_key={data_cfg.caption_key}"
              if key_name == "i2t_caption_key" else "")
      raise UserError(f"data.{key_name}={key!r} is not a feature of {data_cfg.name} "
                      f"(features: {', '.join(info.features)}; nested ones as 'a/b'){hint}")
  if _ARRAY_RECORD not in {f.value for f in info.available_file_formats()}:
    raise UserError(f"dataset {data_cfg.name} in {data_dir} is not stored as ArrayRecord: "
                    + _tfds_build_hint(data_cfg.name, data_dir))
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except (RuntimeError, OSError, ValueError) as e:  # Truncated or overwritten record files.
    if isinstance(e, ValueError) and "split" in str(e).lower():  # A bad spec, e.g. 'val[:x]'.
      raise UserError(f"cannot read split {split!r}: {_first_line(e)}") from None
    raise UserError(f"dataset {data_cfg.name} in {data_dir} is damaged ({_first_line(e)}); "
                    "rebuild it") from None
  return CheckedSource(source, f"split {split!r} of {data_cfg.name} in {data_dir}")


def _first_line(e: BaseException) -> str:
  text = str(e).splitlines()[0][:160] if str(e) else ""
  return f"{type(e).__name__}: {text}"


class CheckedSource:
  """A record source whose unreadable records are UserErrors naming the record, not tracebacks.

  Opening a split checks only the files' footers; a record overwritten inside a file fails when it
  is read, which happens in the training loop or in a grain worker process. Picklable when the
  wrapped source is (grain sends sources to its workers).
  """

  def __init__(self, source, where: str):
    self.source = source
    self.where = where

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    try:
      return self.source[index]
    except (RuntimeError, OSError, ValueError) as e:  # A damaged chunk of an ArrayRecord file.
      if "should be in [0" in str(e):  # An index out of range is the caller's error, not damage.
        raise
      raise UserError(f"cannot read record {index} of {self.where} (damaged? {_first_line(e)}); "
                      "rebuild the dataset") from None

  def __repr__(self) -> str:
    return f"CheckedSource({self.where})"


def read_captions(data_cfg, split: str, data_dir: str, limit: int | None = None) -> list[str]:
  """The first `limit` captions of a split (all when None), without decoding images."""
  source = data_source(data_cfg, split, data_dir,
                       decoders={data_cfg.image_key: tfds.decode.SkipDecoding()})
  n = len(source) if limit is None else min(limit, len(source))
  captions = []
  for i in range(n):  # Every caption of an example that holds several (COCO: about five).
    captions.extend(example_lib.text(c) for c in example_lib.captions_of(
        example_lib.feature(source[i], data_cfg.caption_key)))
  return captions


def _has_feature(features, key: str) -> bool:
  """Whether a tfds FeaturesDict has `key`, where 'a/b' walks into nested dicts / sequences."""
  node = features
  for part in key.split("/"):
    while isinstance(node, tfds.features.Sequence):
      node = node.feature
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def write_preview(data_cfg, data_dir: str, split: str = "train", num: int = 16,
                  out: str = "preview.png") -> str:
  """Writes a grid of the first `num` examples of a split, each captioned, as one PNG.

  Small images are upscaled by an integer factor (nearest neighbour, to >= 128 px), large ones
  shrunk to fit a 192 px cell; the caption is wrapped under each image.

  Returns:
    `out`.
  """
  if num <= 0:
    raise UserError(f"--num must be positive, got {num}")
  if os.path.isdir(out) or os.path.splitext(out)[1].lower() != ".png":
    raise UserError(f"--out {out} must be a .png file path")
  src = data_source(data_cfg, split, data_dir)
  image_key, caption_key = data_cfg.get("image_key", "image"), data_cfg.get("caption_key",
                                                                            "caption")
  examples = [src[i] for i in range(min(num, len(src)))]
  if not examples:
    raise UserError(f"split {split!r} of {data_cfg.name} is empty")
  tiles = []
  for ex in examples:
    image = PIL.Image.fromarray(example_lib.to_rgb_uint8(example_lib.feature(ex, image_key)))
    w, h = image.size
    if max(w, h) <= 128:
      factor = min(3, max(2, math.ceil(128 / max(w, h))))
      image = image.resize((w * factor, h * factor), PIL.Image.NEAREST)
    else:
      image.thumbnail((192, 192))
    caption = example_lib.pick_caption(example_lib.feature(ex, caption_key), None)
    tiles.append((image, example_lib.text(caption)))
  font = PIL.ImageFont.load_default()
  cell_w = max(192, max(im.size[0] for im, _ in tiles)) + 8
  chars = max(8, int(cell_w / max(1.0, font.getlength("x"))) - 2)
  line_h = font.getbbox("Ag")[3] + 3
  wrapped = [textwrap.wrap(caption, chars) or [""] for _, caption in tiles]
  cell_h = max(im.size[1] for im, _ in tiles) + 8 + line_h * max(len(w) for w in wrapped)
  cols = math.ceil(math.sqrt(len(tiles)))
  rows = math.ceil(len(tiles) / cols)
  grid = PIL.Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(grid)
  for k, ((image, _), lines) in enumerate(zip(tiles, wrapped)):
    x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 4
    grid.paste(image, (x + (cell_w - 8 - image.size[0]) // 2, y))
    for j, line in enumerate(lines):
      draw.text((x, y + image.size[1] + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  grid.save(out)
  return out
