"""Vocabularies at run time, without TensorFlow: ids, text and bytes per id.

`config.data.vocab` is "byte" or the path of a SentencePiece model. The ids
are those of the seqio vocabularies that build the data (`hiertx.tasks`):
  byte           seqio.ByteVocabulary: 0 pad, 1 EOS, 2 UNK, byte b is id b + 3
                 (259 ids)
  SentencePiece  the model's own ids (seqio.SentencePieceVocabulary with no
                 extra ids), read with the `sentencepiece` package
Training, evaluation and generation need only this module; seqio and
TensorFlow are needed to read a corpus into a cache (`hiertx.tasks`).
"""

import functools
import os

import numpy as np

from hiertx.errors import ConfigError, FlagError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3  # id of byte 0 in the byte vocabulary


class ByteVocabulary:
  """UTF-8 bytes, ids shifted past pad, EOS and UNK."""

  vocab_size = 256 + BYTE_OFFSET
  eos_id = EOS_ID
  pad_id = PAD_ID

  def encode(self, text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]

  def decode_bytes(self, ids) -> bytes:
    """The bytes of `ids` (pad, EOS and UNK give none)."""
    return bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < self.vocab_size)

  def decode(self, ids) -> str:
    """Text up to and including the first EOS, as seqio decodes it."""
    return self.decode_bytes(_through_eos(ids, self.eos_id)).decode("utf-8", errors="ignore")

  def token_bytes(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    out[BYTE_OFFSET:] = 1
    return out


class SentencePieceVocabulary:
  """A SentencePiece model's ids, as seqio numbers them (no extra ids)."""

  def __init__(self, path: str):
    import sentencepiece  # only for SentencePiece vocabularies
    self.path = path
    self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.tokenizer.get_piece_size()
    self.eos_id = self.tokenizer.eos_id()
    self.pad_id = self.tokenizer.pad_id()

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text))

  def decode(self, ids) -> str:
    ids = [int(i) for i in _through_eos(ids, self.eos_id)]
    unk = self.tokenizer.unk_id()
    return self.tokenizer.decode([unk if i >= self.vocab_size else i for i in ids])

  def decode_bytes(self, ids) -> bytes:
    return self.decode([int(i) for i in ids]).encode("utf-8")

  def token_bytes(self) -> np.ndarray:
    sp = self.tokenizer
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out


def _through_eos(ids, eos: int) -> list[int]:
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos) + 1] if eos in ids else ids


@functools.lru_cache(maxsize=None)
def vocabulary(spec: str):
  """The vocabulary `config.data.vocab` names."""
  if spec == "byte":
    return ByteVocabulary()
  if not os.path.isfile(spec):
    raise ConfigError("data.vocab", f"must be 'byte' or a SentencePiece model file; "
                      f"{spec!r} does not exist")
  return SentencePieceVocabulary(spec)


def train_sentencepiece(texts, path: str, vocab_size: int, model_type: str = "unigram") -> str:
  """Trains a SentencePiece model on `texts` (an iterable of documents) and
  writes it to `path` (ending in .model); returns `path`. Ids as seqio's
  SentencePiece vocabularies expect (0 pad, 1 EOS, 2 UNK, no BOS); byte
  fallback, so every byte stays representable and bits per byte stay exact."""
  import sentencepiece  # only for SentencePiece vocabularies
  if not path.endswith(".model"):
    raise FlagError("--train_vocab", f"{path!r}: a SentencePiece model path ends in .model")
  if vocab_size < 256 + 3 + 1:
    raise FlagError("--vocab_size", f"{vocab_size}: needs room for the 256 byte pieces, "
                    "pad, EOS and UNK, and at least one piece more")

  def lines():
    for doc in texts:
      # SentencePiece reads sentences; a document's lines are its sentences.
      yield from (line for line in doc.split("\n") if line.strip())

  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=path[:-len(".model")], vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as e:
    if "Vocabulary size too high" in str(e):  # the text has fewer distinct pieces
      most = str(e).split("<=")[-1].strip(" .")
      raise FlagError("--vocab_size", f"{vocab_size}: the text yields at most {most} pieces; "
                      "ask for fewer or train on more text") from None
    raise
  return path
