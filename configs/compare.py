r"""One config file for all five architectures, for comparisons and sweeps:
`model=` picks the architecture's own config (configs/<model>.py) at `size=`.

  python -m hiertx.train --config=configs/compare.py:model=top_down --workdir=/tmp/td

Sweeps (run with launch/sweep.py, summarised with launch/report.py); their
seeds are `train.seed`, which `data.seed` follows, so seeds differ in data
order as well as initialisation:

  paper_claim  memory vs perplexity (Subramanian et al. 2020): the five models
               at the same width, sequence length, batch and steps, two seeds;
               10 runs of 300 steps, about 40 minutes on 2 CPU cores. A first
               look: 300 steps compare early optimisation more than capacity.
  claim        the paper's pair after real training: the 30-layer hierarchical
               models (bottom_up, top_down, hourglass at size=paper30) against
               the 14-layer vanilla (paper14), at width 128 (4 heads, MLP 512),
               sequence 256, batch 8, 3,000 steps (6.1M tokens, about half an
               epoch of the stdlib corpus; the cosine schedule ends there), two
               seeds each, each model at its best claim_lr rate; 25-60 minutes
               a run on one core (--parallel=2 --pin_cpus). Retina is left out:
               its 30 layers all run at full length, so it costs about twice
               vanilla's memory and time (see experiments/memory_depth.py).
  claim_lr     the claim's learning rates: each of its four models at 1e-3,
               2e-3 (the default) and 4e-3, and top_down and hourglass (best
               at 4e-3) at 8e-3, 1,000 steps at the claim's shape, one seed;
               14 runs of 10-30 minutes on 2 CPU cores.
  claim_gpu    the same comparison sized for one accelerator: width 512
               (8 heads, MLP 2048), sequence 2048, batch 16, 10,000 steps
               (330M tokens) in bfloat16 on PG-19 (books, downloaded by TFDS;
               `-- --config.data.text_files=...` for local text instead).
  boundaries   hourglass small ('2@1 4@4 2@1', width 128) with each boundary
               source for its shortening: fixed every 4 bytes (and every 8),
               whitespace, entropy above 4.4 bits, learned (DTP's gradient; no
               noise, and once with Gumbel noise), dynamic (H-Net's chunking;
               once toward 1/8) and dynamic in two stages (H-Net's 2-stage
               model, '2@1 1@2 4@4 1@2 2@1'), two seeds, sequence 256, batch 8,
               1,000 steps; 16 runs of about 8-15 minutes each on 2 CPU cores.
               experiments/boundary_sources.py tabulates it per corpus.
  hourglass_pairs
               the Hourglass paper's equal-memory pairs (Nawrot et al. 2021,
               Table 1, enwik8: '2@1 4@4 2@1' 1.143 bpc at 4.41 GB against 6
               vanilla layers' 1.182 at 4.53 GB; '5@1 8@2 5@1' 1.079 at 9.57 GB
               against 14 layers' 1.102 at 9.35 GB) at the claim's recipe and
               rates, two seeds; launch/report.py gives each at equal memory
               and at equal training FLOPs per byte.
  claim_subword
               the claim's vanilla/hourglass pair once on subword tokens: an
               8,192-piece SentencePiece vocabulary trained on the stdlib
               train split (3.3 bytes a piece on the validation split), at
               the claim's recipe in pieces (so each step reads about 3.3x the
               bytes), seed 0; bits per byte stay comparable with the byte
               runs. Make the vocabulary first, where $HIERTX_VOCAB (default
               ~/.cache/hiertx/stdlib_8k.model) points:
                 python -m hiertx.prepare_data --config=configs/vanilla.py \
                     --train_vocab=$HIERTX_VOCAB --vocab_size=8192
  depth        vanilla at 2, 4 and 8 layers against top_down at 1, 2 and 4
               blocks per scale (the paper's "more layers for less memory").
"""

import os

from hiertx import config as config_lib
from hiertx import models
from hiertx import grid

MODELS = tuple(models.MODELS)  # the registry: a registered model is comparable at once
_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="vanilla", size="small", runlocal=False)
  config_lib.choose(dict.fromkeys(MODELS), arg.model, "model")
  extra = ",runlocal" if arg.runlocal else ""
  return config_lib.load(os.path.join(_HERE, f"{arg.model}.py") + f":size={arg.size}{extra}")


def sweep_paper_claim():
  return grid.product({"arg.model": list(MODELS), "train.seed": [0, 1]},
                       [{"train.steps": 300, "eval.every": 100, "train.checkpoint_every": 100}])


_CLAIM_MODELS = grid.zipped({"arg.model": ["vanilla", "bottom_up", "top_down", "hourglass"],
                              "arg.size": ["paper14", "paper30", "paper30", "paper30"]})
# Each model's best rate in claim_lr (1,000 steps, 64 validation batches;
# docs/sweeps.md): the claim trains each at its own.
_CLAIM_RATES = [2e-3, 2e-3, 4e-3, 4e-3]


_CLAIM_SHAPE = {"model.d_model": 128, "model.num_heads": 4, "model.mlp_dim": 512,
                "data.seq_len": 256, "data.batch_size": 8, "eval.batch_size": 8,
                "train.warmup_steps": 100, "train.log_every": 50}


def sweep_claim():
  # Seed 0 of every model first: an interrupted sweep already compares them all.
  rated = [{**m, "train.learning_rate": lr} for m, lr in zip(_CLAIM_MODELS, _CLAIM_RATES)]
  return grid.product({"train.seed": [0, 1]}, rated, [{
      **_CLAIM_SHAPE, "eval.batches": 16, "train.steps": 3000,
      "eval.every": 250, "train.checkpoint_every": 500}])


def sweep_hourglass_pairs():
  pairs = grid.zipped({"arg.model": ["vanilla", "hourglass", "vanilla", "hourglass"],
                        "model.num_layers": [6, None, 14, None],
                        "model.hierarchy": [None, "2@1 4@4 2@1", None, "5@1 8@2 5@1"],
                        "train.learning_rate": [2e-3, 4e-3, 2e-3, 4e-3]})
  # A None leaves the field to the model (vanilla has no hierarchy, hourglass
  # no num_layers).
  pairs = [{k: v for k, v in arm.items() if v is not None} for arm in pairs]
  # The final evaluation scores the whole validation split (its ~67 batches;
  # eval.batches is a cap), as the claim's final numbers do.
  return grid.product({"train.seed": [0, 1]}, pairs, [{
      **_CLAIM_SHAPE, "eval.batches": 1000, "train.steps": 3000,
      "eval.every": 1000, "train.checkpoint_every": 500}])


def sweep_claim_subword():
  vocab = os.environ.get("HIERTX_VOCAB", os.path.expanduser("~/.cache/hiertx/stdlib_8k.model"))
  pair = [{**m, "train.learning_rate": lr} for m, lr in zip(_CLAIM_MODELS, _CLAIM_RATES)
          if m["arg.model"] in ("vanilla", "hourglass")]
  return grid.product({"train.seed": [0], "data.vocab": [vocab]}, pair, [{
      **_CLAIM_SHAPE, "eval.batches": 1000, "train.steps": 3000,
      "eval.every": 1000, "train.checkpoint_every": 500}])


def sweep_claim_lr():
  # A third of the claim's horizon (its cosine ends at step 1,000), scored on
  # 64 validation batches (131k bytes, nearly the whole stdlib split) so that
  # neighbouring rates are told apart by more than the evaluation's noise.
  # The default rate (2e-3) first: an interrupted sweep still has a baseline.
  rates = grid.product({"train.learning_rate": [2e-3, 1e-3, 4e-3]}, _CLAIM_MODELS)
  # top_down and hourglass were best at the grid's edge (4e-3): one rate beyond.
  beyond = grid.product({"train.learning_rate": [8e-3], "arg.size": ["paper30"],
                          "arg.model": ["top_down", "hourglass"]})
  return grid.product(rates + beyond, [{
      **_CLAIM_SHAPE, "eval.batches": 64, "train.steps": 1000,
      "eval.every": 500, "train.checkpoint_every": 250}])


def sweep_claim_gpu():
  return grid.product({"train.seed": [0, 1]}, _CLAIM_MODELS, [{
      "model.d_model": 512, "model.num_heads": 8, "model.mlp_dim": 2048, "model.dtype": "bfloat16",
      "data.task": "pg19", "data.seq_len": 2048, "data.batch_size": 16, "eval.batch_size": 16,
      "eval.batches": 32, "train.steps": 10000, "train.warmup_steps": 500,
      "train.log_every": 100, "eval.every": 1000, "train.checkpoint_every": 1000}])


# Each arm of the boundaries sweep (the keys an arm sets name its runs).
_BOUNDARY_ARMS = [
    {"model.boundaries": "fixed"},
    {"model.boundaries": "fixed", "model.hierarchy": "2@1 4@8 2@1"},
    {"model.boundaries": "whitespace"},
    # About a quarter of stdlib's bytes are above 4.4 bits for the entropy head
    # of a run at 3 bits (experiments/boundary_sources.py --calibrate), i.e. k = 4.
    {"model.boundaries": "entropy", "model.entropy_threshold": 4.4},
    {"model.boundaries": "learned", "model.boundary_temperature": 0.0},
    {"model.boundaries": "dynamic"},  # H-Net's chunking, ratio loss toward 1/k
    # H-Net's 2-stage model: bytes -> chunks (1/2) -> chunks of chunks (1/2).
    {"model.boundaries": "dynamic", "model.hierarchy": "2@1 1@2 4@4 1@2 2@1"},
]


def sweep_boundaries():
  common = [{"data.seq_len": 256, "data.batch_size": 8, "eval.batch_size": 8,
             "eval.batches": 32, "train.steps": 1000, "train.warmup_steps": 100,
             "train.log_every": 50, "eval.every": 250, "train.checkpoint_every": 500}]
  # Seed 0 of every arm first: an interrupted sweep already compares them all.
  # The learned predictor with Gumbel noise (temperature 1) once, for contrast;
  # dynamic routing toward 1/8 once, whose groups land near whitespace's length.
  return grid.chain(
      grid.product({"train.seed": [0, 1], "arg.model": ["hourglass"]}, _BOUNDARY_ARMS, common),
      grid.product({"train.seed": [0], "arg.model": ["hourglass"],
                     "model.boundaries": ["learned"]}, common),
      grid.product({"train.seed": [0], "arg.model": ["hourglass"], "model.boundaries": ["dynamic"],
                     "model.hierarchy": ["2@1 4@8 2@1"]}, common))


def sweep_depth():
  return grid.chain(
      grid.product({"arg.model": ["vanilla"], "model.num_layers": [2, 4, 8]}),
      grid.product({"arg.model": ["top_down"],
                     "model.layers_per_scale": [(1, 1, 1), (2, 2, 2), (4, 4, 4)]}))
