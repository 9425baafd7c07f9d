"""What general-purpose compressors spend on a text: the baseline every
bits-per-byte figure is printed beside."""

import gzip
import lzma


def compressor_bits_per_byte(text: bytes) -> dict[str, float]:
  """What general-purpose compressors spend on `text`: `gzip -9` and `xz -9`
  (Python's gzip and lzma at those presets), in bits per byte. A language
  model's bits per byte on the same text reads against them."""
  n = max(len(text), 1)
  return {"gzip_bits_per_byte": 8 * len(gzip.compress(text, compresslevel=9, mtime=0)) / n,
          "xz_bits_per_byte": 8 * len(lzma.compress(text, preset=9)) / n}
