#!/usr/bin/env python
"""`python scripts/convert_dino_checkpoint.py --help` (hf_dino.commands.convert_dino_checkpoint)."""

from hf_dino.commands.convert_dino_checkpoint import main

if __name__ == "__main__":
    main()
