"""The seqio pipelines: splits, determinism, resume position, and data errors."""

import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from hiertx import config as config_lib
from hiertx import corpora, data, tasks
from hiertx import vocab as vocab_lib
from hiertx.errors import ConfigError, DataError


def data_cfg(**kw):
  # seq_len as in the tiny configs: the suite reads and cuts the stdlib corpus once.
  base = dict(task="stdlib", text_files="", split_fractions=(0.9, 0.05, 0.05), split_by="auto",
              vocab="byte", seq_len=64, batch_size=4, pack=True, align=1, seed=0,
              process_sharding="rows", cache_dir="")
  return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
  return str(path)


def test_stdlib_corpus_is_split_deterministically_without_overlap():
  files = corpora.stdlib_files()
  sets = {s: set(v) for s, v in files.items()}
  assert len(sets["train"]) > 300 and sets["validation"] and sets["test"]
  assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
  assert not any("/test/" in p or "site-packages" in p for v in sets.values() for p in v)
  sizes = corpora.local_split_bytes(data_cfg())
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
  # data.seed -1 (the default) follows train.seed once resolved, so a seed
  # sweep varies the data order; an explicit data.seed stays.
  run_cfg = ml_collections.ConfigDict({"data": data_cfg(seed=-1), "train": {"seed": 1}})
  assert config_lib.resolved(run_cfg).data.seed == 1
  run_cfg.data.seed = 0
  assert config_lib.resolved(run_cfg).data.seed == 0
  with pytest.raises(ConfigError, match="data.seed"):
    next(data.train_batches(data_cfg(seed=-1), 4))
  batch = first[0]
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  # Inputs are targets shifted right within each document.
  same_doc = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
  np.testing.assert_array_equal(np.where(same_doc, batch["inputs"][:, 1:], 0),
                                np.where(same_doc, batch["targets"][:, :-1], 0))


def test_text_files_task_splits_each_file_contiguously(text_file):
  cfg = data_cfg(text_files=text_file)
  docs = corpora.text_file_documents(text_file, (0.9, 0.05, 0.05), False, "cut")
  whole = open(text_file, "rb").read()
  assert b"".join(docs["train"] + docs["validation"] + docs["test"]) == whole
  assert docs["validation"][0].startswith(b"line ") and docs["train"][0].endswith(b"\n")
  evals = data.eval_batches(cfg, "validation", 4, 100)
  scored = sum(int(b["weights"].sum()) for b in evals)
  assert scored == len(docs["validation"][0]) + 1  # every byte, plus EOS


def test_eval_batches_are_padded_with_zero_weight_and_spread_over_the_split(text_file):
  cfg = data_cfg(text_files=text_file)
  evals = data.eval_batches(cfg, "validation", 16, 10)
  last = evals[-1]
  assert last["targets"].shape == (16, 64)
  assert last["weights"][-1].sum() == 0
  # Fewer batches than the split holds: blocks spread evenly, the same each time.
  targets, _, _ = data.packed_rows(cfg, "train", 1)
  n = len(targets)
  sample = data.eval_batches(cfg, "train", 4, 3)
  for i, b in enumerate(sample):
    np.testing.assert_array_equal(b["targets"], targets[i * n // 3:i * n // 3 + 4])
  halves = [data.eval_batches(cfg, "train", 4, 3, data.Shard(j, 2)) for j in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(
        np.concatenate([h[i]["targets"] for h in halves]), sample[i]["targets"])


def _same_ids_as_seqio(spec: str, text: str):
  """hiertx.vocab (run time, no TensorFlow) numbers and decodes as the seqio
  vocabulary that built the data."""
  ours, theirs = vocab_lib.vocabulary(spec), tasks.vocabulary(spec)
  assert (ours.vocab_size, ours.eos_id) == (theirs.vocab_size, theirs.eos_id)
  ids = list(theirs.encode(text))
  assert ours.encode(text) == ids
  for probe in (ids, ids[:5] + [ours.eos_id] + ids[5:], ids + [ours.vocab_size + 3]):
    assert ours.decode(probe) == theirs.decode(probe)


def test_token_bytes_for_the_byte_vocabulary():
  tb = vocab_lib.vocabulary("byte").token_bytes()
  assert tb.shape == (259,) and tb[:3].sum() == 0 and tb[3:].min() == 1
  _same_ids_as_seqio("byte", "déf f(x):\n\treturn x  # ünïcode ✓")


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
    corpora.text_file_documents(str(path), (0.9, 0.05, 0.05), True)


def test_tfds_corpora_are_registered_without_downloading():
  for name in ("tiny_shakespeare", "lm1b", "pg19", "wiki40b", "c4"):
    task = tasks.get_task(data_cfg(task=name))
    assert task.name == f"hiertx.{name}.byte"
    assert set(task.splits) >= {"train", "validation", "test"}


def test_any_process_count_reads_the_same_global_batch_at_any_step():
  """Rows mode: two processes' rows of step n are the one-process batch of step
  n, so a run resumes on another number of processes with the same data."""
  cfg = data_cfg()
  for step in (0, 37):
    whole = next(data.train_batches(cfg, 4, start_step=step))
    parts = [next(data.train_batches(cfg, 4, step, data.Shard(i, 2))) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]),
                                  whole["targets"])
  src = next(data.train_batches(data_cfg(process_sharding="source"), 4, shard=data.Shard(1, 2)))
  assert src["targets"].shape == (2, 64)


def test_resuming_computes_the_position_instead_of_replaying(monkeypatch):
  """The batch of step 10^9 is read directly (no earlier batch is produced)
  and is the same as reading it from the row indices."""
  cfg = data_cfg()
  requested, step_rows = [], data.step_rows
  monkeypatch.setattr(data, "step_rows", lambda step, *a: requested.append(step) or step_rows(
      step, *a))
  batches = data.train_batches(cfg, 4, start_step=10**9)
  far = next(batches)
  batches.close()
  monkeypatch.undo()
  assert requested and min(requested) == 10**9, requested[:5]
  targets, segments, _ = data.packed_rows(cfg, "train", 1)
  rows = data.step_rows(10**9, 4, len(targets), 0, data.Shard(), cfg)
  np.testing.assert_array_equal(far["targets"], targets[rows])
  # Every row once per epoch, in a new order each epoch.
  n = len(targets)
  epoch0 = np.concatenate([data.step_rows(s, 4, n, 0, data.Shard(), cfg) for s in range(n // 4)])
  assert len(set(epoch0.tolist())) == len(epoch0)
  epoch1 = data.step_rows(n // 4, 4, n, 0, data.Shard(), cfg)
  assert not np.array_equal(epoch1, epoch0[:4])


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097])
def test_the_row_permutation_is_a_bijection(n):
  out = data.permuted(np.arange(n), n, [0, 7])
  np.testing.assert_array_equal(np.sort(out), np.arange(n))
  if n > 3:
    assert not np.array_equal(out, np.arange(n))


def test_packing_aligns_every_piece_to_the_grid():
  tokens = np.arange(1, 101, dtype=np.int32)
  offsets = np.array([0, 5, 6, 20, 33, 60, 61, 100])  # pieces of 5, 1, 14, 13, 27, 1, 39
  targets, segments, stats = data.pack(tokens, offsets, np.arange(7), 40, 8)
  for row_t, row_s in zip(targets, segments):
    starts = np.nonzero((row_s != 0) & (np.concatenate([[0], row_s[:-1]]) != row_s))[0]
    assert all(s % 8 == 0 for s in starts), starts
  got = sorted(tuple(targets[r][segments[r] == g]) for r in range(len(targets))
               for g in set(segments[r]) - {0})
  want = sorted(tuple(tokens[a:b]) for a, b in zip(offsets, offsets[1:]))
  assert got == want  # every piece intact, once
  assert stats["tokens"] == 100
  assert stats["alignment_padding"] + stats["end_padding"] + 100 == targets.size
  unpacked, _, _ = data.pack(tokens, offsets, np.arange(7), 40, 1, packed=False)
  assert len(unpacked) == 7


def test_batches_restart_positions_and_inputs_at_each_piece():
  segments = np.array([[1, 1, 1, 0, 2, 2, 0, 0]])
  targets = np.array([[5, 6, 7, 0, 8, 9, 0, 0]])
  b = data.batch_of(targets, segments)
  np.testing.assert_array_equal(b["inputs"], [[0, 5, 6, 0, 0, 8, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 0, 1, 1, 0, 0]])


def test_documents_that_see_each_other_make_a_row_one_sequence():
  """data.cross_document_attention: pieces back to back (no alignment), one
  segment per row (padding stays 0), positions and the input shift running
  on across pieces; a model's second document then reads the first, where by
  default it cannot; an alignment other than -1 or 1 is refused."""
  import jax
  import jax.numpy as jnp

  from hiertx import models
  b = data.batch_of(np.array([[5, 6, 7, 8, 9, 0]]), np.array([[1, 1, 1, 2, 2, 0]]), True)
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(b["inputs"], [[0, 5, 6, 7, 8, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 0]])
  cfg = ml_collections.ConfigDict(dict(align=-1, cross_document_attention=True))
  assert data.alignment(cfg, 4) == 1
  cfg.cross_document_attention = False
  assert data.alignment(cfg, 4) == 4
  config = config_lib.load("configs/hourglass.py:size=tiny")
  config.data.cross_document_attention = True
  config.data.align = 4
  with pytest.raises(ConfigError, match="data.align: 4: with data.cross_document_attention"):
    config_lib.validate(config)
  rng = np.random.default_rng(0)
  targets = rng.integers(3, 200, (1, 64)).astype(np.int32)
  segments = np.where(np.arange(64) < 20, 1, 2)[None].astype(np.int32)
  changed = targets.copy()
  changed[0, :20] = rng.integers(3, 200, 20)  # only the first document differs
  for cross, reads in ((True, True), (False, False)):
    model = models.build(dict(config.model, attention="dense"), 259, 64, cross_document=cross)
    logits = []
    for t in (targets, changed):
      b = data.batch_of(t, segments, cross)
      if not logits:
        params = model.init(jax.random.PRNGKey(0), jnp.asarray(b["inputs"]))
      logits.append(model.apply(params, jnp.asarray(b["inputs"]), jnp.asarray(b["segment_ids"]),
                                jnp.asarray(b["positions"])))
    second = np.abs(np.asarray(logits[0] - logits[1])[0, 21:]).max()
    assert (second > 1e-4) == reads, (cross, second)


def test_many_files_are_split_whole_by_path_and_one_file_is_cut(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"file {i}\n" * 50)
  cfg = data_cfg(text_files=str(tmp_path / "*.txt"), split_fractions=(0.8, 0.1, 0.1))
  assert corpora.split_by(cfg) == "file"
  docs = corpora.text_file_documents(cfg.text_files, (0.8, 0.1, 0.1), False, "file")
  assert sum(len(v) for v in docs.values()) == 40  # whole files, each in one split
  assert len(docs["train"]) > len(docs["validation"]) > 0
  again = corpora.text_file_documents(cfg.text_files, (0.8, 0.1, 0.1), False, "file")
  assert again == docs
  # The task's pieces: every document's bytes (ids byte + 3) and EOS (1), cut
  # at its start and every seq_len tokens after.
  tokens, offsets = data.pieces(cfg, "train")
  encoded = [np.frombuffer(d, np.uint8).astype(np.int32) + 3 for d in docs["train"]]
  np.testing.assert_array_equal(tokens, np.concatenate([np.append(e, 1) for e in encoded]))
  cuts = [[cfg.seq_len] * ((len(e) + 1) // cfg.seq_len) + [(len(e) + 1) % cfg.seq_len]
          for e in encoded]
  np.testing.assert_array_equal(np.diff(offsets), [n for c in cuts for n in c if n])
  one = data_cfg(text_files=str(tmp_path / "doc00.txt"))
  assert corpora.split_by(one) == "cut"
  with pytest.raises(ConfigError, match="data.split_by"):
    corpora.split_by(data_cfg(text_files=cfg.text_files, split_by="lines"))


def test_sentencepiece_vocabulary(tmp_path, text_file):
  import sentencepiece as spm

  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(input=text_file, model_prefix=prefix, vocab_size=320,
                                 model_type="unigram", byte_fallback=True, hard_vocab_limit=False,
                                 minloglevel=2)
  vocab = vocab_lib.vocabulary(prefix + ".model")
  tb = vocab.token_bytes()
  _same_ids_as_seqio(prefix + ".model", "line 7: the quick brown fox jumps ✓")
  assert tb.shape == (vocab.vocab_size,) and tb[0] == 0 and tb.max() > 1
  cfg = data_cfg(text_files=text_file, vocab=prefix + ".model")
  data.check_data(cfg)
  evals = data.eval_batches(cfg, "validation", 4, 50)
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in evals])
  docs = corpora.text_file_documents(text_file, (0.9, 0.05, 0.05), True)
  # The bytes the scored tokens stand for are the validation text's bytes.
  assert int(tb[targets].sum()) == len(docs["validation"][0])


def test_a_vocabulary_trained_on_the_train_split_runs_with_exact_bits_per_byte(tmp_path,
                                                                               text_file):
  """prepare_data --train_vocab: a SentencePiece model trained on the
  config's train split (seqio's ids: 0 pad, 1 EOS, 2 UNK; byte fallback), so
  a run can compare tokenizations; its tokens stand for exactly the split's
  bytes; paths and sizes that cannot work are one-line errors."""
  from hiertx import prepare_data
  from hiertx.errors import FlagError
  path = str(tmp_path / "corpus_320.model")
  cfg = data_cfg(text_files=text_file)
  with pytest.raises(FlagError, match="--vocab_size: 400: the text yields at most 3"):
    prepare_data.train_vocab(cfg, path, 400)
  prepare_data.train_vocab(cfg, path, 320)
  vocab = vocab_lib.vocabulary(path)
  sp = vocab.tokenizer
  assert vocab.vocab_size == 320 and (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      0, 1, 2, -1)
  text = "line 12: the quick brown fox \u2713"  # a character the corpus never had
  assert vocab.decode(vocab.encode(text)) == text  # byte fallback
  spm_cfg = data_cfg(text_files=text_file, vocab=path)
  evals = data.eval_batches(spm_cfg, "validation", 4, 50)
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in evals])
  docs = corpora.text_file_documents(text_file, (0.9, 0.05, 0.05), True)
  assert int(vocab.token_bytes()[targets].sum()) == len(docs["validation"][0])
  with pytest.raises(FlagError, match="--train_vocab: .* ends in .model"):
    vocab_lib.train_sentencepiece(["x"], str(tmp_path / "v.spm"), 300)
  with pytest.raises(FlagError, match="--vocab_size: 100: needs room for the 256 byte"):
    vocab_lib.train_sentencepiece(["x"], path, 100)
  with pytest.raises(ConfigError, match="data.vocab: .* trained on the corpus's text"):
    prepare_data.train_vocab(spm_cfg, str(tmp_path / "again.model"), 300)


def test_processes_that_miss_a_cache_entry_at_once_read_the_corpus_once(text_file, tmp_path,
                                                                        monkeypatch, capsys):
  """Three readers of one missing entry at once (threads here, processes on a
  cluster: the lease tells them apart the same way): one reads the corpus and
  the others wait for its entry; a builder that died is taken over."""
  reads, real = [], data._read_pieces

  def slow_read(*args):
    reads.append(threading.get_ident())
    time.sleep(1.0)  # long enough that the others find the entry missing and wait
    return real(*args)

  monkeypatch.setattr(data, "_read_pieces", slow_read)
  cfg = data_cfg(text_files=text_file, cache_dir=str(tmp_path / "cache"))
  got = [None] * 3

  def read(i):
    got[i] = data.pieces(cfg, "train")

  threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(reads) == 1
  for tokens, offsets in got[1:]:
    np.testing.assert_array_equal(tokens, got[0][0])
    np.testing.assert_array_equal(offsets, got[0][1])
  # A builder killed mid-build (its process gone, its lease not released):
  # the next reader takes the lease over at once and builds the entry.
  cache = tmp_path / "other_cache"
  script = (f"import time, ml_collections\nfrom hiertx import data\n"
            f"data._read_pieces = lambda *a: time.sleep(600)\n"
            f"data.pieces(ml_collections.ConfigDict({dict(cfg, cache_dir=str(cache))!r}), "
            f"'train')\n")
  builder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
  try:
    deadline = time.time() + 120
    while not list(cache.glob("*.building/lease/*.json")):
      assert time.time() < deadline and builder.poll() is None
      time.sleep(0.1)
  finally:
    builder.kill()
    builder.wait()
  reads.clear()
  tokens, _ = data.pieces(data_cfg(text_files=text_file, cache_dir=str(cache)), "train")
  assert len(reads) == 1
  np.testing.assert_array_equal(tokens, got[0][0])
  assert "took over" in capsys.readouterr().out
