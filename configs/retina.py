r"""Retina LM: every layer attends to the recent past token by token and to
older text through blocks of k, k^2, ... tokens.

  python -m hiertx.train --config=configs/retina.py --workdir=/tmp/retina

Sizes: tiny, small (default), base, paper30 (width 256, 30 layers).
`model.implementation=dense` selects the O(T^2) reference.
"""

from hiertx import config as config_lib

SIZES = {
    # num_layers, pool_factor, windows (w_0 tokens, w_1 blocks, ...), chunk_size
    "tiny": (2, 2, (4, 2), 16),
    "small": (4, 4, (32, 8), 64),
    "base": (6, 4, (64, 16), 64),
    "paper30": (30, 4, (64, 16), 64),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  n, k, windows, chunk = config_lib.choose(SIZES, arg.size, "size")
  c.model = config_lib.model_config(
      "retina", arg.size, num_layers=n, pool_factor=k, windows=windows, chunk_size=chunk)
  config_lib.apply_size_defaults(c, arg)
  return c
