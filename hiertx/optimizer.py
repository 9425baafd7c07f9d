"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

import jax
import optax


def schedule(train_cfg) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.learning_rate * train_cfg.end_learning_rate_fraction)


def _decays(path, x) -> bool:
  # Matrices only: not LayerNorm scales/biases (which scanned blocks stack into
  # [layers, D], so ndim alone cannot tell), nor the position table.
  name = getattr(path[-1], "key", str(path[-1]))
  return x.ndim >= 2 and name not in ("scale", "bias") and "position" not in (
      jax.tree_util.keystr(path))


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(_decays, params)


def make(train_cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  weight_decay=train_cfg.weight_decay, mask=_decay_mask),
  )
