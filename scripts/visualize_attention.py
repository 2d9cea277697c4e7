#!/usr/bin/env python
"""`python scripts/visualize_attention.py --help` (hf_dino.commands.visualize_attention)."""

from hf_dino.commands.visualize_attention import main

if __name__ == "__main__":
    main()
