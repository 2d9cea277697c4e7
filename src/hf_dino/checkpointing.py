"""Checkpoints of a pretraining run: write (atomically), rotate, find and restore.

`OUTPUT_DIR/checkpoint-STEP/` holds Accelerate's state (student, optimizer, scaler, RNG, sampler
position), `teacher.safetensors`, `dino_loss.safetensors` (the centre), `trainer_state.json`
(step, epoch, batches of the epoch consumed, counters), `process_state-rankR.json` (each process's
position in a streamed dataset) and `teacher_backbone/` (a transformers model folder). It is written to
`checkpoint-STEP.tmp` and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEACHER_FILE = "teacher.safetensors"
LOSS_STATE_FILE = "dino_loss.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
PROCESS_STATE_FILE = "process_state-rank{rank}.json"


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete `checkpoint-STEP` folder, as transformers' `get_last_checkpoint` finds it
    (the `checkpoint-STEP.tmp` folder of an interrupted write does not match its pattern)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(output_dir).is_dir():
        return None
    latest = get_last_checkpoint(str(output_dir))
    return Path(latest) if latest else None


def save_checkpoint(accelerator, output_dir: Path, step: int, teacher: nn.Module, dino_loss: nn.Module,
                    trainer_state: dict[str, Any], recipe, pusher=None, process_state: dict | None = None) -> Path:
    """Write `output_dir/checkpoint-STEP/` atomically (into `checkpoint-STEP.tmp`, then renamed) and
    keep the newest `recipe.save_total_limit`. `teacher`: a plain (unsharded) model on the main
    process; `trainer_state`: JSON-serialisable, written as `trainer_state.json`; `process_state`:
    this process's own (JSON-serialisable, e.g. its position in a streamed dataset), written by
    every process as `process_state-rankR.json`; `pusher`: uploads the checkpoint's
    `teacher_backbone/` (main process). Collective: every process must call it."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    if process_state is not None:
        (temporary / PROCESS_STATE_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(process_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(temporary / TEACHER_FILE))
        save_file(dino_loss.state_dict(), str(temporary / LOSS_STATE_FILE))
        (temporary / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))
        # the teacher backbone as a transformers folder: AutoModel.from_pretrained loads it, and it is
        # pushed to the Hub as is
        from .hub import save_teacher_backbone

        save_teacher_backbone(teacher, temporary / "teacher_backbone", recipe, {"global_step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if pusher is not None:
            pusher.push(final / "teacher_backbone", f"DINO teacher backbone, step {step}")
        rotate_checkpoints(output_dir, recipe.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest `limit` complete checkpoints (none when `limit` is unset or 0)."""
    if not limit:
        return
    checkpoints = sorted((p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
                          if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                         key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(checkpoint: str, output_dir: Path) -> Path | None:
    """The folder `--resume_from_checkpoint` names: a path, or the newest in `output_dir` for
    "latest" (None, with a warning, when there is none yet: the run starts from scratch)."""
    if checkpoint != "latest":
        return Path(checkpoint)
    path = find_latest_checkpoint(output_dir)
    if path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", output_dir)
    return path


def load_checkpoint(accelerator, path: Path, teacher: nn.Module, dino_loss: nn.Module,
                    teacher_is_sharded: bool = False) -> dict[str, Any]:
    """Restore student, optimizer and RNG (Accelerate's state), the teacher and the centre from
    `path`; returns its trainer state. A sharded (FSDP2) teacher is restored by Accelerate's state
    with the student's shards."""
    if not (path / TRAINER_STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete hf_dino checkpoint (no {TRAINER_STATE_FILE}).")
    accelerator.load_state(str(path))
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # safetensors' spelling
    if not teacher_is_sharded:
        teacher.load_state_dict(load_file(str(path / TEACHER_FILE), device=device))
    dino_loss.load_state_dict(load_file(str(path / LOSS_STATE_FILE), device=device))
    logger.info("Resumed from %s", path)
    return json.loads((path / TRAINER_STATE_FILE).read_text())


def load_process_state(path: Path, process_index: int, num_processes: int) -> dict | None:
    """This process's `process_state-rankR.json` of checkpoint `path`, or None when the checkpoint has
    none; a checkpoint written by another number of processes is a ValueError."""
    written = len(list(path.glob(PROCESS_STATE_FILE.format(rank="*"))))
    if written == 0:
        return None
    if written != num_processes:
        raise ValueError(f"{path} was written by {written} processes, this run has {num_processes}: resume a "
                         f"streamed run with the same number of processes (its stream is split by process)")
    return json.loads((path / PROCESS_STATE_FILE.format(rank=process_index)).read_text())


def save_final_outputs(output_dir: Path, teacher: nn.Module, results: dict[str, Any], recipe, pusher=None) -> None:
    """The outputs of a finished run (main process): `dino/` (student-format `DinoModel`: backbone and
    head), `teacher_backbone/` (transformers model folder with processor and card, pushed to the Hub
    with `pusher`, whose uploads are awaited) and `results.json` (`results`, plus the push outcome)."""
    from .hub import save_teacher_backbone

    teacher.save_pretrained(output_dir / "dino")
    backbone_dir = save_teacher_backbone(teacher, output_dir / "teacher_backbone", recipe, results)
    if pusher is not None:
        pusher.push(backbone_dir, f"DINO teacher backbone, step {results['global_step']} (final)")
        results["push"] = pusher.wait()  # waits for the checkpoints' uploads too
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
