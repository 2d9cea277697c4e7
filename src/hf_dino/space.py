"""Moved to `hf_dino.demo.space`. This import path still works for one release, with a FutureWarning."""

import sys
import warnings

from .demo.space import __name__ as _new_name

warnings.warn("hf_dino.space moved to hf_dino.demo.space; import it from there (the old path goes in the next release)",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = sys.modules[_new_name]
