r"""Vanilla decoder-only transformer, the baseline.

  python -m hiertx.train --config=configs/vanilla.py --workdir=/tmp/vanilla
  python -m hiertx.train --config=configs/vanilla.py:size=tiny --workdir=/tmp/v_tiny

Sizes: tiny (tests, seconds), small (default, a few minutes on 2 CPU cores),
base (width 256), paper14 (width 256, 14 layers: the vanilla side of the
paper's headline comparison; pairs with configs/bottom_up.py:size=paper30).
"""

from hiertx import config as config_lib

LAYERS = {"tiny": 2, "small": 4, "base": 6, "paper14": 14}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  c.model = config_lib.model_config("vanilla", arg.size,
                                    num_layers=config_lib.choose(LAYERS, arg.size, "size"))
  config_lib.apply_size_defaults(c, arg)
  return c
