#!/usr/bin/env python
"""`python scripts/plot_metrics.py --help` (hf_dino.commands.plot_metrics)."""

from hf_dino.commands.plot_metrics import main

if __name__ == "__main__":
    main()
