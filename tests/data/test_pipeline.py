"""grain pipeline: shapes and values, seeded order, epochs, resume (state and orbax), per-process
shards, resize/crop, errors, worker processes."""
import io
import json
import os
import pickle
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from flowtok_jax import cli
from flowtok_jax.data import builders
from flowtok_jax.data import examples as example_lib
from flowtok_jax.data import pipeline
from flowtok_jax.data import text_tokenizer as tt
from flowtok_jax.errors import UserError


@pytest.fixture(scope="module")
def data(shapes_data_dir):
  data_cfg, data_dir = shapes_data_dir
  data_cfg = data_cfg.copy_and_resolve_references()
  data_cfg.preload = False  # The per-element pipeline; the preload tests turn it on.
  source = builders.data_source(data_cfg, "train", data_dir)
  examples = [source[i] for i in range(len(source))]
  tok = tt.TextTokenizer.train([ex[data_cfg.caption_key] for ex in examples], vocab_size=128,
                               model_type="bpe")
  return data_cfg, data_dir, tok, examples


def _make(data, data_cfg=None, **kw):
  default_cfg, data_dir, tok, _ = data
  args = dict(split="train", global_batch_size=4, seed=0, process_index=0, process_count=1,
              data_dir=data_dir)
  args.update(kw)
  return pipeline.make_iterator(data_cfg or default_cfg, tok, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _index_of(examples):
  """Image bytes -> position in the split, to read back which example a batch row is."""
  table = {ex["image"].tobytes(): i for i, ex in enumerate(examples)}
  assert len(table) == len(examples), "test data needs distinct images"
  return table


def _indices(batches, table):
  return [table[np.round(img * 255).astype(np.uint8).tobytes()]
          for b in batches for img in b["image"]]


def test_batch_layout_and_content(data):
  data_cfg, _, tok, examples = data
  it = pipeline.make_eval_iterator(data_cfg, tok, split="train", global_batch_size=4,
                                   process_index=0, process_count=1, data_dir=data[1])
  batch = next(it)
  s, l = data_cfg.image_size, data_cfg.max_text_len
  assert batch["image"].shape == (4, s, s, 3) and batch["image"].dtype == np.float32
  assert batch["text_ids"].shape == (4, l) and batch["text_ids"].dtype == np.int32
  assert batch["truncated"].shape == (4,) and batch["truncated"].dtype == bool
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].max() > 0.5  # really scaled by 1/255, not left in [0, 255] or zeroed
  # Unshuffled: row i is example i, image and caption together.
  for i in range(4):
    np.testing.assert_allclose(batch["image"][i], examples[i]["image"] / 255.0, atol=1e-6)
    expected_ids, expected_trunc = tok.encode([examples[i][data_cfg.caption_key]], l)
    np.testing.assert_array_equal(batch["text_ids"][i], expected_ids[0])
    assert batch["truncated"][i] == expected_trunc[0]


def test_seed_determines_order(data):
  a, b, c = (_take(_make(data, seed=s), 3) for s in (0, 0, 1))
  _assert_same(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_each_epoch_is_a_new_permutation(data):
  examples = data[3]
  n = len(examples)
  table = _index_of(examples)
  order = _indices(_take(_make(data, global_batch_size=1, seed=3), 2 * n), table)
  first, second = order[:n], order[n:]
  assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
  assert first != second
  assert first != list(range(n))  # shuffled at all


def test_resume_from_get_state(data):
  reference = _take(_make(data, seed=5), 7)
  it = _make(data, seed=5)
  _take(it, 4)
  state = it.get_state()
  resumed = _make(data, seed=5)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), reference[4:])


def test_resume_through_orbax(data, tmp_path):
  reference = _take(_make(data, seed=2), 6)
  it = _make(data, seed=2)
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  resumed = _make(data, seed=2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same(_take(resumed, 3), reference[3:])


def test_process_shards_are_disjoint_and_cover_the_split(data):
  data_cfg, data_dir, tok, examples = data
  table = _index_of(examples)
  seen = []
  for index in range(2):
    it = pipeline.make_eval_iterator(data_cfg, tok, split="train", global_batch_size=6,
                                     process_index=index, process_count=2, data_dir=data_dir)
    batches = list(it)
    assert all(b["image"].shape[0] <= 3 for b in batches)
    seen.append(_indices(batches, table))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(len(examples)))
  # Shuffled training shards stay disjoint and cover the split too (one epoch, no remainder
  # dropped).
  n = len(examples)
  train = [_indices(list(_make(data, global_batch_size=2, process_index=i, process_count=2,
                               seed=9, num_epochs=1, drop_remainder=False)), table)
           for i in range(2)]
  assert not set(train[0]) & set(train[1])
  assert sorted(train[0] + train[1]) == list(range(n))
  # ... and global batch i is the 1-process batch i row for row (process p holds a block).
  one = _indices(_take(_make(data, global_batch_size=4, seed=9), 3), table)
  two = [_indices(_take(_make(data, global_batch_size=4, seed=9, process_index=i,
                              process_count=2), 3), table) for i in range(2)]
  for i in range(3):
    assert one[4 * i:4 * i + 4] == two[0][2 * i:2 * i + 2] + two[1][2 * i:2 * i + 2]


def _ramp(h, w):
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  return y, x


def test_resize_center_crop_against_numpy():
  # Crop only: the shorter side is already S, no resampling, exact.
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (16, 27, 3), dtype=np.uint8)  # odd excess: floor half on the left
  np.testing.assert_array_equal(pipeline.resize_center_crop(wide, 16), wide[:, 5:21])
  tall = rng.integers(0, 256, (23, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pipeline.resize_center_crop(tall, 16), tall[3:19])
  # Resize + crop: bicubic reproduces a linear ramp, so the expected value at each output pixel is
  # the ramp at that pixel's centre mapped back to the input (interior pixels, away from edges).
  h, w, s = 40, 102, 20  # -> resized to 20 x 51, then columns 15:35 kept
  y, x = _ramp(h, w)
  image = np.stack([2 * x + 20, 5 * y + 10, np.full_like(x, 77)], -1).round().astype(np.uint8)
  out = pipeline.resize_center_crop(image, s)
  assert out.shape == (s, s, 3) and out.dtype == np.uint8
  scale = h / s  # input pixels per output pixel
  oy, ox = _ramp(s, s)
  src_x = (ox + 15 + 0.5) * scale - 0.5
  src_y = (oy + 0.5) * scale - 0.5
  inner = (slice(3, -3), slice(3, -3))
  np.testing.assert_allclose(out[..., 0][inner], (2 * src_x + 20)[inner], atol=1.01)
  np.testing.assert_allclose(out[..., 1][inner], (5 * src_y + 10)[inner], atol=1.01)
  assert (out[..., 2] == 77).all()


@pytest.mark.parametrize("cache", [False, True])
def test_pipeline_decodes_bytes_and_crops_non_square(data, cache):
  data_cfg, _, tok, _ = data
  s = data_cfg.image_size
  rng = np.random.default_rng(1)
  wide = rng.integers(0, 256, (s, s + 8, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (s, s), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(wide).save(png, format="PNG")
  source = [{"image": png.getvalue(), "caption": b"a red circle"},
            {"image": gray, "caption": b"a blue square"}]
  cfg = data_cfg.copy_and_resolve_references()
  cfg.i2t_caption_key = None  # Only captioned_shapes has a reference caption.
  cfg.cache_decoded = cache
  batch = next(pipeline.make_iterator(cfg, tok, split="train", global_batch_size=2, seed=0,
                                      process_index=0, process_count=1, shuffle=False,
                                      source=source))
  np.testing.assert_allclose(batch["image"][0], wide[:, 4:4 + s] / 255.0, atol=1e-6)
  np.testing.assert_allclose(batch["image"][1], np.stack([gray] * 3, -1) / 255.0, atol=1e-6)
  assert tok.decode(batch["text_ids"]) == ["a red circle", "a blue square"]
  bad = [{"image": b"not an image", "caption": b"a red circle"}]
  with pytest.raises(UserError, match="undecodable image"):
    next(pipeline.make_iterator(cfg, tok, split="train", global_batch_size=1, seed=0,
                                process_index=0, process_count=1, source=bad))


@pytest.mark.parametrize("cache", [False, True])
def test_nested_multi_caption_feature(data, cache):
  """COCO-style examples: data.caption_key='captions/text' names a list of captions per image;
  each epoch draws one of them from the seeded stream, the same for the same seed (with the
  decoded cache too: it keeps every caption, and the draw happens after it)."""
  data_cfg, _, tok, _ = data
  s = data_cfg.image_size
  caps = [b"a red circle", b"a blue square", b"a green triangle"]
  source = [{"image": np.zeros((s, s, 3), np.uint8),
             "captions": {"id": np.arange(3), "text": np.array(caps, dtype=object)}}]
  cfg = data_cfg.copy_and_resolve_references()
  cfg.caption_key = "captions/text"
  cfg.i2t_caption_key = None
  cfg.cache_decoded = cache

  def drawn(seed):
    it = pipeline.make_iterator(cfg, tok, split="train", global_batch_size=1, seed=seed,
                                process_index=0, process_count=1, source=source)
    return [tok.decode(next(it)["text_ids"])[0] for _ in range(30)]

  first = drawn(0)
  assert set(first) == {c.decode() for c in caps}  # Every caption is used over 30 epochs.
  assert drawn(0) == first
  assert drawn(1) != first
  cfg.caption_key = "captions/txt"
  with pytest.raises(UserError,
                     match="no feature 'captions/txt'.*captions has: \\['id', 'text'\\]"):
    drawn(0)


def test_i2t_caption_key_adds_the_reference_caption_ids(data):
  """data.i2t_caption_key: each row also carries the ids of that feature ('i2t_text_ids'),
  while 'text_ids' and the order of the stream stay what they were without it."""
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  cfg.i2t_caption_key = None
  plain = _take(_make(data, data_cfg=cfg), 3)
  cfg.i2t_caption_key = "reference_caption"
  with_ref = _take(_make(data, data_cfg=cfg), 3)
  table = _index_of(examples)
  for a, b in zip(plain, with_ref):
    assert set(b) == set(a) | {"i2t_text_ids"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    rows = _indices([b], table)
    want, _ = tok.encode([examples[i]["reference_caption"].decode() for i in rows],
                         data_cfg.max_text_len)
    np.testing.assert_array_equal(b["i2t_text_ids"], want)
  assert any((b["i2t_text_ids"] != b["text_ids"]).any() for b in with_ref)
  cfg.i2t_caption_key = "reference"
  with pytest.raises(UserError, match="i2t_caption_key='reference' is not a feature"):
    _make(data, data_cfg=cfg)


class _CountingSource:
  """A list of examples that counts how often each is read."""

  def __init__(self, examples):
    self.examples, self.reads = examples, np.zeros(len(examples), int)

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, index):
    self.reads[index] += 1
    return self.examples[index]


def test_decoded_cache_reads_each_record_once_and_changes_no_batch(data, monkeypatch):
  """data.cache_decoded: three epochs give the batches the plain pipeline gives, row for row
  (images, caption draws, reference captions), and read each record from the source once."""
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  assert cfg.i2t_caption_key  # The cache must keep both caption features.
  steps = 3 * len(examples) // 16

  def batches(cache, source):
    cfg.cache_decoded = cache
    return _take(pipeline.make_iterator(cfg, tok, split="train", global_batch_size=16, seed=3,
                                        process_index=0, process_count=1, source=source), steps)

  plain_source, cached_source = _CountingSource(examples), _CountingSource(examples)
  plain = batches(False, plain_source)
  _assert_same(batches(True, cached_source), plain)
  assert plain_source.reads.min() >= 3  # Once per epoch (plus what the prefetch read ahead).
  np.testing.assert_array_equal(cached_source.reads, 1)
  # One ordered pass (evaluation) has nothing to gain: the records are read as they are.
  cfg.cache_decoded = True
  monkeypatch.setattr(pipeline, "DecodedCache", None)
  pipeline.make_eval_iterator(cfg, tok, split="train", global_batch_size=16, process_index=0,
                              process_count=1, source=examples)


def test_a_decoded_cache_larger_than_half_the_ram_is_a_user_error(data, monkeypatch):
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  cfg.cache_decoded = True
  s = cfg.image_size
  iterator = lambda: pipeline.make_iterator(cfg, tok, split="train", global_batch_size=4, seed=0,
                                            process_index=0, process_count=1, source=examples)
  monkeypatch.setattr(pipeline, "_physical_memory", lambda: 2 * len(examples) * s * s * 3 - 2)
  with pytest.raises(UserError, match="cache_decoded: split 'train' would take .* over half"):
    iterator()
  monkeypatch.setattr(pipeline, "_physical_memory", lambda: 2 * len(examples) * s * s * 3)
  next(iterator())
  cfg.num_workers = 2  # Each worker process fills its own copy.
  with pytest.raises(UserError, match=r"\(2 copies\), over half"):
    iterator()


def test_decoded_cache_holds_only_what_training_reads_and_pickles_empty(data):
  data_cfg, _, _, examples = data
  s = data_cfg.image_size
  cache = pipeline.DecodedCache(examples, "image", ("caption", "reference_caption", None), s)
  assert len(cache) == len(examples) and cache.nbytes() == len(examples) * s * s * 3
  got = cache[5]
  assert set(got) == {"image", "caption", "reference_caption"}  # Not 'objects', 'relation'.
  np.testing.assert_array_equal(got["image"], examples[5]["image"])
  assert got["caption"] == examples[5]["caption"]
  worker = pickle.loads(pickle.dumps(cache))
  assert worker._images is None  # pylint: disable=protected-access
  np.testing.assert_array_equal(worker[5]["image"], got["image"])


def test_pick_caption():
  """One caption of a single-caption feature or of a list (the first one without an rng)."""
  assert example_lib.pick_caption(np.array([b"a", b"b"], dtype=object), None) == b"a"
  assert example_lib.pick_caption(b"a red circle", np.random.default_rng(0)) == b"a red circle"
  with pytest.raises(UserError, match="empty list of captions"):
    example_lib.pick_caption([], None)


def test_whole_batches_are_the_same_count_on_every_process(data):
  """A trailing partial global batch of at least one host block went to process 0 only: one
  more batch there (a collective evaluation step the others never run). Dropped for all now."""
  data_cfg, data_dir, tok, examples = data
  n = len(examples)
  b = next(b for b in range(2, 64, 2) if n % b >= b // 2 and n // b >= 1)  # Such a remainder.
  counts = [len(list(_make(data, global_batch_size=b, seed=9, num_epochs=1, process_index=i,
                           process_count=2))) for i in range(2)]
  assert counts == [n // b] * 2
  assert len(list(_make(data, global_batch_size=b, seed=9, num_epochs=1))) == n // b
  evals = [len(list(pipeline.make_eval_iterator(data_cfg, tok, split="train",
                                                global_batch_size=b, process_index=i,
                                                process_count=2, data_dir=data_dir,
                                                whole_batches=True))) for i in range(2)]
  assert evals == [n // b] * 2


def test_bad_batch_and_process_settings(data):
  with pytest.raises(UserError, match="not divisible"):
    _make(data, global_batch_size=5, process_count=2)
  with pytest.raises(UserError, match="process_index"):
    _make(data, process_index=2, process_count=2)
  with pytest.raises(UserError, match="no full global batch"):
    _make(data, global_batch_size=10_000, num_epochs=1)


def test_worker_processes_give_the_same_batches_and_resume(data, tmp_path):
  data_cfg = data[0].copy_and_resolve_references()
  data_cfg.num_workers = 2
  in_process = _take(_make(data, seed=4), 6)
  it = pipeline.make_iterator(data_cfg, data[2], split="train", global_batch_size=4, seed=4,
                              process_index=0, process_count=1, data_dir=data[1])
  try:
    _assert_same(_take(it, 3), in_process[:3])
    # The per-worker state goes through orbax's JSON too; restoring restarts the workers there.
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
      mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
      mngr.wait_until_finished()
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
      mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))
    _assert_same(_take(it, 3), in_process[3:])
  finally:
    it.close()


@pytest.mark.parametrize("num_workers,preload", [(0, False), (2, False), (0, True)])
def test_a_damaged_record_read_while_training_is_a_user_error(data, tmp_path, num_workers,
                                                             preload):
  # The files' footers are intact, so the split opens; the damage surfaces when a batch reads it,
  # in this process or in a grain worker (with data.preload: when the split is read, up front).
  data_cfg, data_dir, tok, _ = data
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  variant = builders._prepared_builder(data_cfg, str(copy)).data_dir  # pylint: disable=protected-access
  (record,) = [os.path.join(variant, f) for f in os.listdir(variant)
               if "-train.array_record" in f]
  size = os.path.getsize(record)
  with open(record, "r+b") as fh:
    fh.seek(size // 2)
    fh.write(b"\0" * 4000)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.num_workers, cfg.preload = num_workers, preload
  it = None
  try:
    with pytest.raises(UserError, match=r"cannot read record \d+ of split 'train'.*damaged"):
      it = pipeline.make_iterator(cfg, tok, split="train", global_batch_size=64, seed=0,
                                  process_index=0, process_count=1, shuffle=False,
                                  data_dir=str(copy))
      _take(it, 4)  # 256 records: the damaged middle is in one of the four batches.
    assert (it is None) == preload
  finally:
    if num_workers and it is not None:
      it.close()


def test_bench_pipeline_command(shapes_data_dir, capsys):
  config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py:runlocal")
  cli.main(["bench", "pipeline", "--config", config, "--data_dir", shapes_data_dir[1],
            "--batch_size", "8", "--num_batches", "3", "--num_workers", "0"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["bench"] == "pipeline" and result["num_batches"] == 3
  assert result["examples_per_sec"] > 0 and result["first_batch_s"] > 0


@pytest.mark.parametrize("process_count", [1, 2])
def test_preload_gives_the_plain_batches_and_iterator_states(data, tmp_path, process_count):
  """data.preload: the batches of the per-element pipeline, row for row (images, captions,
  reference captions) over epochs and process shards; each record read once; its iterator
  state is the plain one's, so a checkpoint of either restores into the other."""
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  steps = 3 * len(examples) // 16

  def iterator(preload, source, index=0):
    cfg.preload = preload
    return pipeline.make_iterator(cfg, tok, split="train", global_batch_size=16, seed=3,
                                  process_index=index, process_count=process_count,
                                  source=source)

  for index in range(process_count):
    counting = _CountingSource(examples)
    preloaded, plain = iterator(True, counting, index), iterator(False, examples, index)
    np.testing.assert_array_equal(counting.reads, 1)
    got, want = _take(preloaded, steps), _take(plain, steps)
    assert set(got[0]) == {"image", "text_ids", "truncated", "i2t_text_ids"}
    _assert_same(got, want)
    assert preloaded.get_state() == plain.get_state()
  # Orbax: a plain iterator's checkpoint restores a preloaded one, mid-epoch.
  plain, preloaded = iterator(False, examples), iterator(True, examples)
  _take(plain, 5)
  expected = _take(iterator(False, examples), 8)[5:]
  with ocp.CheckpointManager(str(tmp_path / f"ckpt{process_count}")) as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(plain)))
    mngr.wait_until_finished()
    mngr.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(preloaded)))
  _assert_same(_take(preloaded, 3), expected)


def test_preload_falls_back_for_several_captions_and_for_worker_processes(data, monkeypatch):
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  cfg.preload = True
  several = [dict(ex, caption=np.array([ex["caption"], b"another"], dtype=object))
             for ex in examples]
  make = lambda source: pipeline.make_iterator(
      cfg, tok, split="train", global_batch_size=4, seed=0, process_index=0, process_count=1,
      source=source)
  assert pipeline.Preloaded.from_source(several, cfg, tok) is None
  cfg.preload, plain = False, _take(make(several), 4)
  cfg.preload = True
  _assert_same(_take(make(several), 4), plain)  # Drawn per element, as without preload.
  s = cfg.image_size
  monkeypatch.setattr(pipeline, "_physical_memory", lambda: 2 * len(examples) * s * s * 3 - 2)
  with pytest.raises(UserError, match="preload: split 'train' would take .* over half"):
    make(examples)
  # Worker processes read record by record (the batches stay the same).
  monkeypatch.undo()
  cfg.preload, plain = False, _take(make(examples), 3)
  cfg.preload, cfg.num_workers = True, 2
  it = make(examples)
  try:
    _assert_same(_take(it, 3), plain)
  finally:
    it.close()


def test_preload_waits_for_a_run_of_at_least_one_epoch(data):
  """A run that reads less than the split (the demo's CLIP: a third of an epoch) reads the
  records it needs as it goes; one of an epoch or more reads them all up front."""
  data_cfg, _, tok, examples = data
  cfg = data_cfg.copy_and_resolve_references()
  cfg.preload = True
  for read, up_front in ((len(examples) - 1, False), (len(examples), True), (None, True)):
    counting = _CountingSource(examples)
    it = pipeline.make_iterator(cfg, tok, split="train", global_batch_size=4, seed=0,
                                process_index=0, process_count=1, source=counting,
                                read_examples=read)
    assert (counting.reads.min() == 1) == up_front, read
    next(it)
