r"""Builds a data cache ahead of a run, or exports one to carry elsewhere.

  # build (or check) the packed rows of splits, with their padding
  python -m hiertx.prepare_data --config=configs/vanilla.py --split=train,validation
  # every split's pieces in one new directory (hiertx.exported)
  python -m hiertx.prepare_data --config=configs/vanilla.py --export=/tmp/stdlib_256
  # a SentencePiece vocabulary trained on the train split (then data.vocab=it)
  python -m hiertx.prepare_data --config=configs/vanilla.py --train_vocab=/tmp/stdlib_8k.model

Reading a corpus needs seqio and TensorFlow (the `[data]` extra).
"""

import sys

from absl import flags
from ml_collections import config_flags

from hiertx import cli
from hiertx import config as config_lib
from hiertx import corpora
from hiertx import data
from hiertx import models
from hiertx import vocab as vocab_lib
from hiertx.errors import ConfigError


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_list("split", ["train", "validation"], "Splits to build.")
  flags.DEFINE_integer("align", None, "Alignment (default: data.align; -1 needs the model).")
  flags.DEFINE_string("export", None, "Write the splits' pieces to this new directory, an "
                      "exported cache to carry to other machines (hiertx.exported); "
                      "--split defaults to all three then.")
  flags.DEFINE_string("train_vocab", None, "Train a SentencePiece vocabulary on the config's "
                      "train split and write it here (a .model file; then "
                      "--config.data.vocab=<it>).")
  flags.DEFINE_integer("vocab_size", 8192, "Pieces of the --train_vocab vocabulary.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.quiet_library_logs()
  config = config_lib.resolved(flags.FLAGS.config)
  cli.run(data.check_data, config.data)
  if flags.FLAGS.train_vocab:
    cli.run(train_vocab, config.data, flags.FLAGS.train_vocab, flags.FLAGS.vocab_size)
    return
  if flags.FLAGS.export:
    cli.run(export, config.data, flags.FLAGS.export, flags.FLAGS.split
            if flags.FLAGS["split"].present else list(corpora.SPLITS))
    return
  align = flags.FLAGS.align or config.data.align
  if align == -1:  # as a run would pack them
    align = data.alignment(config.data, models.build(config.model, 1,
                                                     config.data.seq_len).pooling_multiple())
  for split in flags.FLAGS.split:
    _, _, stats = cli.run(data.packed_rows, config.data, split, align)
    pad = stats["alignment_padding"] + stats["end_padding"]
    total = max(1, pad + stats["tokens"])
    print(f"{split}: {stats['rows']:,} rows of {config.data.seq_len}, {stats['tokens']:,} "
          f"tokens, alignment {align}: padding {stats['alignment_padding'] / total:.1%} "
          f"between pieces, {stats['end_padding'] / total:.1%} at row ends "
          f"(cache: {data.cache_root(config.data)})", flush=True)
  sys.stdout.flush()


def train_vocab(data_cfg, path: str, vocab_size: int) -> None:
  if data_cfg.vocab != "byte":
    raise ConfigError("data.vocab", f"{data_cfg.vocab!r}: a vocabulary is trained on the "
                      "corpus's text, read with data.vocab='byte'")
  byte_vocab = vocab_lib.vocabulary("byte")
  seen = {"bytes": 0}

  def texts():
    for doc in data.documents(data_cfg, "train"):
      text = byte_vocab.decode_bytes(doc).decode("utf-8", errors="replace")
      seen["bytes"] += len(text)
      yield text

  print(f"training a {vocab_size}-piece SentencePiece vocabulary on the train split ...",
        flush=True)
  vocab_lib.train_sentencepiece(texts(), path, vocab_size)
  vocab = vocab_lib.SentencePieceVocabulary(path)
  print(f"wrote {path}: {vocab.vocab_size} pieces from {seen['bytes']:,} characters (train "
        f"with --config.data.vocab={path})", flush=True)


def export(data_cfg, directory: str, splits) -> None:
  m = data.export(data_cfg, directory, splits)
  for split, n in m["splits"].items():
    print(f"{split}: {n['documents']:,} documents, {n['pieces']:,} pieces, "
          f"{n['tokens']:,} tokens", flush=True)
  print(f"exported to {directory}: {m['bytes'] / 2**20:.1f} MiB "
        f"(train with --config.data.cache_dir={directory})", flush=True)


def run() -> None:
  """The `hiertx-prepare-data` console script."""
  cli.command(define_flags, main)


if __name__ == "__main__":
  run()
