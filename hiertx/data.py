r"""Input pipelines: seqio task -> pieces -> packed rows (cached) -> batches by index.

A split is read once through its seqio Task (documents tokenized, EOS
appended, cut into pieces of at most `data.seq_len` tokens) and packed into
rows (docs/design.md section 7): every piece starts at a multiple of the
alignment, the model's total pooling factor, so a document is grouped into
coarse positions exactly as it would be alone. Pieces and packed rows are
kept in a cache directory (memory-mapped .npy files, written once, keyed by
everything that determines them).

A batch is a dict of int32 numpy arrays [B, T]:
  inputs       tokens the model reads (targets shifted right, 0 at a piece's start)
  targets      tokens to predict
  weights      1 where a target counts in the loss, 0 on padding
  segment_ids  piece of each position within its row (0 is padding)
  positions    position within its piece

Training reads an endless stream of rows in which epoch e is a seeded
permutation of all rows; the batch of step n is rows n B .. n B + B - 1 of
that stream, computed directly from (data.seed, n). Resuming at step N
therefore reads step N's rows without producing the batches before it, and
the global batch of a step is the same for any number of processes.

With several processes each one reads only its rows of the global batch:
  data.process_sharding="rows"   every process has the whole split's cache
                                 (each host builds the same one, or shares
                                 it); global batches do not depend on the
                                 process count; the default.
  data.process_sharding="source" seqio `shard_info` splits the source, and
                                 each process packs and reads only its shard:
                                 for corpora too big for one host. Batches
                                 depend on the process count.

    python -m hiertx.prepare_data --config=configs/vanilla.py --split=train
builds (or checks) a split's cache ahead of a run, with progress.
"""

import dataclasses
import hashlib
import io
import json
import os
import queue
import tempfile
import threading
import time
from typing import Iterator

import numpy as np

from hiertx import corpora
from hiertx import exported
from hiertx import lease
from hiertx import storage
from hiertx import vocab as vocab_lib
from hiertx.errors import ConfigError, DataError

# Bump when the cached layout or the packing changes.
_FORMAT = 1
# A cache entry's builder renews its lease every quarter of this; a builder
# silent for this long has died, and a waiting process builds the entry.
_BUILD_LEASE_S = 60.0
PROCESS_SHARDINGS = ("rows", "source")


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's slice of the global batch."""

  index: int = 0
  count: int = 1


def check_data(data_cfg) -> None:
  """Fails before compiling when the corpus cannot fill one example."""
  corpora.corpus_name(data_cfg)
  vocab_lib.vocabulary(data_cfg.vocab)
  if not isinstance(data_cfg.align, int) or data_cfg.align == 0 or data_cfg.align < -1:
    raise ConfigError("data.align", f"must be -1 (the model's pooling factor) or a positive "
                      f"integer, got {data_cfg.align!r}")
  if data_cfg.process_sharding not in PROCESS_SHARDINGS:
    raise ConfigError("data.process_sharding", f"{data_cfg.process_sharding!r} is not one of "
                      f"{PROCESS_SHARDINGS}")
  if exported.is_export(cache_root(data_cfg)):
    exported.check(cache_root(data_cfg), data_cfg)
    return
  sizes = corpora.local_split_bytes(data_cfg)
  if sizes is None:
    return
  where = data_cfg.text_files or "the stdlib corpus"
  if sizes["train"] == 0:
    raise DataError(f"{where}: the train split is empty")
  if sizes["train"] < data_cfg.seq_len:
    raise DataError(f"{where}: the train split has {sizes['train']} bytes, fewer than one "
                    f"example of data.seq_len={data_cfg.seq_len} tokens; use more text or "
                    "a shorter data.seq_len")
  if sizes["validation"] == 0:
    raise DataError(f"{where}: the validation split is empty; use more text or raise the "
                    "validation fraction in data.split_fractions")


def cross_document(data_cfg) -> bool:
  """data.cross_document_attention (false for configs saved before it)."""
  return bool(data_cfg.get("cross_document_attention", False))


def alignment(data_cfg, pooling_multiple: int) -> int:
  """Where pieces may start in a row: data.align, or (-1) the model's pooling
  factor; anywhere when documents see each other (a row is one sequence)."""
  if cross_document(data_cfg):
    return 1
  return pooling_multiple if data_cfg.align == -1 else data_cfg.align


# ----------------------------------------------------------------------------
# The cache: pieces of a split, then packed rows.


def cache_root(data_cfg) -> str:
  """The cache directory: a local path or a URL (`gs://bucket/cache`)."""
  root = data_cfg.cache_dir or os.environ.get(
      "HIERTX_DATA_CACHE", os.path.join("~", ".cache", "hiertx", "data"))
  return storage.check(root if storage.is_url(root) else os.path.expanduser(root),
                       "config.data.cache_dir")


def _key(*parts) -> str:
  return hashlib.sha1(json.dumps([_FORMAT, *parts], sort_keys=True, default=str).encode()
                      ).hexdigest()[:16]


def _source_key(data_cfg, split: str, shard: Shard) -> list:
  local = corpora.local_source_key(data_cfg)
  sharded = data_cfg.process_sharding == "source" and shard.count > 1
  return [corpora.task_name(data_cfg), split, data_cfg.seq_len, local,
          [shard.index, shard.count] if sharded else None]


def _write_atomically(directory: str, arrays: dict, meta: dict) -> None:
  """Writes a cache entry to a temporary directory and renames it: readers
  never see a half-written entry; of two concurrent builders one wins. On
  object storage the arrays are uploaded first and meta.json, which readers
  look for, last."""
  if storage.is_url(directory):
    with tempfile.TemporaryDirectory() as tmp:
      _write_atomically(os.path.join(tmp, "entry"), arrays, meta)
      storage.upload_tree(os.path.join(tmp, "entry"), directory, last=("meta.json",))
    return
  tmp = f"{directory}.tmp-{os.getpid()}-{threading.get_ident()}"
  os.makedirs(tmp, exist_ok=True)
  for name, array in arrays.items():
    np.save(os.path.join(tmp, f"{name}.npy"), array)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process finished first: its entry is the same
    for name in os.listdir(tmp):
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)


def _build_once(directory: str, build) -> None:
  """Makes cache entry `directory` with `build()` (which writes it) unless it
  is there. Of processes that miss the same entry at once (a job's hosts, a
  sweep's runs, a SLURM array's tasks starting together) one builds it and
  the others wait for it instead of each reading the corpus: the builder
  holds a lease on `<entry>.building` (hiertx.lease), which a waiter takes
  over if the builder dies, so no waiter waits on a dead process."""
  meta, said = storage.join(directory, "meta.json"), False
  while not storage.exists(meta):
    try:
      held = lease.acquire(directory + ".building", _BUILD_LEASE_S)
    except lease.WorkdirHeld:
      if not said:
        holder = lease.current(directory + ".building") or {"unreadable": True}
        print(f"data: waiting for {directory}, which another process is building "
              f"({lease.describe(holder)})", flush=True)
        said = True
      time.sleep(0.5)
      continue
    try:
      if not storage.exists(meta):  # built between the check and the lease
        build()
    finally:
      held.release()
  if said:
    print(f"data: {storage.name(directory)} is built", flush=True)


def _load(directory: str, names) -> tuple[dict, dict]:
  """A cache entry's arrays (memory-mapped locally, read into memory from
  object storage) and its meta.json."""
  meta = json.loads(storage.read_text(storage.join(directory, "meta.json")))
  if storage.is_url(directory):
    return {n: np.load(io.BytesIO(storage.read_bytes(storage.join(directory, f"{n}.npy"))))
            for n in names}, meta
  return {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names}, meta


def pieces(data_cfg, split: str, shard: Shard = Shard()) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [N], offsets int64 [P + 1]) of every piece of a split, in
  corpus order, built through the seqio Task on first use (or read from an
  exported cache, hiertx.exported)."""
  if exported.is_export(cache_root(data_cfg)):
    return exported.pieces(cache_root(data_cfg), data_cfg, split)
  directory = storage.join(cache_root(data_cfg), "pieces-" + _key(
      *_source_key(data_cfg, split, shard), data_cfg.vocab))

  def build():
    tokens, offsets, docs = _read_pieces(data_cfg, split, shard)
    _write_atomically(directory, {"tokens": tokens, "offsets": offsets},
                      {"pieces": len(offsets) - 1, "tokens": int(offsets[-1]), "documents": docs})

  _build_once(directory, build)
  arrays, _ = _load(directory, ("tokens", "offsets"))
  return arrays["tokens"], arrays["offsets"]


def _read_pieces(data_cfg, split: str, shard: Shard):
  try:  # seqio and TensorFlow read corpora; runs from a built cache never need them
    import seqio
    from hiertx import tasks
  except ImportError as e:
    raise DataError(
        f"the {split} split of {data_cfg.text_files or data_cfg.task} is not in the data "
        f"cache ({cache_root(data_cfg)}), and building it needs seqio and TensorFlow ({e}): "
        "build or export the cache where they are installed (python -m hiertx.prepare_data "
        "--config=... [--export=DIR]) and point data.cache_dir at it") from None
  task = tasks.get_task(data_cfg)
  sharded = data_cfg.process_sharding == "source" and shard.count > 1
  ds = task.get_dataset({"targets": data_cfg.seq_len}, split=split, shuffle=False,
                        num_epochs=1, use_cached=False,
                        shard_info=seqio.ShardInfo(shard.index, shard.count) if sharded else None)
  ds = ds.padded_batch(1024, padded_shapes={"targets": [data_cfg.seq_len]})
  chunks, lengths, t0, docs = [], [], time.time(), 0
  for i, batch in enumerate(ds.as_numpy_iterator()):
    rows = batch["targets"]
    n = (rows != 0).sum(1)  # no token is 0 (padding)
    chunks.append(rows[rows != 0].astype(np.int32))
    lengths.append(n)
    eos = getattr(task.output_features["targets"].vocabulary, "eos_id", None)
    docs += int((rows == eos).sum()) if eos is not None else 0
    if i and i % 50 == 0:
      print(f"data: reading {task.name} {split}: {sum(map(len, lengths)):,} pieces "
            f"({time.time() - t0:.0f}s)", flush=True)
  lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  return tokens, offsets, docs


def pack(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray, seq_len: int, align: int,
         packed: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
  """Packs pieces (in `order`) into rows: (targets [R, T], segments [R, T], stats).

  Each piece starts at a multiple of `align` in its row; a piece that does
  not fit starts a new row. Unpacked (`packed=False`): one piece per row.
  """
  lengths = np.diff(offsets)[order]
  starts = np.empty(len(order), np.int64)
  rows = np.empty(len(order), np.int64)
  row, pos, slot = 0, 0, np.empty(len(order), np.int32)
  seg = 0
  for i, n in enumerate(lengths):
    at = -(-pos // align) * align
    if i and (not packed or at + n > seq_len):
      row, at, seg = row + 1, 0, 0
    rows[i], starts[i], slot[i] = row, at, seg + 1
    pos, seg = at + n, seg + 1
  n_rows = row + 1 if len(order) else 0
  targets = np.zeros((n_rows, seq_len), np.int32)
  segments = np.zeros((n_rows, seq_len), np.int32)
  for i, p in enumerate(order):
    a, n = starts[i], lengths[i]
    targets[rows[i], a:a + n] = tokens[offsets[p]:offsets[p + 1]]
    segments[rows[i], a:a + n] = slot[i]
  used = int(lengths.sum())
  last_ends = np.zeros(n_rows, np.int64)
  np.maximum.at(last_ends, rows, starts + lengths)
  stats = {"rows": n_rows, "tokens": used,
           "alignment_padding": int(last_ends.sum() - used),
           "end_padding": int(n_rows * seq_len - last_ends.sum())}
  return targets, segments, stats


def packed_rows(data_cfg, split: str, align: int, shard: Shard = Shard()):
  """(targets [R, T], segments [R, T], stats) of a split, memory-mapped from
  the cache. The training split is packed in a seeded random order of its
  pieces (so rows mix documents); the others in corpus order."""
  shuffled = split == "train"

  def packed():
    tokens, offsets = pieces(data_cfg, split, shard)
    order = np.arange(len(offsets) - 1)
    if shuffled:
      order = np.random.default_rng([order_seed(data_cfg), 1]).permutation(order)
    return pack(tokens, offsets, order, data_cfg.seq_len, align, data_cfg.pack)

  if exported.is_export(cache_root(data_cfg)):  # read-only: packed here, in memory
    return _nonempty(*packed(), data_cfg, split)
  directory = storage.join(cache_root(data_cfg), "rows-" + _key(
      *_source_key(data_cfg, split, shard), data_cfg.vocab, align, bool(data_cfg.pack),
      order_seed(data_cfg) if shuffled else None))

  def build():
    targets, segments, stats = packed()
    _write_atomically(directory, {"targets": targets, "segments": segments}, stats)

  _build_once(directory, build)
  arrays, stats = _load(directory, ("targets", "segments"))
  return _nonempty(arrays["targets"], arrays["segments"], stats, data_cfg, split)


def _nonempty(targets, segments, stats, data_cfg, split):
  if not stats["rows"]:
    raise DataError(f"the {split} split of {data_cfg.text_files or data_cfg.task} "
                    "yields no examples")
  return targets, segments, stats


# ----------------------------------------------------------------------------
# Batches.


def batch_of(targets_BxT: np.ndarray, segments_BxT: np.ndarray,
             cross_document: bool = False) -> dict:
  """The model's inputs for packed rows: positions restart and inputs are the
  targets shifted right (0 first) within each piece. `cross_document`
  (data.cross_document_attention): a row is one sequence, its pieces back to
  back: one segment (padding stays 0), positions and the shift run on across
  pieces, so a piece's first token is predicted from the previous EOS."""
  targets = np.asarray(targets_BxT, np.int32)
  segments = np.asarray(segments_BxT, np.int32)
  if cross_document:
    segments = (segments != 0).astype(np.int32)
  b, t = targets.shape
  idx = np.broadcast_to(np.arange(t), (b, t))
  start = np.ones((b, t), bool)
  start[:, 1:] = segments[:, 1:] != segments[:, :-1]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[start] = 0
  live = segments != 0
  return {"inputs": np.where(live, inputs, 0), "targets": targets,
          "weights": live.astype(np.int32), "segment_ids": segments,
          "positions": np.where(live, idx - first, 0).astype(np.int32)}


def permuted(index: np.ndarray, n: int, key: int) -> np.ndarray:
  """A bijection of [0, n) chosen by `key`, applied to `index`: four rounds of a
  Feistel network over the smallest even power of two >= n, walking again
  from values that land past n. Needs no memory proportional to n."""
  bits = max(2, int(np.ceil(np.log2(max(n, 2)))))
  bits += bits % 2
  half, mask = bits // 2, np.uint64((1 << (bits // 2)) - 1)
  round_keys = np.random.default_rng(key).integers(0, 2**32, 4, dtype=np.uint64)

  def once(x):
    left, right = x >> np.uint64(half), x & mask
    for k in round_keys:
      mixed = (right * np.uint64(0x9E3779B97F4A7C15) + k) & np.uint64(2**64 - 1)
      mixed ^= mixed >> np.uint64(29)
      left, right = right, left ^ (mixed & mask)
    return (left << np.uint64(half)) | right

  x = np.asarray(index, np.uint64)
  out = once(x)
  outside = out >= n
  while outside.any():  # cycle walking: the permutation of [0, 2^bits) maps back in
    out[outside] = once(out[outside])
    outside = out >= n
  return out.astype(np.int64)


def order_seed(data_cfg) -> int:
  """The seed of the training order (packing and epochs)."""
  if data_cfg.seed < 0:  # a caller skipped hiertx.config.resolved()
    raise ConfigError("data.seed", f"is {data_cfg.seed} (follow train.seed), which "
                      "hiertx.config.resolved() turns into train.seed before data is read")
  return data_cfg.seed


def step_rows(step: int, global_batch: int, n_rows: int, seed: int, shard: Shard,
              data_cfg) -> np.ndarray:
  """Indices of this process's rows of the global batch of `step`."""
  local = global_batch // shard.count
  first = step * global_batch + (shard.index * local if data_cfg.process_sharding == "rows"
                                 else 0)
  if data_cfg.process_sharding == "source":  # each process's own stream
    first = step * local
  g = first + np.arange(local, dtype=np.int64)
  epoch, within = np.divmod(g, n_rows)
  out = np.empty_like(g)
  for e in np.unique(epoch):
    out[epoch == e] = permuted(within[epoch == e], n_rows, [seed, int(e)])
  return out


def train_batches(data_cfg, global_batch: int, start_step: int = 0, shard: Shard = Shard(),
                  align: int = 1) -> Iterator[dict]:
  """Endless iterator of this process's training rows, from `start_step` on;
  the next batches are read ahead on a thread."""
  targets, segments, _ = packed_rows(data_cfg, "train", align, shard)

  def read(step):
    rows = step_rows(step, global_batch, len(targets), order_seed(data_cfg), shard, data_cfg)
    order = np.argsort(rows)  # memory-mapped reads in file order, put back after
    t = np.empty((len(rows), data_cfg.seq_len), np.int32)
    s = np.empty_like(t)
    t[order], s[order] = targets[rows[order]], segments[rows[order]]
    return batch_of(t, s, cross_document(data_cfg))

  return _read_ahead(read, start_step)


def _read_ahead(read, step: int, depth: int = 2) -> Iterator[dict]:
  """read(step), read(step + 1), ..., with up to `depth` batches prepared by a
  background thread while the device trains."""
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def produce(s):
    while not stop.is_set():
      try:
        item = read(s)
      except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
        item = e
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return
      s += 1

  threading.Thread(target=produce, args=(step,), daemon=True).start()
  try:
    while True:
      item = ready.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def eval_batches(data_cfg, split: str, global_batch: int, max_batches: int,
                 shard: Shard = Shard(), align: int = 1) -> list[dict]:
  """This process's rows of `max_batches` batches of a split, padded to full
  size; the same rows at every evaluation. When the split holds more batches,
  the batches are blocks of consecutive rows spread evenly over it (the first
  rows alone are a few documents of the split, not a sample of it)."""
  targets, segments, _ = packed_rows(data_cfg, split, align, shard)
  local = global_batch // shard.count
  per_batch = local if data_cfg.process_sharding == "source" else global_batch
  whole = -(-len(targets) // per_batch)
  n_batches = min(max_batches, whole)
  out = []
  for i in range(n_batches):
    first = i * per_batch if n_batches == whole else i * len(targets) // n_batches
    lo = first + (shard.index * local if data_cfg.process_sharding == "rows" else 0)
    t = np.zeros((local, data_cfg.seq_len), np.int32)
    s = np.zeros_like(t)
    got = targets[lo:lo + local]
    t[:len(got)], s[:len(got)] = got, segments[lo:lo + local]
    out.append(batch_of(t, s, cross_document(data_cfg)))
  return out


def documents(data_cfg, split: str) -> Iterator[np.ndarray]:
  """Every document of a split as one token array (EOS last), in corpus order:
  its pieces joined again."""
  tokens, offsets = pieces(data_cfg, split)
  eos = vocab_lib.vocabulary(data_cfg.vocab).eos_id
  start = 0
  for p in range(len(offsets) - 1):
    if tokens[offsets[p + 1] - 1] == eos or p == len(offsets) - 2:
      yield np.asarray(tokens[offsets[start]:offsets[p + 1]])
      start = p + 1


def scored_text(batches: list[dict], vocab) -> bytes:
  """The bytes of the scored targets of evaluation batches, in order (what a
  compressor baseline compresses)."""
  ids = [int(x) for b in batches for row, w in zip(b["targets"], b["weights"])
         for x in row[w > 0]]
  return vocab.decode_bytes(ids)


def export(data_cfg, directory: str, splits) -> dict:
  """Writes `splits` of `data_cfg`'s corpus to `directory` as an exported
  cache (hiertx.exported); returns its manifest."""
  if exported.is_export(cache_root(data_cfg)):
    raise ConfigError("data.cache_dir", "is an exported cache already; export from the "
                      "corpus (leave data.cache_dir unset or point it at a build cache)")
  return exported.write(directory, data_cfg, {s: pieces(data_cfg, s) for s in splits})
