#!/usr/bin/env python
from hf_dino.commands.eval_attention_segmentation import main

if __name__ == "__main__":
    main()
