#!/usr/bin/env python
"""`python scripts/eval_linear.py --model M --dataset_name D ...` (hf_dino.commands.eval_linear)."""

from hf_dino.commands.eval_linear import main

if __name__ == "__main__":
    main()
