"""The seqio pipelines: splits, determinism, resume position, and data errors."""

import ml_collections
import numpy as np
import pytest

from hiertx import data, tasks
from hiertx.errors import ConfigError, DataError


def data_cfg(**kw):
  base = dict(task="stdlib", text_files="", split_fractions=(0.9, 0.05, 0.05), vocab="byte",
              seq_len=32, batch_size=4, pack=True, seed=0, process_sharding="rows")
  return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
  return str(path)


def test_stdlib_corpus_is_split_deterministically_without_overlap():
  files = tasks.stdlib_files()
  sets = {s: set(v) for s, v in files.items()}
  assert len(sets["train"]) > 300 and sets["validation"] and sets["test"]
  assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
  assert not any("/test/" in p or "site-packages" in p for v in sets.values() for p in v)
  sizes = tasks.local_split_bytes(data_cfg())
  assert sizes["train"] > 5_000_000


def test_training_batches_are_deterministic_and_resume_by_step():
  cfg = data_cfg()
  a = data.train_batches(cfg, 4)
  first = [next(a) for _ in range(6)]
  b = data.train_batches(cfg, 4, start_step=4)
  np.testing.assert_array_equal(next(b)["targets"], first[4]["targets"])
  again = next(data.train_batches(cfg, 4))
  np.testing.assert_array_equal(again["targets"], first[0]["targets"])
  other_seed = next(data.train_batches(data_cfg(seed=1), 4))
  assert not np.array_equal(other_seed["targets"], first[0]["targets"])
  batch = first[0]
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  # Inputs are targets shifted right within each document.
  same_doc = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
  np.testing.assert_array_equal(np.where(same_doc, batch["inputs"][:, 1:], 0),
                                np.where(same_doc, batch["targets"][:, :-1], 0))


def test_text_files_task_splits_each_file_contiguously(text_file):
  cfg = data_cfg(text_files=text_file)
  docs = tasks.text_file_documents(text_file, (0.9, 0.05, 0.05), False)
  whole = open(text_file, "rb").read()
  assert b"".join(docs["train"] + docs["validation"] + docs["test"]) == whole
  assert docs["validation"][0].startswith(b"line ") and docs["train"][0].endswith(b"\n")
  evals = data.eval_batches(cfg, "validation", 4, 100)
  scored = sum(int(b["weights"].sum()) for b in evals)
  assert scored == len(docs["validation"][0]) + 1  # every byte, plus EOS


def test_eval_batches_are_padded_with_zero_weight(text_file):
  evals = data.eval_batches(data_cfg(text_files=text_file), "validation", 16, 10)
  last = evals[-1]
  assert last["targets"].shape == (16, 32)
  assert last["weights"][-1].sum() == 0


def test_token_bytes_for_the_byte_vocabulary():
  tb = tasks.token_bytes(tasks.vocabulary("byte"))
  assert tb.shape == (259,) and tb[:3].sum() == 0 and tb[3:].min() == 1


def test_missing_and_empty_data_fail_clearly(tmp_path):
  with pytest.raises(DataError, match="matches no files"):
    data.check_data(data_cfg(text_files=str(tmp_path / "nope*.txt")))
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DataError, match="every matched file is empty"):
    data.check_data(data_cfg(text_files=str(empty)))
  short = tmp_path / "short.txt"
  short.write_text("tiny\n" * 3)
  with pytest.raises(DataError, match="fewer than one example"):
    data.check_data(data_cfg(text_files=str(short)))
  with pytest.raises(ConfigError, match="data.task"):
    data.check_data(data_cfg(task="wikipedia"))
  with pytest.raises(ConfigError, match="data.vocab"):
    data.check_data(data_cfg(vocab=str(tmp_path / "missing.model")))


def test_non_utf8_bytes_are_fine_for_bytes(tmp_path):
  path = tmp_path / "binary.txt"
  path.write_bytes(bytes(range(256)) * 40 + b"\n" + b"\xff\xfe text\n" * 200)
  evals = data.eval_batches(data_cfg(text_files=str(path)), "validation", 4, 2)
  assert evals[0]["weights"].sum() > 0
  with pytest.raises(DataError, match="not UTF-8"):
    tasks.text_file_documents(str(path), (0.9, 0.05, 0.05), True)


def test_tfds_corpora_are_registered_without_downloading():
  for name in ("tiny_shakespeare", "lm1b", "pg19", "wiki40b", "c4"):
    task = tasks.get_task(data_cfg(task=name))
    assert task.name == f"hiertx.{name}.byte"
    assert set(task.splits) >= {"train", "validation", "test"}


def test_row_sharding_gives_each_process_its_rows_of_the_same_global_batch():
  cfg = data_cfg()
  whole = next(data.train_batches(cfg, 4))
  parts = [next(data.train_batches(cfg, 4, shard=data.Shard(i, 2))) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]), whole["targets"])
  src = next(data.train_batches(data_cfg(process_sharding="source"), 4, shard=data.Shard(1, 2)))
  assert src["targets"].shape == (2, 32)


def test_sentencepiece_vocabulary(tmp_path, text_file):
  import sentencepiece as spm  # noqa: PLC0415

  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(input=text_file, model_prefix=prefix, vocab_size=320,
                                 model_type="unigram", byte_fallback=True, hard_vocab_limit=False,
                                 minloglevel=2)
  vocab = tasks.vocabulary(prefix + ".model")
  tb = tasks.token_bytes(vocab)
  assert tb.shape == (vocab.vocab_size,) and tb[0] == 0 and tb.max() > 1
  cfg = data_cfg(text_files=text_file, vocab=prefix + ".model")
  data.check_data(cfg)
  evals = data.eval_batches(cfg, "validation", 4, 50)
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in evals])
  docs = tasks.text_file_documents(text_file, (0.9, 0.05, 0.05), True)
  # The bytes the scored tokens stand for are the validation text's bytes.
  assert int(tb[targets].sum()) == len(docs["validation"][0])
