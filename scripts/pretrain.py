#!/usr/bin/env python
"""`accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--FIELD VALUE ...]` (hf_dino.commands.pretrain)."""

from hf_dino.commands.pretrain import main

if __name__ == "__main__":
    main()
