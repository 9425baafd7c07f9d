"""Every seqio Task hiertx reads corpora through, registered in this one module.

The corpora and their splits are `hiertx.corpora`'s. Every task tokenizes,
appends EOS to each document and cuts documents into pieces of at most
`seq_len` tokens; `hiertx.data` caches the pieces and packs them into rows.
This is the only module that needs seqio and TensorFlow, and only to build a
cache: runs from an existing cache never import it.

Vocabulary (`config.data.vocab`): "byte" (UTF-8 bytes, seqio.ByteVocabulary,
259 ids) or the path of a SentencePiece model; `hiertx.vocab` reads the same
ids without TensorFlow.
"""

import functools
import logging

import seqio
import tensorflow as tf

from hiertx import corpora
from hiertx import vocab as vocab_lib


class _QuietUncachedWarning(logging.Filter):
  """Resuming skips to the exact batch (see hiertx.data), which is what seqio's
  warning about uncached function sources and restarts is concerned with."""

  def filter(self, record):
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUncachedWarning())


@functools.lru_cache(maxsize=None)
def vocabulary(spec: str) -> seqio.Vocabulary:
  """The seqio vocabulary of `config.data.vocab` (ids as hiertx.vocab's)."""
  if spec == "byte":
    return seqio.ByteVocabulary()
  vocab_lib.vocabulary(spec)  # the same check of the path
  return seqio.SentencePieceVocabulary(spec)


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

  def pieces(ex):  # one ragged row per piece; unbatching them needs no dataset per document
    tokens = ex["targets"]
    n = tf.size(tokens)
    sizes = tf.minimum(length, n - tf.range(0, n, length))
    return {"targets": tf.RaggedTensor.from_row_lengths(tokens, sizes)}

  return dataset.map(pieces).unbatch()


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
  task = corpora.corpus_name(data_cfg)
  name = corpora.task_name(data_cfg)
  vocab = vocabulary(data_cfg.vocab)
  if task == "stdlib":
    def stdlib_fn(split, shuffle_files, seed=None):
      return _documents_dataset(corpora.stdlib_documents(split), shuffle_files, seed)
    return _register(name, seqio.FunctionDataSource(stdlib_fn, splits=corpora.SPLITS),
                     vocab, "text")
  if task == "text_files":
    docs = corpora.text_files_docs(data_cfg)

    def files_fn(split, shuffle_files, seed=None):
      return _documents_dataset(docs[split], shuffle_files, seed)
    return _register(name, seqio.FunctionDataSource(files_fn, splits=corpora.SPLITS),
                     vocab, "text")
  tfds_name, text_key, splits = corpora.TFDS_CORPORA[task]
  return _register(name, seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits), vocab,
                   text_key)
