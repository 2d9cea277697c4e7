"""Every command line in README.md and docs/*.md is parsed by the command's real parser, so a
documented command can never fail to parse again (values are checked too; files are not read).

Documentation conventions the extraction understands: fenced shell blocks and inline code
spans; `\\` continuations; `# comments`; `[--optional flags]` (tested with them); `{a,b}`
alternatives (each tested); shell variables assigned earlier in the same block (`R="..."`)."""

import importlib
import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest

from hf_dino import cli

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(?:scripts/(\w+)\.py|hf-dino-([\w-]+))(?=\s|$)")


class Parsed(Exception):
    """Raised by the patched parse_args: parsing succeeded, the command stops there."""


def shell_lines(text: str):
    """(line, variables, inline) for each logical line of each fenced block and each inline code
    span (an inline span naming a script without arguments is a reference, not a command)."""
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):  # every block, in order
        if language not in ("", "bash", "sh", "shell", "console"):
            continue
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].split("\t#")[0].strip()
            assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
            if assignment:
                variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
            elif line and not line.startswith("#"):
                yield line, variables, False
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        yield " ".join(span.split()), {}, True


def documented_commands():
    found = []
    for document in DOCUMENTS:
        for line, variables, inline in shell_lines(document.read_text()):
            for variable, value in variables.items():
                line = line.replace(f"${variable}", value).replace(f"${{{variable}}}", value)
            for piece in re.split(r"&&|;|\|", line):
                match = COMMAND.search(piece)
                if not match:
                    continue
                name = match[1] or match[2].replace("-", "_")
                arguments = piece[match.end():].strip()
                if inline and not arguments:
                    continue
                if "--help" in arguments or "..." in arguments or arguments.startswith(("--help", "`")):
                    continue
                for variant in expand(arguments):
                    found.append(pytest.param(name, variant, id=f"{document.name}:{name}:{variant[:60]}"))
    return found


def expand(arguments: str) -> list[str]:
    """Optional [..] kept (brackets dropped); each {a,b} alternative gives a variant."""
    arguments = re.sub(r"[\[\]]", " ", arguments)
    choices = re.findall(r"\{([^{}]+,[^{}]+)\}", arguments)
    variants = []
    for picked in itertools.product(*(choice.split(",") for choice in choices)) if choices else [()]:
        variant = arguments
        for choice, value in zip(choices, picked):
            variant = variant.replace("{" + choice + "}", value, 1)
        variants.append(" ".join(variant.split()))
    return variants


COMMANDS = documented_commands()


def test_the_documents_do_document_commands():
    names = {param.values[0] for param in COMMANDS}
    assert {"pretrain", "eval_knn", "eval_linear", "benchmark"} <= names, names


@pytest.mark.parametrize("name, arguments", COMMANDS)
def test_documented_command_parses(name, arguments, monkeypatch):
    if name == "benchmark":  # a checkout-only script (its harness is not in the library)
        spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"hf_dino.commands.{name}")
    real_parse_args = cli.parse_args

    def parse_then_stop(*args, **kwargs):
        real_parse_args(*args, **kwargs)
        raise Parsed

    monkeypatch.setattr(cli, "parse_args", parse_then_stop)
    if hasattr(module, "parse_args"):
        monkeypatch.setattr(module, "parse_args", parse_then_stop)
    argv = shlex.split(arguments)
    try:
        module.main(argv)
    except Parsed:
        return
    except SystemExit as error:
        pytest.fail(f"`{name} {arguments}` does not parse (exit {error.code})")
    pytest.fail(f"`{name} {arguments}` never reached its argument parser")
