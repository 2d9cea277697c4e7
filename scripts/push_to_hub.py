#!/usr/bin/env python
"""`python scripts/push_to_hub.py OUTPUT_DIR --hub_model_id ORG/NAME` (hf_dino.commands.push_to_hub)."""

from hf_dino.commands.push_to_hub import main

if __name__ == "__main__":
    main()
