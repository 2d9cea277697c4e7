#!/usr/bin/env python
from hf_dino.commands.eval_image_retrieval import main

if __name__ == "__main__":
    main()
