r"""One config file for all five architectures, for comparisons and sweeps:
`model=` picks the architecture's own config (configs/<model>.py) at `size=`.

  python -m hiertx.train --config=configs/compare.py:model=top_down --workdir=/tmp/td

Sweeps (run with launch/sweep.py, summarised with launch/report.py):

  paper_claim  memory vs perplexity (Subramanian et al. 2020): the five models
               at the same width, sequence length, batch and steps, two seeds;
               10 runs of 300 steps, about 40 minutes on 2 CPU cores.
  depth        vanilla at 2, 4 and 8 layers against top_down at 1, 2 and 4
               blocks per scale (the paper's "more layers for less memory").
"""

import os

from hiertx import config as config_lib
from hiertx import sweep

MODELS = ("vanilla", "bottom_up", "top_down", "retina", "hourglass")
_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="vanilla", size="small", runlocal=False)
  config_lib.choose(dict.fromkeys(MODELS), arg.model, "model")
  extra = ",runlocal" if arg.runlocal else ""
  return config_lib.load(os.path.join(_HERE, f"{arg.model}.py") + f":size={arg.size}{extra}")


def sweep_paper_claim():
  return sweep.product({"arg.model": list(MODELS), "train.seed": [0, 1]},
                       [{"train.steps": 300, "eval.every": 100, "train.checkpoint_every": 100}])


def sweep_depth():
  return sweep.chain(
      sweep.product({"arg.model": ["vanilla"], "model.num_layers": [2, 4, 8]}),
      sweep.product({"arg.model": ["top_down"],
                     "model.layers_per_scale": [(1, 1, 1), (2, 2, 2), (4, 4, 4)]}))
