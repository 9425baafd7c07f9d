"""Every seqio Task hiertx trains on, registered in this one module.

Corpora (`config.data.task`):
  stdlib            built in, offline: the running Python's standard-library
                    `.py` sources (test folders and site-packages excluded,
                    about 11 MB on CPython 3.11), each file one document,
                    split 98/1/1 into train/validation/test by a hash of its
                    relative path. Present wherever hiertx is installed.
  text_files        local text files given by glob (`config.data.text_files`),
                    split into train/validation/test by
                    `config.data.split_fractions`: whole files by a hash of
                    their path when the glob matches several
                    (`data.split_by=file`), each file cut contiguously at line
                    boundaries when it matches one (`data.split_by=cut`).
  tiny_shakespeare, lm1b, pg19, wiki40b, c4
                    TFDS corpora for connected clusters (downloaded by TFDS).
                    lm1b has no validation split: its test split serves both;
                    c4 has no test split: its validation split serves both.

Vocabulary (`config.data.vocab`): "byte" (UTF-8 bytes, seqio.ByteVocabulary,
259 ids) or the path of a SentencePiece model.

Every task tokenizes, appends EOS to each document and cuts documents into
pieces of at most `seq_len` tokens; the feature converter then packs pieces
into rows (see `hiertx.data`).
"""

import functools
import glob
import hashlib
import logging
import os
import sysconfig

import numpy as np
import seqio
import tensorflow as tf

from hiertx.errors import ConfigError, DataError


class _QuietUncachedWarning(logging.Filter):
  """Resuming skips to the exact batch (see hiertx.data), which is what seqio's
  warning about uncached function sources and restarts is concerned with."""

  def filter(self, record):
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUncachedWarning())

SPLITS = ("train", "validation", "test")
SPLIT_BY = ("auto", "file", "cut")
TFDS_CORPORA = {
    # name: (tfds name, text feature, split mapping)
    "tiny_shakespeare": ("tiny_shakespeare:1.0.0", "text",
                         {"train": "train", "validation": "validation", "test": "test"}),
    "lm1b": ("lm1b:1.1.0", "text", {"train": "train", "validation": "test", "test": "test"}),
    "pg19": ("pg19:0.1.1", "book_text",
             {"train": "train", "validation": "validation", "test": "test"}),
    "wiki40b": ("wiki40b/en:1.3.0", "text",
                {"train": "train", "validation": "validation", "test": "test"}),
    "c4": ("c4/en:3.1.0", "text", {"train": "train", "validation": "validation",
                                   "test": "validation"}),
}
TASKS = ("stdlib", "text_files", *TFDS_CORPORA)


# ----------------------------------------------------------------------------
# Vocabularies and their byte lengths (for bits per byte).


@functools.lru_cache(maxsize=None)
def vocabulary(spec: str) -> seqio.Vocabulary:
  if spec == "byte":
    return seqio.ByteVocabulary()
  if not os.path.isfile(spec):
    raise ConfigError("data.vocab", f"must be 'byte' or a SentencePiece model file; "
                      f"{spec!r} does not exist")
  return seqio.SentencePieceVocabulary(spec)


def token_bytes(vocab: seqio.Vocabulary) -> np.ndarray:
  """int32 [V]: UTF-8 bytes each token id stands for (0 for pad/EOS/UNK/control)."""
  n = vocab.vocab_size
  out = np.zeros(n, np.int32)
  if isinstance(vocab, seqio.ByteVocabulary):
    out[3:259] = 1  # ids 0..2 are pad, EOS, UNK; byte b is id b + 3
    return out
  sp = vocab.tokenizer
  for i in range(min(n, sp.get_piece_size())):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    piece = sp.id_to_piece(i)
    out[i] = 1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
  return out


# ----------------------------------------------------------------------------
# Document sources.


def _split_of_path(relpath: str, fractions=(0.98, 0.01, 0.01)) -> str:
  """A file's split from a hash of its path: stable as files come and go."""
  bucket = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 10000 / 10000
  return "train" if bucket < fractions[0] else (
      "validation" if bucket < fractions[0] + fractions[1] else "test")


@functools.lru_cache(maxsize=None)
def stdlib_files() -> dict[str, tuple[str, ...]]:
  """Standard-library sources by split, as sorted absolute paths."""
  root = sysconfig.get_paths()["stdlib"]
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
  by_split = {s: [] for s in SPLITS}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for f in sorted(filenames):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        by_split[_split_of_path(os.path.relpath(path, root))].append(path)
  if not by_split["train"]:
    raise DataError(f"no Python standard-library sources found under {root}")
  return {s: tuple(v) for s, v in by_split.items()}


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror}") from e


def stdlib_documents(split: str) -> list[bytes]:
  return [_read(p) for p in stdlib_files()[split]]


def _cut(text: bytes, fractions) -> dict[str, bytes]:
  """Cuts one file contiguously into splits, each cut moved to the next newline."""
  cuts, acc = [0], 0.0
  for f in fractions[:-1]:
    acc += f
    pos = int(len(text) * acc)
    nl = text.find(b"\n", pos)
    cuts.append(len(text) if nl < 0 else nl + 1)
  cuts.append(len(text))
  cuts = [max(a, b) for a, b in zip(cuts, [0] + cuts[:-1])]  # keep cuts monotone
  return {s: text[cuts[i]:cuts[i + 1]] for i, s in enumerate(SPLITS)}


def text_file_paths(pattern: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise DataError(f"config.data.text_files={pattern!r} matches no files")
  return paths


def split_by(data_cfg) -> str:
  """How text files are split: whole files (several files) or cut (one file)."""
  if data_cfg.split_by not in SPLIT_BY:
    raise ConfigError("data.split_by", f"{data_cfg.split_by!r} is not one of {SPLIT_BY}")
  if data_cfg.split_by != "auto":
    return data_cfg.split_by
  return "cut" if len(text_file_paths(data_cfg.text_files)) == 1 else "file"


@functools.lru_cache(maxsize=8)
def text_file_documents(pattern: str, fractions: tuple, utf8_required: bool,
                        by: str = "cut"):
  """Documents per split for a glob of text files; validated."""
  by_split = {s: [] for s in SPLITS}
  paths = text_file_paths(pattern)
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  for path in paths:
    text = _read(path)
    if utf8_required:
      try:
        text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.start}): a SentencePiece vocabulary "
                        "needs UTF-8 text; use data.vocab='byte' for raw bytes") from e
    if by == "file":
      if text:
        by_split[_split_of_path(os.path.relpath(path, root), fractions)].append(text)
      continue
    for split, piece in _cut(text, fractions).items():
      if piece:
        by_split[split].append(piece)
  if not any(by_split.values()):
    raise DataError(f"config.data.text_files={pattern!r}: every matched file is empty")
  return {s: tuple(v) for s, v in by_split.items()}


def _text_files_docs(data_cfg):
  fractions = tuple(float(f) for f in data_cfg.split_fractions)
  return text_file_documents(data_cfg.text_files, fractions, data_cfg.vocab != "byte",
                             split_by(data_cfg))


def local_source_key(data_cfg):
  """What a local corpus's content is determined by (files, sizes, times,
  split settings), for cache keys; None for TFDS corpora (named by version)."""
  if data_cfg.text_files:
    files = [(p, os.path.getsize(p), os.path.getmtime(p))
             for p in text_file_paths(data_cfg.text_files)]
    return [files, list(data_cfg.split_fractions), split_by(data_cfg)]
  if data_cfg.task == "stdlib":
    return [[(p, os.path.getsize(p)) for s in SPLITS for p in stdlib_files()[s]]]
  return None


def decode_bytes(vocab: seqio.Vocabulary, ids) -> bytes:
  """The UTF-8 bytes token ids stand for (pad, EOS and control ids give none)."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return bytes(i - 3 for i in ids if 3 <= i < 259)
  return vocab.decode([int(i) for i in ids]).encode("utf-8")


def _documents_dataset(docs, shuffle: bool, seed) -> tf.data.Dataset:
  ds = tf.data.Dataset.from_tensor_slices({"text": tf.constant(list(docs), tf.string)})
  if shuffle:  # a new, seeded document order every epoch; seqio shuffles pieces after
    ds = ds.shuffle(len(docs), seed=seed, reshuffle_each_iteration=True)
  return ds


# ----------------------------------------------------------------------------
# Preprocessing.


def split_into_pieces(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
  """Cuts each tokenized document into consecutive pieces of <= seq_len tokens."""
  length = sequence_length["targets"]

  def pieces(ex):
    tokens = ex["targets"]
    n = tf.size(tokens)
    rows = tf.reshape(tf.pad(tokens, [[0, (-n) % length]]), [-1, length])
    sizes = tf.minimum(length, n - tf.range(0, n, length))
    return tf.data.Dataset.from_tensor_slices((rows, sizes)).map(
        lambda r, s: {"targets": r[:s]})

  return dataset.flat_map(pieces)


def _register(name: str, source: seqio.DataSource, vocab: seqio.Vocabulary,
              text_key: str) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
          split_into_pieces,
      ],
      output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
  )


def get_task(data_cfg) -> seqio.Task:
  """Registers (once) and returns the seqio Task a `config.data` section names."""
  task = data_cfg.task
  if data_cfg.text_files and task not in ("text_files", "stdlib"):
    raise ConfigError("data.text_files", f"is set, but data.task={task!r}; text files "
                      "are read by the 'text_files' task")
  if data_cfg.text_files:
    task = "text_files"
  if task not in TASKS:
    raise ConfigError("data.task", f"unknown task {task!r}; choose one of {list(TASKS)}")
  vocab = vocabulary(data_cfg.vocab)
  vocab_tag = "byte" if data_cfg.vocab == "byte" else hashlib.sha1(
      os.path.abspath(data_cfg.vocab).encode()).hexdigest()[:10]

  if task == "stdlib":
    def stdlib_fn(split, shuffle_files, seed=None):
      return _documents_dataset(stdlib_documents(split), shuffle_files, seed)
    source = seqio.FunctionDataSource(stdlib_fn, splits=SPLITS)
    return _register(f"hiertx.stdlib.{vocab_tag}", source, vocab, "text")

  if task == "text_files":
    if not data_cfg.text_files:
      raise ConfigError("data.text_files", "the text_files task needs a glob of files")
    fractions = tuple(float(f) for f in data_cfg.split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
      raise ConfigError("data.split_fractions", f"must be three non-negative fractions "
                        f"(train, validation, test) summing to 1, got {fractions}")
    docs = _text_files_docs(data_cfg)

    def files_fn(split, shuffle_files, seed=None):
      return _documents_dataset(docs[split], shuffle_files, seed)
    key = hashlib.sha1(repr((data_cfg.text_files, fractions, split_by(data_cfg))).encode()
                       ).hexdigest()[:10]
    source = seqio.FunctionDataSource(files_fn, splits=SPLITS)
    return _register(f"hiertx.text_files_{key}.{vocab_tag}", source, vocab, "text")

  tfds_name, text_key, splits = TFDS_CORPORA[task]
  source = seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits)
  return _register(f"hiertx.{task}.{vocab_tag}", source, vocab, text_key)


def local_split_bytes(data_cfg) -> dict[str, int] | None:
  """Bytes of text in each split of a local corpus; None for TFDS corpora."""
  if data_cfg.text_files:
    docs = _text_files_docs(data_cfg)
    return {s: sum(len(d) for d in docs[s]) for s in SPLITS}
  if data_cfg.task == "stdlib":
    return {s: sum(os.path.getsize(p) for p in stdlib_files()[s]) for s in SPLITS}
  return None
