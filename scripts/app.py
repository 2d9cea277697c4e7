#!/usr/bin/env python
from hf_dino.commands.app import main

if __name__ == "__main__":
    main()
