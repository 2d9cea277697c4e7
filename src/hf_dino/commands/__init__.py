"""The command-line programs: one module per command, each with `main(argv=None)`.

`scripts/NAME.py` and the console script `hf-dino-NAME` (pyproject's `[project.scripts]`) both
call `hf_dino.commands.NAME.main`. Arguments are dataclasses parsed by `hf_dino.cli.parse_args`.
"""
