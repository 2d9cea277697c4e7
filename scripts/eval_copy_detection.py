#!/usr/bin/env python
from hf_dino.commands.eval_copy_detection import main

if __name__ == "__main__":
    main()
