"""The interface every model implements, and the checks shared by all of them.

A model maps tokens [B, T] (plus optional packing segment ids and positions)
to next-token logits [B, T, V]. Hierarchical models need T to be a multiple
of their total pooling factor: the base pads on the right and slices back,
which is safe because padding only adds future positions.

Beside the forward pass each model defines, from the same submodules, its
incremental decoding (docs/design.md section 5) and its workload for the analytic
cost model:

  init_cache(batch, capacity) -> state          empty caches (no parameters needed)
  prefill(prompt_BxP, capacity) -> (state, logits_BxV)
                                                 one forward pass over a prompt
  step(state, token_B, t) -> (state, logits_BxV) fine position t
  workload(seq_len) -> Workload                 what runs at which scale

`hiertx.decode` calls these through `apply(..., method=...)`.
"""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hiertx import attention as attention_lib
from hiertx import layers
from hiertx import scales
from hiertx import workload as workload_lib
from hiertx.errors import ConfigError

POSITIONS = ("learned", "rotary", "none")
DTYPES = ("float32", "bfloat16")


class PooledScales:
  """For models whose scale s pools `pool_factors[s - 1]` positions of scale
  s - 1 (bottom_up, top_down): the top scale and each scale's factor."""

  @property
  def top(self) -> int:
    return len(self.pool_factors)

  def factor(self, s: int) -> int:
    """K_s: fine positions per position of scale s."""
    return math.prod(self.pool_factors[:s])

  @staticmethod
  def check_factors(cfg, seq_len) -> list[int]:
    """The checked `pool_factors` (each >= 2, their product fitting `seq_len`):
    one per coarse scale."""
    n = 1 if isinstance(cfg["pool_factors"], int) else len(cfg["pool_factors"])
    factors = int_list(cfg, "pool_factors", n, minimum=2)
    check_pooling_fits("model.pool_factors", math.prod(factors), seq_len)
    return factors


class LanguageModel(nn.Module):
  """Embedding -> `body` (architecture specific) -> LayerNorm -> logits."""

  vocab_size: int
  d_model: int = 256  # width of every scale
  num_heads: int = 4  # attention heads (head width d_model / num_heads)
  mlp_dim: int = 1024  # hidden width of each block's MLP
  dropout: float = 0.0  # on attention and MLP outputs, in training
  positions: str = "learned"  # learned | rotary | none
  max_len: int = 2048  # longest sequence learned positions cover
  dtype: str = "float32"  # float32 | bfloat16 (activations; parameters stay float32)
  weight_init: str = "lecun"  # matrices' initialisation: lecun | torch (hiertx.layers.INITS)
  position_init: float = 0.02  # standard deviation of learned positions at initialisation
  remat: str = "none"  # none | block | dots (hiertx.layers.REMAT_POLICIES)
  scan_layers: bool = False  # repeated blocks as one lax.scan, parameters stacked
  attention: str = "blockwise"  # dense | blockwise | cudnn | splash | pallas (hiertx.attention)
  attention_q_chunk: int = 256  # query block of blockwise and Pallas attention
  attention_k_chunk: int = 256  # key block of blockwise and Pallas attention
  # What a site the kernel (cudnn, splash, pallas) cannot take runs:
  # error | blockwise | dense | pallas.
  attention_fallback: str = "error"
  # The Pallas kernel's launch on GPUs (0: chosen by block size and dtype,
  # hiertx.flash.launch).
  attention_warps: int = 0  # warps per program
  attention_stages: int = 0  # software pipeline stages
  # attention=cudnn with documents masked: rows holding one document run
  # cuDNN without a mask; packed rows run `pallas` (segment ids in the
  # kernel) or `mask` (cuDNN with a [B, 1, T, T] document bias).
  attention_cudnn_packed: str = "pallas"
  # Not a config field: set from data.cross_document_attention by the run
  # ("masked": documents of a packed row never see each other; "visible":
  # a row is one causal sequence, segment ids only mark trailing padding).
  documents: str = "masked"

  @property
  def block_cfg(self) -> layers.BlockConfig:
    return layers.BlockConfig(
        self.d_model, self.num_heads, self.mlp_dim, self.dropout, self.positions, self.dtype,
        self.remat, self.scan_layers,
        attention_lib.AttentionConfig(self.attention, self.attention_q_chunk,
                                      self.attention_k_chunk, self.attention_fallback,
                                      self.attention_warps, self.attention_stages,
                                      self.documents, self.attention_cudnn_packed),
        self.weight_init, self.position_init)

  @property
  def padded_vocab(self) -> int:
    """Tables are padded to a multiple of 128 so `vocab` splits evenly over devices."""
    return -(-self.vocab_size // 128) * 128

  def pooling_multiple(self) -> int:
    """The total pooling factor (k^S): a document starting at a multiple of
    it is grouped exactly as it would be alone (docs/design.md section 7)."""
    return 1

  @property
  def content(self) -> bool:
    """Whether the first shortening groups by content (hiertx.boundaries)."""
    return False

  @property
  def content_stages(self) -> int:
    """How many shortenings group by content (hourglass's dynamic: maybe 2)."""
    return int(self.content)

  def source_params(self) -> int:
    """Parameters of the content-boundary sources (hiertx.boundaries)."""
    return 0

  def length_multiple(self) -> int:
    """Sequence lengths are padded to a multiple of this."""
    return self.pooling_multiple()

  def setup(self):
    self.embed = layers.Embed(self.padded_vocab, self.block_cfg, self.max_len)
    self.head = layers.Head(self.padded_vocab, self.block_cfg)

  def body(self, x_BxTxD: jax.Array, fine: scales.Scale, deterministic: bool,
           tokens_BxT: jax.Array | None = None) -> jax.Array:
    raise NotImplementedError

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
    pos_BxP = scales.pad_to_multiple(positions_BxT, m)
    x_BxPxD = self.embed(tokens_BxP, pos_BxP, deterministic)
    # A zero-cost hook: tests differentiate outputs w.r.t. the input embeddings.
    x_BxPxD = self.perturb("embeddings", x_BxPxD)
    h_BxPxD = self.body(x_BxPxD, scales.fine_scale(seg_BxP, pos_BxP), deterministic,
                        tokens_BxT=tokens_BxP)
    return self.head(h_BxPxD)[:, :t, :self.vocab_size]

  # --------------------------------------------------------------------------
  # Decoding (docs/design.md section 5).

  def decode_capacity(self, capacity: int) -> int:
    """Fine positions a cache must hold: `capacity` rounded up to the length multiple."""
    m = self.length_multiple()
    return -(-capacity // m) * m

  def init_cache(self, batch: int, capacity: int) -> Any:
    raise NotImplementedError

  def step(self, state, token_B, t) -> tuple[Any, jax.Array]:
    raise NotImplementedError

  def prompt_state(self, p: int, capacity: int) -> Any:
    """The decoding state after a forward pass over a prompt of `p` tokens,
    from what that pass `remember`ed."""
    raise NotImplementedError

  def prefill(self, prompt_BxP, capacity: int):
    """Caches for positions 0 .. P-1 from one parallel forward pass, and the
    logits predicting position P."""
    b, p = prompt_BxP.shape
    logits_BxPxV = self(prompt_BxP)
    state = self.prompt_state(p, capacity)
    # The same buffers (shapes, dtypes) as init_cache, so steps continue from either.
    like = jax.eval_shape(lambda: self.init_cache(b, capacity))
    state = jax.tree_util.tree_map(lambda x, ref: jnp.broadcast_to(x, ref.shape).astype(
        ref.dtype), state, like)
    return state, logits_BxPxV[:, -1]

  def logits_at(self, x_BxD) -> jax.Array:
    """Next-token logits [B, V] (float32) of one position's final state."""
    return self.head(x_BxD)[:, :self.vocab_size].astype(jnp.float32)

  def hidden(self, batch: int, slots: int) -> jax.Array:
    """An empty cache of per-position states, [B, slots, D]."""
    return jnp.zeros((batch, slots, self.d_model), self.block_cfg.jnp_dtype)

  # --------------------------------------------------------------------------
  # Analytic cost (hiertx.cost).

  def workload(self, seq_len: int) -> workload_lib.Workload:
    """Every block the model runs at `seq_len` (padded to its length multiple)."""
    t = self.decode_capacity(seq_len)
    return workload_lib.Workload(t, tuple(b for b in self.blocks_at(t) if b.count),
                                 self.extra_params() + self.source_params())

  def blocks_at(self, t: int) -> list[workload_lib.Blocks]:
    raise NotImplementedError

  def extra_params(self) -> int:
    """Parameters outside blocks, embedding and head (pooling, scale embeddings)."""
    return 0

  def self_attention(self, name: str, count: int, length: int, factor: int,
                     stacked: bool = True) -> workload_lib.Blocks:
    """`count` self-attention blocks over `length` vectors of a scale of `factor`."""
    ends = np.arange(length) * factor
    scores = attention_lib.score_count(ends, ends, self.block_cfg.attention)
    return workload_lib.Blocks(name, count, length, length, length, scores,
                               self.map_keys(length), self.rescored(scores), stacked=stacked)

  def cross_attention(self, name: str, q_end, k_end) -> workload_lib.Blocks:
    """One cross block from queries ending at `q_end` to keys ending at `k_end`."""
    scores = attention_lib.score_count(np.asarray(q_end), np.asarray(k_end),
                                       self.block_cfg.attention)
    return workload_lib.Blocks(name, 1, len(q_end), len(k_end), len(k_end), scores,
                               self.map_keys(len(k_end)), self.rescored(scores), cross=True,
                               stacked=False)

  def map_keys(self, keys: int) -> int:
    """Keys per query in a kept attention map (see workload.Blocks)."""
    return keys if self.attention == "dense" else 0

  def rescored(self, scores: int) -> float:
    """Forward work (in scores) the configured attention redoes in the backward pass."""
    return 0.0 if self.attention == "dense" else scores / 2

  def scale_change(self, s: int, k: int, fine_len: int, factor: int, pooling: str,
                   upsampling: str | None) -> list[workload_lib.Blocks]:
    """The attention blocks of pooling scale s (`fine_len` vectors of `factor`)
    by k, and of upsampling back, where those use attention."""
    out = []
    fine_end = np.arange(fine_len) * factor
    if pooling == "attention":  # each group's mean over its own k members
      groups = fine_len // k
      # Tiny per-group maps ([1, k]); the blockwise path keeps none either way.
      out.append(workload_lib.Blocks(f"pool_{s + 1}", 1, groups, k, fine_len, groups * k,
                                     self.map_keys(k), self.rescored(groups * k), cross=True,
                                     stacked=False))
    if upsampling == "attention":
      out.append(self.cross_attention(f"upsample_{s}", fine_end, fine_end[::k]))
    return out

  # --------------------------------------------------------------------------
  # Configuration.

  @classmethod
  def check_config(cls, cfg: Mapping[str, Any], seq_len: int) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    positive(cfg, "d_model", "num_heads", "mlp_dim", "max_len", "attention_q_chunk",
              "attention_k_chunk")
    for name, allowed in (("attention_warps", (0, 1, 2, 4, 8, 16)),
                          ("attention_stages", (0, 1, 2, 3, 4, 5))):
      if cfg[name] not in allowed:
        raise ConfigError(f"model.{name}", f"must be one of {allowed} (0: chosen by shape), "
                          f"got {cfg[name]!r}")
    if cfg["d_model"] % cfg["num_heads"]:
      raise ConfigError("model.num_heads", f"{cfg['num_heads']} does not divide "
                        f"model.d_model={cfg['d_model']}")
    if not 0.0 <= cfg["dropout"] < 1.0:
      raise ConfigError("model.dropout", f"must be in [0, 1), got {cfg['dropout']}")
    choice(cfg, "positions", POSITIONS)
    choice(cfg, "dtype", DTYPES)
    choice(cfg, "weight_init", tuple(layers.INITS))
    if not isinstance(cfg["position_init"], (int, float)) or not cfg["position_init"] >= 0:
      raise ConfigError("model.position_init", "must be a standard deviation >= 0, got "
                        f"{cfg['position_init']!r}")
    choice(cfg, "remat", ("none", *layers.REMAT_POLICIES))
    choice(cfg, "attention", attention_lib.KINDS)
    choice(cfg, "attention_fallback", attention_lib.FALLBACKS)
    choice(cfg, "attention_cudnn_packed", attention_lib.CUDNN_PACKED)
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


def positive(cfg, *names):
  for n in names:
    v = cfg[n]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ConfigError(f"model.{n}", f"must be a positive integer, got {v!r}")


def choice(cfg, name, options):
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


def ends(slots: int, factor: int) -> np.ndarray:
  """End positions of the slots of a cache at a scale of `factor`."""
  return np.arange(slots, dtype=np.int32) * factor


def when(pred, fn, state):
  """`fn(state)` if `pred` else `state` (a coarse position completes only every K steps)."""
  return jax.lax.cond(pred, fn, lambda s: s, state)


def set_at(items: list, i: int, value) -> list:
  return [*items[:i], value, *items[i + 1:]]
