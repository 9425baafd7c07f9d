"""Input pipelines: seqio task -> pieces -> packed rows -> per-process batches.

A batch is a dict of int32 numpy arrays [B, T]:
  inputs       tokens the model reads (targets shifted right, 0 at row/document start)
  targets      tokens to predict
  weights      1 where a target counts in the loss, 0 on padding
  segment_ids  document of each position (packed rows; 0 is padding)
  positions    position within its document
Training order is a pure function of (data.seed, step): resuming at step N
skips N batches of the same stream, so a resumed run sees the same data.

With several processes each one feeds its slice of the global batch:
  data.process_sharding="rows"   every process reads the stream and keeps its
                                 rows: the global batch is the same for any
                                 number of processes (reproducible, resumable
                                 on another topology); the default.
  data.process_sharding="source" seqio `shard_info` splits the source, so each
                                 process reads only its part: for corpora too
                                 big for every host to read.
"""

import dataclasses

import numpy as np
import seqio
import tensorflow as tf

from hiertx import tasks
from hiertx.errors import DataError

_KEYS = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets",
         "decoder_loss_weights": "weights", "decoder_segment_ids": "segment_ids",
         "decoder_positions": "positions"}


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's slice of the global batch."""

  index: int = 0
  count: int = 1


def check_data(data_cfg) -> None:
  """Fails before compiling when the corpus cannot fill one example."""
  tasks.get_task(data_cfg)
  sizes = tasks.local_split_bytes(data_cfg)
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


PROCESS_SHARDINGS = ("rows", "source")


def _rows(data_cfg, split: str, shuffle: bool, repeat: bool, shard: Shard) -> tf.data.Dataset:
  task = tasks.get_task(data_cfg)
  if data_cfg.process_sharding == "rows":
    shard = Shard()
  lengths = {"targets": data_cfg.seq_len}
  ds = task.get_dataset(
      lengths, split=split, shuffle=shuffle, seed=data_cfg.seed if shuffle else None,
      num_epochs=None if repeat else 1, use_cached=False,
      shard_info=seqio.ShardInfo(shard.index, shard.count) if shard.count > 1 else None)
  ds = seqio.LMFeatureConverter(pack=data_cfg.pack)(ds, lengths)
  return ds.map(lambda ex: {_KEYS[k]: tf.cast(v, tf.int32) for k, v in ex.items()})


def _complete(batch: dict, seq_len: int) -> dict:
  """Adds segment ids and positions when rows are not packed."""
  b = batch["targets"].shape[0]
  if "segment_ids" not in batch:
    batch["segment_ids"] = (batch["targets"] != 0).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy()
  return batch


def _local_rows(batch: dict, shard: Shard, data_cfg) -> dict:
  if data_cfg.process_sharding != "rows" or shard.count == 1:
    return batch
  n = batch["targets"].shape[0] // shard.count
  return {k: v[shard.index * n:(shard.index + 1) * n] for k, v in batch.items()}


def _read_batch_size(global_batch: int, shard: Shard, data_cfg) -> int:
  return global_batch if data_cfg.process_sharding == "rows" else global_batch // shard.count


def train_batches(data_cfg, global_batch: int, start_step: int = 0, shard: Shard = Shard()):
  """Endless iterator of this process's training rows, starting at `start_step`."""
  ds = _rows(data_cfg, "train", shuffle=True, repeat=True, shard=shard)
  ds = ds.batch(_read_batch_size(global_batch, shard, data_cfg), drop_remainder=True)
  for batch in ds.skip(start_step).prefetch(2).as_numpy_iterator():
    yield _local_rows(_complete(batch, data_cfg.seq_len), shard, data_cfg)


def eval_batches(data_cfg, split: str, global_batch: int, max_batches: int,
                 shard: Shard = Shard()) -> list[dict]:
  """This process's rows of the first `max_batches` batches of a split, in
  file order, padded to full size.

  Materialised once so every evaluation scores exactly the same tokens.
  """
  ds = _rows(data_cfg, split, shuffle=False, repeat=False, shard=shard)
  batch_size = _read_batch_size(global_batch, shard, data_cfg)
  ds = ds.batch(batch_size).take(max_batches)
  out = []
  for batch in ds.as_numpy_iterator():
    batch = _complete(batch, data_cfg.seq_len)
    short = batch_size - batch["targets"].shape[0]
    if short:
      batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
    out.append(_local_rows(batch, shard, data_cfg))
  if not out:
    raise DataError(f"the {split} split of {data_cfg.text_files or data_cfg.task} "
                    "yields no examples")
  return out
