"""What a model runs at each scale, as each model states it for `hiertx.cost`."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Blocks:
  """`count` pre-LN blocks: `queries` positions per sequence, each scoring
  `keys` keys (columns of a dense attention map) projected from `kv_len`
  positions; `cross` blocks read keys from another sequence (own LayerNorm).

  `scores` is how many (query, key) scores one head of one sequence computes:
  `queries * keys` for dense attention, fewer for blockwise attention, which
  skips the chunk pairs the end rule forbids (`attention.score_count`).
  `map_keys` is how many keys per query sit in an attention map kept for the
  backward pass: all of them for dense attention, none for blockwise (it
  recomputes scores from the log-sum-exp) nor for retina's chunked windows
  (recomputed chunk by chunk). `rescored` counts the forward work the
  backward pass redoes, in scores: half of blockwise attention's (it
  recomputes the scores, not the weighted values), all of retina's windows.

  Blocks outside a scale's stack (aggregation, attention pooling/upsampling)
  are `stacked=False`: never scanned nor rematerialised.
  """

  name: str
  count: int
  queries: int
  keys: int
  kv_len: int
  scores: int
  map_keys: int = 0
  rescored: float = 0.0
  extra_kept: int = 0  # D-wide vectors per query kept beyond a standard block's
  cross: bool = False
  stacked: bool = True
  gathered: int = 0  # key/value positions copied per sequence (retina's chunk windows)


@dataclasses.dataclass(frozen=True)
class Workload:
  """Every block of a model at one (padded) sequence length, and its
  parameters outside blocks, embedding and head."""

  seq_len: int
  blocks: tuple
  extra_params: int = 0
