"""The interface every model implements, and the checks shared by all of them.

A model maps tokens [B, T] (plus optional packing segment ids and positions)
to next-token logits [B, T, V]. Hierarchical models need T to be a multiple
of their total pooling factor: the base pads on the right and slices back,
which is safe because padding only adds future positions.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
from absl import logging
import jax
import jax.numpy as jnp

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError

POSITIONS = ("learned", "rotary", "none")
DTYPES = ("float32", "bfloat16")


class LanguageModel(nn.Module):
  """Embedding -> `body` (architecture specific) -> LayerNorm -> logits."""

  vocab_size: int
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.0
  positions: str = "learned"
  max_len: int = 2048
  dtype: str = "float32"
  remat: str = "none"  # none | block | dots (hiertx.layers.REMAT_POLICIES)
  scan_layers: bool = False  # repeated blocks as one lax.scan, parameters stacked

  @property
  def block_cfg(self) -> layers.BlockConfig:
    return layers.BlockConfig(self.d_model, self.num_heads, self.mlp_dim,
                              self.dropout, self.positions, self.dtype, self.remat,
                              self.scan_layers)

  @property
  def padded_vocab(self) -> int:
    """Tables are padded to a multiple of 128 so `vocab` splits evenly over devices."""
    return -(-self.vocab_size // 128) * 128

  def length_multiple(self) -> int:
    """Sequence lengths are padded to a multiple of this (k^S for hierarchies)."""
    return 1

  def body(self, x_BxTxD: jax.Array, fine: scales.Scale, deterministic: bool) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None,
               deterministic: bool = True):
    b, t = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    m = self.length_multiple()
    tokens_BxP = scales.pad_to_multiple(tokens_BxT, m)
    seg_BxP = scales.pad_to_multiple(segment_ids_BxT.astype(jnp.int32), m)
    pos_BxP = jnp.minimum(scales.pad_to_multiple(positions_BxT, m), self.max_len - 1)
    x_BxPxD = layers.Embed(self.padded_vocab, self.block_cfg, self.max_len, name="embed")(
        tokens_BxP, pos_BxP, deterministic)
    # A zero-cost hook: tests differentiate outputs w.r.t. the input embeddings.
    x_BxPxD = self.perturb("embeddings", x_BxPxD)
    h_BxPxD = self.body(x_BxPxD, scales.fine_scale(seg_BxP), deterministic)
    logits_BxPxV = layers.Head(self.padded_vocab, self.block_cfg, name="head")(h_BxPxD)
    return logits_BxPxV[:, :t, :self.vocab_size]

  @classmethod
  def check_config(cls, cfg: Mapping[str, Any], seq_len: int) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    _positive(cfg, "d_model", "num_heads", "mlp_dim", "max_len")
    if cfg["d_model"] % cfg["num_heads"]:
      raise ConfigError("model.num_heads", f"{cfg['num_heads']} does not divide "
                        f"model.d_model={cfg['d_model']}")
    if not 0.0 <= cfg["dropout"] < 1.0:
      raise ConfigError("model.dropout", f"must be in [0, 1), got {cfg['dropout']}")
    _choice(cfg, "positions", POSITIONS)
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "remat", ("none", *layers.REMAT_POLICIES))
    if not isinstance(cfg["scan_layers"], bool):
      raise ConfigError("model.scan_layers", f"must be True or False, got {cfg['scan_layers']!r}")
    if cfg["remat"] != "none" and not cfg["scan_layers"]:
      logging.warning("model.remat=%s with unrolled blocks: XLA:CPU may schedule the "
                      "recomputation early and save no memory; set model.scan_layers=True",
                      cfg["remat"])
    if cfg["positions"] == "rotary" and (cfg["d_model"] // cfg["num_heads"]) % 2:
      raise ConfigError("model.positions", "rotary needs an even head width "
                        "(d_model / num_heads)")
    if cfg["positions"] == "learned" and seq_len > cfg["max_len"]:
      raise ConfigError("model.max_len", f"{cfg['max_len']} is shorter than "
                        f"data.seq_len={seq_len}; learned positions cannot go past it")


def field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _positive(cfg, *names):
  for n in names:
    v = cfg[n]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ConfigError(f"model.{n}", f"must be a positive integer, got {v!r}")


def _non_negative(cfg, *names):
  for n in names:
    v = cfg[n]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f"model.{n}", f"must be a non-negative integer, got {v!r}")


def _choice(cfg, name, options):
  if cfg[name] not in options:
    raise ConfigError(f"model.{name}", f"{cfg[name]!r} is not one of {options}")


def int_list(cfg, name: str, length: int | None = None, minimum: int = 1) -> list[int]:
  """Reads a per-scale list (a tuple/list, or one int meaning 'the same at all')."""
  v = cfg[name]
  if isinstance(v, int) and not isinstance(v, bool):
    if length is None:
      raise ConfigError(f"model.{name}", "must be a list with one value per scale")
    v = [v] * length
  v = list(v)
  if length is not None and len(v) != length:
    raise ConfigError(f"model.{name}", f"has {len(v)} entries but the model has {length} "
                      "scales; give one value per scale")
  for x in v:
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
      raise ConfigError(f"model.{name}", f"entries must be integers >= {minimum}, got {v}")
  return v


def check_pooling_fits(field: str, total_factor: int, seq_len: int) -> None:
  """The coarsest scale must hold more than position 0 for a sequence."""
  if total_factor > seq_len:
    raise ConfigError(field, f"total pooling factor {total_factor} exceeds data.seq_len="
                      f"{seq_len}: the coarsest scale would only ever summarise token 0")
