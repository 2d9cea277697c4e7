"""Moved to `hf_dino.visualization.attention`. This import path still works for one release, with a FutureWarning."""

import sys
import warnings

from .visualization.attention import __name__ as _new_name

warnings.warn("hf_dino.attention moved to hf_dino.visualization.attention; import it from there (the old path goes in the next release)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = sys.modules[_new_name]
