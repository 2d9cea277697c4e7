"""Moved to `hf_dino.visualization.plotting`. This import path still works for one release, with a FutureWarning."""

import sys
import warnings

from .visualization.plotting import __name__ as _new_name

warnings.warn("hf_dino.plotting moved to hf_dino.visualization.plotting; import it from there (the old path goes in the next release)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = sys.modules[_new_name]
