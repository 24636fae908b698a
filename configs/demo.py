r"""The embedded default: every stage of FlowTok on the captioned-shapes world, on a 2-core CPU.

    flowtok demo --workdir runs/demo
    flowtok data build --config configs/demo.py --data_dir runs/demo/data
    flowtok data show  --config configs/demo.py --data_dir runs/demo/data

Arguments (after a colon): `runlocal` shrinks everything to a few seconds (tests, smoke runs);
`res=32` renders the dataset at 32 px instead of 64.
"""
import ml_collections

from flowtok_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, res=64)
  config = ml_collections.ConfigDict()
  config.seed = 0  # Global seed: model init, per-step randomness.

  # --- Data: the captioned-shapes dataset (DESIGN.md §6), prepared as TFDS ArrayRecord. ---
  data = config.data = ml_collections.ConfigDict()
  data.name = "captioned_shapes"  # A TFDS dataset name; any TFDS ArrayRecord dataset works.
  data.data_dir = None  # TFDS data dir (str); `flowtok demo` uses W/data.
  data.image_key = "image"  # Feature holding the uint8 image.
  data.caption_key = "caption"  # Feature holding the caption text.
  data.image_size = arg.res  # Pixels per side after resize / centre crop.
  data.train_split = "train"  # Split the training loop reads.
  data.eval_split = "val"  # Split periodic evaluation reads.
  data.shuffle_seed = 0  # Seed of the per-epoch shuffle (same seed -> same order).
  data.num_workers = 0  # grain worker processes (0: decode in the training process).
  data.on_bad_image = "skip"  # 'skip' (count and log) or 'error' on an undecodable image.
  data.max_text_len = 16  # L: caption tokens after padding/truncation; must equal image tokens K.
  data.read_threads = 2  # Threads preparing batches in each reading process (grain ReadOptions).
  data.prefetch_batches = 2  # Batches prepared ahead per reading process (bounds host memory).
  data.folder = None  # image_caption_folder: folder with images + captions.jsonl (str).
  data.folder_val_fraction = 0.05  # image_caption_folder: share of the images put in split 'val'.
  # Captioned-shapes builder knobs (ignored for other datasets).
  data.shapes = ml_collections.ConfigDict()
  data.shapes.seed = 0  # Rendering seed: same seed -> byte-identical dataset.
  data.shapes.num_train = 20_000  # Examples in train.
  data.shapes.num_val = 1_000  # Examples in val.
  data.shapes.num_test = 1_000  # Examples in test.
  data.shapes.num_compositional = 1_000  # Examples in compositional (held-out pairs only).
  data.shapes.two_object_fraction = 0.5  # Share of two-object scenes.
  data.shapes.heldout = ("purple triangle", "cyan circle", "yellow square")  # Never in train.
  data.shapes.paraphrase_prob = 0.3  # Chance that each optional caption slot is paraphrased.

  # --- Text tokenizer: sentencepiece trained in-process on the training captions. ---
  text = config.text_tokenizer = ml_collections.ConfigDict()
  # BPE at 128 learns every caption word as one piece (<= 13 tokens + EOS per shapes caption);
  # unigram stalls near 55 pieces on this closed grammar and truncates most captions at L = 16.
  text.vocab_size = 128  # Requested vocabulary (pad/unk/bos/eos included).
  text.model_type = "bpe"  # sentencepiece model type: unigram | bpe | word | char.
  text.lowercase = True  # Case-fold all text, so "A Red Circle" encodes like "a red circle".
  text.num_captions = 20_000  # Training captions read to train it.

  if arg.runlocal:
    data.shapes.num_train = 256
    data.shapes.num_val = 64
    data.shapes.num_test = 64
    data.shapes.num_compositional = 64
    text.num_captions = 256
  return config
