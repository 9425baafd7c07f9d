"""The project's own prediction of a training step's memory and FLOPs.

Every model states its workload (`LanguageModel.workload`): the blocks it
runs at each scale, how many query positions each has, how many keys, and
how many (query, key) scores its attention actually computes. From that:

* parameters: exact (tests compare with the initialised model);
* FLOPs: 2 per multiply-add of every matmul. A training step's hardware
  FLOPs (`train_flops`, the work the device does) are the forward
  pass x3 (the backward pass costs two forwards), plus the attention work the
  backward pass redoes (blockwise attention recomputes its scores; retina
  recomputes its windows), plus one more forward of every rematerialised
  block. Only scores that are
  computed count: chunk pairs blockwise attention skips are no work. The
  dense-equivalent count (every score of a full map) is reported beside it,
  and model FLOPs (`model_flops`: forward x3, nothing recomputed), the
  numerator of MFU;
* memory: what a training step holds at its peak, in float32 bytes:

    state       params + AdamW's two moments (updated in place: donated)
    gradients   one copy of the parameters
    batch       5 int32 arrays [B, T]
    activations what the backward pass needs, per block (see `_block_bytes`)
    head        the logits and their softmax, gradient included
    working     the largest block's transient tensors while its backward runs

Per-block residual counts are the tensors JAX's autodiff saves for a pre-LN
block, as XLA keeps them after fusion: 12 vectors of width D (two LayerNorms'
4 each, q, k, v and the attention output), 3 of width F (the first MLP matmul
and GELU's fused intermediates); dense attention adds 3 float32 maps
[H, Q, S] (masked scores, exp, weights), blockwise attention only its
log-sum-exp [H, Q] and, while a block's backward runs, the score tensors of
one batch of chunk pairs (`attention.pairs_per_batch`) and float32
key/value gradient accumulators. A stack scanned without remat keeps 6 of
width F per block (`_F_KEPT_SCANNED`).

Accuracy: the peak is within 15% of XLA:CPU's for the shipped sizes (small,
base, paper14/paper30) at seq_len >= 128, with and without scan, remat with scan
(tests/test_cost.py; `experiments/memory_depth.py` prints both). Toy shapes
(width 32, one block per scale) are outside that: per-op overheads the model
ignores dominate there. Remat of unrolled blocks is counted as saving what
it recomputes; XLA:CPU schedules the recomputation early and its peak stays
at the no-remat one (small vanilla: 41 MiB predicted, 69 measured), so on CPU
remat goes with scan (docs/training.md).
"""

import dataclasses

from hiertx import attention, models
from hiertx import workload as workload_lib

F32 = 4
# Per-block residuals in units of [B, L, D], [B, L, F] and [B, H, L, S] (see above).
_D_KEPT, _F_KEPT, _MAP_KEPT = 12, 3, 3
# A stack scanned without remat keeps more of width F per block: what
# autodiff saves becomes the loop's stacked outputs, which XLA cannot fuse
# away, so GELU's intermediates stay (6 rather than 3).
_F_KEPT_SCANNED = 6
# Float32 tensors of one batch of chunk pairs live while blockwise attention's
# backward runs (probabilities and their gradient; XLA fuses the rest).
_CHUNK_LIVE = 2
# Logits-sized f32 tensors live around the loss: the logits, the
# log-softmax, and the gradient.
_HEAD_KEPT = 3
# Matmul outputs a `dots` policy keeps per block: q, k, v, attention out, MLP out (D-wide);
# MLP hidden (F-wide).
_DOTS_D, _DOTS_F = 5, 1


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
  attention: str  # dense | blockwise | cudnn | splash
  q_chunk: int
  k_chunk: int


def block_params(s: Shape, cross: bool = False) -> int:
  d = s.d_model
  return 4 * d * d + 2 * d * s.mlp_dim + 4 * d + (2 * d if cross else 0)


def model_workload(model_cfg, seq_len: int, vocab_size: int = 1) -> workload_lib.Workload:
  """What the configured model runs at `seq_len`, as the model states it."""
  return models.build(model_cfg, vocab_size, seq_len).workload(seq_len)


def shape_of(config, vocab_size: int, batch: int | None = None) -> Shape:
  _, m = models.resolve(config.model)  # the fields a config leaves out at the class's defaults
  return Shape(batch=batch or config.data.batch_size, seq_len=config.data.seq_len,
               d_model=m["d_model"], num_heads=m["num_heads"], mlp_dim=m["mlp_dim"],
               vocab=-(-vocab_size // 128) * 128, max_len=m["max_len"],
               learned_positions=m["positions"] == "learned", remat=m["remat"],
               scan=m["scan_layers"], attention=m["attention"],
               q_chunk=m["attention_q_chunk"], k_chunk=m["attention_k_chunk"])


def param_count(s: Shape, w: workload_lib.Workload) -> int:
  embed = s.vocab * s.d_model + (s.max_len * s.d_model if s.learned_positions else 0)
  head = 2 * s.d_model + s.d_model * s.vocab
  return embed + head + w.extra_params + sum(b.count * block_params(s, b.cross)
                                             for b in w.blocks)


def _attention_flops(s: Shape, b: workload_lib.Blocks, dense: bool) -> float:
  """Forward matmul FLOPs of one block's scores and weighted values."""
  scores = b.queries * b.keys if dense else b.scores
  return 2 * 2 * scores * s.d_model


def forward_flops(s: Shape, blocks, head: bool = True, dense: bool = False) -> float:
  """Matmul FLOPs of one forward pass over the batch (2 per multiply-add)."""
  d, f, total = s.d_model, s.mlp_dim, 0.0
  for b in blocks:
    proj = b.queries * 2 * d * d + b.kv_len * 2 * d * d  # q and output; k and v
    mlp = 2 * b.queries * d * f
    total += b.count * (2 * (proj + mlp) + _attention_flops(s, b, dense))
  if head:
    total += 2 * max(b.queries for b in blocks) * d * s.vocab
  return s.batch * total


def train_flops(s: Shape, w: workload_lib.Workload, dense: bool = False) -> float:
  """A training step: forward x3, plus the attention work the backward pass
  redoes (`Blocks.rescored`), plus one forward per remat'd block. `dense`:
  the dense-equivalent count (every score of full maps, nothing redone)."""
  total = 3 * forward_flops(s, w.blocks, dense=dense)
  if not dense:
    total += s.batch * sum(b.count * 2 * 2 * b.rescored * s.d_model for b in w.blocks)
  if s.remat != "none":
    total += forward_flops(s, [b for b in w.blocks if b.stacked], head=False, dense=dense)
  return total


def model_flops(s: Shape, w: workload_lib.Workload) -> float:
  """A training step's model FLOPs, the numerator of MFU: forward x3 of the
  scores the end rule allows, nothing recomputed (no remat, no rescoring)."""
  return 3 * forward_flops(s, w.blocks)


def _block_bytes(s: Shape, b: workload_lib.Blocks) -> tuple[float, float]:
  """Bytes one block keeps for its backward pass, and its full residual set."""
  bl = s.batch * b.queries
  f_kept = _F_KEPT_SCANNED if s.scan and s.remat == "none" and b.stacked else _F_KEPT
  full = bl * ((_D_KEPT + b.extra_kept) * s.d_model + f_kept * s.mlp_dim) * F32
  full += _MAP_KEPT * s.batch * s.num_heads * b.queries * b.map_keys * F32
  if s.attention != "dense":
    full += bl * s.num_heads * F32  # log-sum-exp
  if b.kv_len != b.queries:  # keys/values projected from another length
    full += 2 * s.batch * b.kv_len * s.d_model * F32
  full += 2 * s.batch * b.gathered * s.d_model * F32
  if s.remat == "none" or not b.stacked:
    return full, full
  if s.remat == "block":
    return bl * s.d_model * F32, full
  return bl * ((_DOTS_D + 1) * s.d_model + _DOTS_F * s.mlp_dim) * F32, full


def _attention_working(s: Shape, b: workload_lib.Blocks) -> float:
  """Transient bytes of one block's attention backward pass: the gradient of
  its kept map, or blockwise attention's chunk-pair score tensors and float32
  key/value gradient accumulators."""
  kept_map = s.batch * s.num_heads * b.queries * b.map_keys * F32
  if s.attention == "dense":
    return kept_map
  chunk = min(s.q_chunk, b.queries) * min(s.k_chunk, b.kv_len)
  batch = chunk * attention.pairs_per_batch(max(1, b.scores // chunk), s.batch, s.num_heads,
                                            chunk)
  return max(kept_map, (_CHUNK_LIVE * s.batch * s.num_heads * batch
                        + 2 * s.batch * b.kv_len * s.d_model) * F32)


def memory(s: Shape, w: workload_lib.Workload) -> dict[str, float]:
  """Predicted bytes at the training step's peak, by part (see module doc)."""
  p = param_count(s, w)
  t = max(b.queries for b in w.blocks)
  kept = {}
  for b in w.blocks:
    kept[b.name] = kept.get(b.name, 0.0) + b.count * _block_bytes(s, b)[0]
  # The attention working set of the block being differentiated. Under remat
  # the recomputed block's residuals are live as well, but its backward runs
  # the MLP first: by the time attention's working set is live, the MLP's
  # F-wide residuals are freed. (A scan without remat reads its block's
  # residuals from the stack in place.)
  attention_working = max(_attention_working(s, b) for b in w.blocks)
  working = attention_working
  for b in w.blocks:
    if s.remat != "none" and b.stacked:
      full = _block_bytes(s, b)[1]
      mlp = s.batch * b.queries * _F_KEPT * s.mlp_dim * F32
      working = max(working, full, full - mlp + attention_working)
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
  w = model_workload(config.model, config.data.seq_len, vocab_size)
  out = {"params/analytic": param_count(s, w),
         "flops/step_analytic": train_flops(s, w),
         "flops/step_model": model_flops(s, w),
         "flops/step_analytic_dense": train_flops(s, w, dense=True)}
  out.update(memory(s, w))
  return out
