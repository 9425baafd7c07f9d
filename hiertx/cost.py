"""The project's own prediction of a training step's memory and FLOPs.

Every model is described as a list of `Blocks` workloads (how many blocks,
how many query positions, how many keys each query scores), plus the
embedding, the head and the extras between scales. From that list:

* parameters: exact (tests compare with the initialised model);
* FLOPs: 2 per multiply-add of every matmul, forward x3 for a training step
  (the backward pass costs two forwards), plus one more forward of every
  rematerialised block;
* memory: what a training step holds at its peak, in float32 bytes:

    state       params + AdamW's two moments (updated in place: donated)
    gradients   one copy of the parameters
    batch       5 int32 arrays [B, T]
    activations what the backward pass needs, per block (see `_kept`)
    head        the logits and their softmax, gradient included
    working     the largest block's residuals and attention-map gradient,
                live while that block's backward pass runs

Per-block residual counts are the tensors JAX's autodiff saves for a pre-LN
block (`jax.ad_checkpoint` lists them), as XLA keeps them after fusion:
12 vectors of width D (two LayerNorms' 4 each, q, k, v and the attention
output), 3 of width F (the first MLP matmul and GELU's fused intermediates),
and 3 float32 attention maps [H, Q, S] (masked logits, exp, weights).

Accuracy: the peak is within 15% of XLA:CPU's for the shipped sizes (small,
base, paper14/paper30) at seq_len >= 128, with and without remat and scan
(tests/test_cost.py; `experiments/memory_depth.py` prints both). Toy shapes
(width 32, one block per scale) are outside that: per-op overheads the model
ignores dominate there, and it over-predicts by up to ~1.8x.
"""

import dataclasses
import math
from typing import Any, Mapping

from hiertx import models
from hiertx.models import hourglass as hourglass_lib

F32 = 4
# Per-block residuals in units of [B, L, D], [B, L, F] and [B, H, L, S] (see above).
_D_KEPT, _F_KEPT, _MAP_KEPT = 12, 3, 3
# Logits-sized f32 tensors live around the loss: logits, log-softmax, exp,
# the gradient, and the sliced copy handed to the loss.
_HEAD_KEPT = 5
# Matmul outputs a `dots` policy keeps per block: q, k, v, attention out, MLP out (D-wide);
# MLP hidden (F-wide).
_DOTS_D, _DOTS_F = 5, 1


@dataclasses.dataclass(frozen=True)
class Blocks:
  """`count` pre-LN blocks: `queries` positions per sequence, each scoring
  `keys` keys (columns of its attention map) projected from `kv_len`
  positions; `cross` blocks read keys from another sequence (own LayerNorm).
  Blocks outside a scale's stack (aggregation, attention pooling/upsampling)
  are `stacked=False`: never scanned nor rematerialised."""

  name: str
  count: int
  queries: int
  keys: int
  kv_len: int
  cross: bool = False
  stacked: bool = True  # a scale's Stack (scanned and rematerialised when configured)
  gathered: int = 0  # key/value positions copied per sequence (retina's chunk windows)


@dataclasses.dataclass(frozen=True)
class Shape:
  """The numbers every formula needs, resolved from a config."""

  batch: int
  seq_len: int  # padded to the model's length multiple
  d_model: int
  num_heads: int
  mlp_dim: int
  vocab: int  # padded vocabulary
  max_len: int
  learned_positions: bool
  remat: str
  scan: bool


def block_params(s: Shape, cross: bool = False) -> int:
  d = s.d_model
  return 4 * d * d + 2 * d * s.mlp_dim + 4 * d + (2 * d if cross else 0)


def workloads(model_cfg: Mapping[str, Any], seq_len: int) -> tuple[list[Blocks], int]:
  """The model's blocks and its parameters outside blocks, embedding and head."""
  cls, cfg = models._resolved(model_cfg)  # noqa: SLF001  (one resolution for all callers)
  model = cls(vocab_size=1, **{k: tuple(v) if isinstance(v, list) else v
                               for k, v in cfg.items()})
  t = -(-seq_len // model.length_multiple()) * model.length_multiple()
  d, name = cfg["d_model"], model_cfg["name"]
  if name == "vanilla":
    return [Blocks("blocks", cfg["num_layers"], t, t, t)], 0
  if name == "retina":
    k, windows = cfg["pool_factor"], tuple(cfg["windows"])
    coarsest = t // k ** len(windows)
    if cfg["implementation"] == "dense":
      keys = sum(t // k ** s for s in range(len(windows) + 1))
    else:
      from hiertx.models import retina  # noqa: PLC0415
      spec = retina.RetinaSpec(k, windows, cfg["chunk_size"], "chunked")
      keys = sum(retina.RetinaAttention(model.block_cfg, spec).window_sizes()) + coarsest
      return [Blocks("blocks", cfg["num_layers"], t, keys, t,
                     gathered=t // cfg["chunk_size"] * keys)], 0
    return [Blocks("blocks", cfg["num_layers"], t, keys, t)], 0
  if name == "hourglass":
    pre, post, factors = hourglass_lib.parse_hierarchy(cfg["hierarchy"])
    out, extra = [], 0
    for i, f in enumerate(factors):
      out.append(Blocks(f"pre_{i}", pre[i], t // f, t // f, t // f))
      if i < len(post):
        out.append(Blocks(f"post_{i}", post[i], t // f, t // f, t // f))
        kk, fine_len = factors[i + 1] // f, t // f
        out_i, extra_i = _between_scales(cfg["pooling"], cfg["upsampling"], kk, fine_len, d)
        out += out_i
        extra += extra_i
    return [b for b in out if b.count], extra
  # bottom_up / top_down: per-scale stacks at T / prod(k[:s]).
  factors = [cfg["pool_factors"]] if isinstance(cfg["pool_factors"], int) else list(
      cfg["pool_factors"])
  per_scale = cfg["layers_per_scale"]
  lengths = [t // math.prod(factors[:s]) for s in range(len(factors) + 1)]
  out = [Blocks(f"scale_{s}", n, lengths[s], lengths[s], lengths[s])
         for s, n in enumerate(per_scale)]
  extra = 0
  upsampling = cfg.get("upsampling", "repeat")  # bottom_up has none: one aggregation
  for s, kk in enumerate(factors):
    blocks, params = _between_scales(cfg["pooling"], upsampling, kk, lengths[s], d)
    out += blocks
    extra += params
  if name == "bottom_up":
    n_keys = sum(lengths)
    out.append(Blocks("aggregate", 1, t, n_keys, n_keys, cross=True, stacked=False))
    out.append(Blocks("post", cfg["post_layers"], t, t, t))
    extra += len(lengths) * d  # scale embeddings
  return [b for b in out if b.count], extra


def _between_scales(pooling: str, upsampling: str, k: int, fine_len: int,
                    d: int) -> tuple[list[Blocks], int]:
  """Pooling from `fine_len` positions by `k`, and upsampling back."""
  blocks, params = [], 0
  if pooling == "linear":
    params += k * d * d
  elif pooling == "attention":  # one query (the group mean) over its k members
    blocks.append(Blocks("pool", 1, fine_len // k, k, fine_len, cross=True,
                         stacked=False))
  if upsampling == "linear":
    params += k * d * d
  elif upsampling == "attention":
    coarse = fine_len // k
    blocks.append(Blocks("upsample", 1, fine_len, coarse, coarse, cross=True,
                         stacked=False))
  return blocks, params


def shape_of(config, vocab_size: int, batch: int | None = None) -> Shape:
  m = config.model
  seq = config.data.seq_len
  return Shape(batch=batch or config.data.batch_size, seq_len=seq, d_model=m.d_model,
               num_heads=m.num_heads, mlp_dim=m.mlp_dim, vocab=-(-vocab_size // 128) * 128,
               max_len=m.max_len, learned_positions=m.positions == "learned", remat=m.remat,
               scan=m.get("scan_layers", False))


def param_count(s: Shape, blocks: list[Blocks], extra: int) -> int:
  embed = s.vocab * s.d_model + (s.max_len * s.d_model if s.learned_positions else 0)
  head = 2 * s.d_model + s.d_model * s.vocab
  return embed + head + extra + sum(b.count * block_params(s, b.cross) for b in blocks)


def _padded_len(blocks: list[Blocks]) -> int:
  return max(b.queries for b in blocks)


def forward_flops(s: Shape, blocks: list[Blocks], head: bool = True) -> float:
  """Matmul FLOPs of one forward pass over the batch (2 per multiply-add)."""
  d, f, total = s.d_model, s.mlp_dim, 0.0
  for b in blocks:
    proj = b.queries * 2 * d * d + b.kv_len * 2 * d * d  # q and output; k and v
    attn = 2 * b.queries * b.keys * d  # scores and weighted values, over all heads
    mlp = 2 * b.queries * d * f
    total += b.count * 2 * (proj + attn + mlp)
  if head:
    total += 2 * _padded_len(blocks) * d * s.vocab
  return s.batch * total


def train_flops(s: Shape, blocks: list[Blocks]) -> float:
  fwd = forward_flops(s, blocks)
  if s.remat == "none":
    return 3 * fwd
  # remat recomputes every stacked block's forward once
  return 3 * fwd + forward_flops(s, [b for b in blocks if b.stacked], head=False)


def _block_bytes(s: Shape, b: Blocks) -> tuple[float, float]:
  """Bytes one block keeps for its backward pass, and its full residual set."""
  bl = s.batch * b.queries
  full = (bl * (_D_KEPT * s.d_model + _F_KEPT * s.mlp_dim)
          + _MAP_KEPT * s.batch * s.num_heads * b.queries * b.keys) * F32
  if b.kv_len != b.queries:  # keys/values projected from another length
    full += 2 * s.batch * b.kv_len * s.d_model * F32
  full += 2 * s.batch * b.gathered * s.d_model * F32
  if s.remat == "none" or not b.stacked:
    return full, full
  if s.remat == "block":
    return bl * s.d_model * F32, full
  return bl * ((_DOTS_D + 1) * s.d_model + _DOTS_F * s.mlp_dim) * F32, full


def memory(s: Shape, blocks: list[Blocks], extra: int) -> dict[str, float]:
  """Predicted bytes at the training step's peak, by part (see module doc)."""
  p = param_count(s, blocks, extra)
  t = _padded_len(blocks)
  kept = {}
  for b in blocks:
    kept[b.name] = kept.get(b.name, 0.0) + b.count * _block_bytes(s, b)[0]
  biggest = max(blocks, key=lambda b: _block_bytes(s, b)[1])
  # The attention-map gradient of the block being differentiated; a scan's
  # backward loop also holds a copy of one block's residuals (sliced from the
  # stack, or recomputed under remat).
  working = s.batch * s.num_heads * biggest.queries * biggest.keys * F32
  if s.scan or s.remat != "none":
    stacked = [b for b in blocks if b.stacked]
    working += max((_block_bytes(s, b)[1] for b in stacked), default=0.0)
  out = {
      "memory/analytic_state_bytes": 3 * p * F32,
      "memory/analytic_gradient_bytes": p * F32,
      "memory/analytic_batch_bytes": 5 * s.batch * s.seq_len * 4,
      "memory/analytic_activation_bytes": sum(kept.values()),
      "memory/analytic_head_bytes": _HEAD_KEPT * s.batch * t * s.vocab * F32,
      "memory/analytic_working_bytes": working,
  }
  out["memory/analytic_peak_bytes"] = sum(out.values())
  for name, v in kept.items():
    out[f"memory/analytic_activation_{name}_bytes"] = v
  return out


def predict(config, vocab_size: int, batch: int | None = None) -> dict[str, float]:
  """Analytic params, FLOPs and memory of `config`'s training step (global batch)."""
  s = shape_of(config, vocab_size, batch)
  blocks, extra = workloads(config.model, config.data.seq_len)
  out = {"params/analytic": param_count(s, blocks, extra),
         "flops/step_analytic": train_flops(s, blocks)}
  out.update(memory(s, blocks, extra))
  return out
