r"""Exported data caches: one directory holding every split a run reads, to
carry to machines without the corpus, seqio or TensorFlow.

    python -m hiertx.prepare_data --config=configs/vanilla.py --export=/tmp/stdlib_256
    python -m hiertx.train --config=configs/vanilla.py \
        --config.data.cache_dir=/tmp/stdlib_256 --workdir=/tmp/run

The directory holds, per split, the pieces of the split (documents cut at
`data.seq_len`, hiertx.data) without their EOS tokens:
  <split>.tokens.npy   the tokens of all pieces, in corpus order: uint8
                       (byte - 0..255) for the byte vocabulary, uint16 or
                       int32 ids for SentencePiece
  <split>.lengths.npy  uint16 (int32 past 65,535) [P]: tokens of each piece
  <split>.eos.npy      bool [P]: piece p ends its document (EOS follows it)
  vocab.model          the SentencePiece model, when the vocabulary is one
  manifest.json        corpus, vocabulary, seq_len, sizes and a SHA-256 of
                       every file
Rows are packed from the pieces when a run starts (any `data.align` and
`data.seed`), in memory: the directory is only read. A run whose config does
not match the manifest (corpus, vocabulary, seq_len) is refused with one
line, as is a file whose checksum does not match.
"""

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np

from hiertx import corpora
from hiertx import storage
from hiertx import vocab as vocab_lib
from hiertx.errors import ConfigError, DataError

MANIFEST = "manifest.json"
FORMAT = "hiertx-export-1"
_ARRAYS = ("tokens", "lengths", "eos")


def is_export(root: str) -> bool:
  return storage.isfile(storage.join(root, MANIFEST))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _vocab_entry(spec: str) -> dict:
  vocab = vocab_lib.vocabulary(spec)
  if spec == "byte":
    return {"kind": "byte", "size": vocab.vocab_size}
  return {"kind": "sentencepiece", "size": vocab.vocab_size, "sha256": _sha256(spec)}


def _token_dtype(vocab_entry: dict):
  if vocab_entry["kind"] == "byte":
    return np.uint8
  return np.uint16 if vocab_entry["size"] <= 1 << 16 else np.int32


def write(directory: str, data_cfg, split_pieces: dict) -> dict:
  """Writes `split_pieces` ({split: (tokens int32 [N], offsets int64 [P + 1])})
  of `data_cfg`'s corpus to a new `directory` (a local path or a URL);
  returns the manifest. Object storage gets the files of a local export,
  the manifest last: a cache is complete once its manifest is there."""
  directory = storage.check(directory, "--export")
  if storage.listdir(directory):
    raise DataError(f"--export={directory!r} exists and is not empty; export to a new "
                    "directory")
  if storage.is_url(directory):
    with tempfile.TemporaryDirectory() as tmp:
      out = write(os.path.join(tmp, "export"), data_cfg, split_pieces)
      storage.upload_tree(os.path.join(tmp, "export"), directory, last=(MANIFEST,))
    return out
  vocab = vocab_lib.vocabulary(data_cfg.vocab)
  entry = _vocab_entry(data_cfg.vocab)
  manifest = {"format": FORMAT, **corpora.corpus_identity(data_cfg), "vocab": entry,
              "seq_len": int(data_cfg.seq_len),
              "alignment": "any: rows are packed from the pieces when a run starts",
              "splits": {}, "sha256": {}}
  tmp = f"{directory.rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
  except OSError as e:
    raise DataError(f"--export={directory!r}: cannot write beside it ({tmp}): "
                    f"{e.strerror}") from e
  for split, (tokens, offsets) in split_pieces.items():
    tokens, offsets = np.asarray(tokens), np.asarray(offsets, np.int64)
    ends = offsets[1:] - 1
    eos = (offsets[1:] > offsets[:-1]) & (tokens[np.maximum(ends, 0)] == vocab.eos_id)
    keep = np.ones(len(tokens), bool)
    keep[ends[eos]] = False
    if np.any(tokens[keep] == vocab.eos_id):
      raise DataError(f"the {split} split has EOS inside a piece; it cannot be exported")
    stripped = tokens[keep].astype(np.int64)
    if entry["kind"] == "byte":
      stripped -= vocab_lib.BYTE_OFFSET
      if stripped.size and (stripped.min() < 0 or stripped.max() > 255):
        raise DataError(f"the {split} split holds ids that are not bytes")
    arrays = {"tokens": stripped.astype(_token_dtype(entry)),
              "lengths": (np.diff(offsets) - eos).astype(
                  np.uint16 if data_cfg.seq_len < 1 << 16 else np.int32),
              "eos": eos}
    for name, array in arrays.items():
      np.save(os.path.join(tmp, f"{split}.{name}.npy"), array)
    manifest["splits"][split] = {"pieces": int(len(offsets) - 1), "tokens": int(offsets[-1]),
                                 "documents": int(eos.sum())}
  if entry["kind"] == "sentencepiece":
    shutil.copyfile(data_cfg.vocab, os.path.join(tmp, "vocab.model"))
  for name in sorted(os.listdir(tmp)):
    manifest["sha256"][name] = _sha256(os.path.join(tmp, name))
  manifest["bytes"] = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp))
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  if os.path.exists(directory):
    os.rmdir(directory)  # empty, checked above
  os.rename(tmp, directory)
  return manifest


def manifest(root: str) -> dict:
  try:
    out = json.loads(storage.read_text(storage.join(root, MANIFEST)))
  except (OSError, ValueError) as e:
    raise DataError(f"{root}: cannot read {MANIFEST} of the exported cache: {e}") from None
  if out.get("format") != FORMAT:
    raise DataError(f"{root}: {MANIFEST} is not a {FORMAT} manifest "
                    f"(format {out.get('format')!r})")
  return out


def _describe(identity: dict, vocab: dict, seq_len) -> str:
  corpus = identity["corpus"]
  if corpus == "text_files":
    corpus = (f"text_files {identity['text_files']!r} (split {identity['split_fractions']} "
              f"by {identity['split_by']})")
  return f"{corpus}, {vocab['kind']} vocabulary, seq_len {seq_len}"


def check(root: str, data_cfg) -> dict:
  """The manifest of the export at `root`, after checking it holds what
  `data_cfg` reads; one ConfigError line naming both otherwise."""
  m = manifest(root)
  want = corpora.corpus_identity(data_cfg)
  have = {k: m.get(k) for k in want}
  vocab = _vocab_entry(data_cfg.vocab)
  if have != want or m["vocab"] != vocab or m["seq_len"] != data_cfg.seq_len:
    raise ConfigError("data.cache_dir", f"{root} is an exported cache of "
                      f"{_describe(m, m['vocab'], m['seq_len'])}; this config reads "
                      f"{_describe(want, vocab, data_cfg.seq_len)}: export one for it "
                      "(python -m hiertx.prepare_data --config=... --export=DIR) or set "
                      "data.cache_dir to another cache")
  if data_cfg.process_sharding != "rows":
    raise ConfigError("data.process_sharding", "an exported cache holds whole splits: use "
                      "'rows' (every process reads its rows of the global batch)")
  return m


@functools.lru_cache(maxsize=None)  # each file read and hashed once per process
def _verified(root: str, name: str, digest: str, stamp: str) -> np.ndarray:
  """The array in `root/name` once its SHA-256 matches the manifest's."""
  del stamp  # part of the cache key: a rewritten file is read again
  path = storage.join(root, name)
  try:
    raw = storage.read_bytes(path)
  except FileNotFoundError:
    raise DataError(f"{path} is missing from the exported cache") from None
  if hashlib.sha256(raw).hexdigest() != digest:
    raise DataError(f"{path} does not match its checksum in {MANIFEST} (a partial or "
                    "damaged copy?): copy the exported cache again")
  array = np.load(io.BytesIO(raw))
  array.setflags(write=False)  # shared by every caller in this process
  return array


def pieces(root: str, data_cfg, split: str):
  """(tokens int32 [N], offsets int64 [P + 1]) of a split, EOS restored, as
  hiertx.data.pieces gives them."""
  m = check(root, data_cfg)
  if split not in m["splits"]:
    raise DataError(f"{root} holds the splits {sorted(m['splits'])}, not {split!r}: export "
                    f"it with --split={split}")
  arrays = {}
  for name in _ARRAYS:
    file = f"{split}.{name}.npy"
    full = storage.join(root, file)
    arrays[name] = _verified(root, file, m["sha256"].get(file, "?"),
                             storage.stamp(full) if storage.exists(full) else "")
  stripped, eos = arrays["tokens"], arrays["eos"]
  offsets = np.concatenate([[0], np.cumsum(arrays["lengths"], dtype=np.int64)])
  vocab = vocab_lib.vocabulary(data_cfg.vocab)
  lengths = np.diff(offsets) + eos
  new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.full(int(new_offsets[-1]), vocab.eos_id, np.int32)
  piece = np.repeat(np.arange(len(eos)), np.diff(offsets))
  at = np.arange(len(stripped)) + (new_offsets[:-1] - offsets[:-1])[piece]
  shift = vocab_lib.BYTE_OFFSET if m["vocab"]["kind"] == "byte" else 0
  tokens[at] = stripped.astype(np.int32) + shift
  return tokens, new_offsets
