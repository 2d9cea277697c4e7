#!/usr/bin/env python
"""`python scripts/eval_knn.py --model M --dataset_name D [--k 20 --temperature 0.07]` (hf_dino.commands.eval_knn)."""

from hf_dino.commands.eval_knn import main

if __name__ == "__main__":
    main()
