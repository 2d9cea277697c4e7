#!/usr/bin/env python
from hf_dino.commands.plot_embeddings import main

if __name__ == "__main__":
    main()
