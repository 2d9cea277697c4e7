#!/usr/bin/env python
from hf_dino.commands.video_generation import main

if __name__ == "__main__":
    main()
