"""Where hiertx's text comes from, without TensorFlow: corpus names, the
built-in stdlib corpus, local text files and their splits.

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

`hiertx.tasks` reads these through seqio Tasks into the data cache; a run
from an existing cache needs only this module's names and checks.
"""

import functools
import glob
import hashlib
import os
import sysconfig

from hiertx.errors import ConfigError, DataError

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


def corpus_name(data_cfg) -> str:
  """The corpus a `config.data` section names (stdlib, text_files or a TFDS
  corpus), after checking that the section names one."""
  task = data_cfg.task
  if data_cfg.text_files and task not in ("text_files", "stdlib"):
    raise ConfigError("data.text_files", f"is set, but data.task={task!r}; text files "
                      "are read by the 'text_files' task")
  if data_cfg.text_files:
    task = "text_files"
  if task not in TASKS:
    raise ConfigError("data.task", f"unknown task {task!r}; choose one of {list(TASKS)}")
  if task == "text_files":
    if not data_cfg.text_files:
      raise ConfigError("data.text_files", "the text_files task needs a glob of files")
    fractions = split_fractions(data_cfg)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
      raise ConfigError("data.split_fractions", f"must be three non-negative fractions "
                        f"(train, validation, test) summing to 1, got {fractions}")
  return task


def split_fractions(data_cfg) -> tuple:
  return tuple(float(f) for f in data_cfg.split_fractions)


def task_name(data_cfg) -> str:
  """The name of the seqio Task that reads this corpus with this vocabulary
  (hiertx.tasks registers it under this name; cache keys use it)."""
  task = corpus_name(data_cfg)
  vocab_tag = "byte" if data_cfg.vocab == "byte" else hashlib.sha1(
      os.path.abspath(data_cfg.vocab).encode()).hexdigest()[:10]
  if task == "text_files":
    key = hashlib.sha1(repr((data_cfg.text_files, split_fractions(data_cfg),
                             split_by(data_cfg))).encode()).hexdigest()[:10]
    return f"hiertx.text_files_{key}.{vocab_tag}"
  return f"hiertx.{task}.{vocab_tag}"


def corpus_identity(data_cfg) -> dict:
  """What names a corpus's text without reading it: the corpus, and for text
  files the glob and how it is split (an exported cache records this)."""
  task = corpus_name(data_cfg)
  if task != "text_files":
    return {"corpus": task}
  return {"corpus": task, "text_files": data_cfg.text_files,
          "split_fractions": list(split_fractions(data_cfg)), "split_by": data_cfg.split_by}


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


def text_files_docs(data_cfg):
  return text_file_documents(data_cfg.text_files, split_fractions(data_cfg),
                             data_cfg.vocab != "byte", split_by(data_cfg))


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


def local_split_bytes(data_cfg) -> dict[str, int] | None:
  """Bytes of text in each split of a local corpus; None for TFDS corpora."""
  if data_cfg.text_files:
    docs = text_files_docs(data_cfg)
    return {s: sum(len(d) for d in docs[s]) for s in SPLITS}
  if data_cfg.task == "stdlib":
    return {s: sum(os.path.getsize(p) for p in stdlib_files()[s]) for s in SPLITS}
  return None
