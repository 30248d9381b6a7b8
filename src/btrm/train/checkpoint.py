"""Checkpoints: Hugging Face format (loadable with no btrm code) + DeepSpeed state + exact data position.

Layout of `<output_dir>/checkpoint-<step>/`:
  model.safetensors, config.json (num_labels 1, pad_token_id), tokenizer files with the chat template
  btrm_config.yaml   the resolved training config
  btrm_meta.json     render settings scoring must reuse (chat_template_kwargs) and the training max_length (shown)
  trainer_state.json step and data position
  rng/rank<r>.json   per-rank RNG states
  ds/                DeepSpeed model/optimizer/scheduler state
  COMPLETE           written last
A checkpoint is written to `.checkpoint-<step>.tmp` and renamed when complete, so a crash or kill mid-write
never touches the last good one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

DS_TAG = "state"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "COMPLETE").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete btrm checkpoint (no COMPLETE file)")
    return path


def rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(engine, hf_model, tokenizer, step: int, output_dir: str | Path, *, rank: int, barrier,
                    config_yaml: str, meta: dict, state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=False)
    (tmp / "rng" / f"rank{rank}.json").write_text(json.dumps(rng_state()))
    state_dict = gathered_state_dict(engine, rank)  # collective under ZeRO-3
    if rank == 0:
        hf_model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "btrm_config.yaml").write_text(config_yaml)
        (tmp / "btrm_meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    barrier()
    if rank == 0:
        _fsync_dir(tmp)
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():  # re-saving the same step (e.g. final after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def gathered_state_dict(engine, rank: int) -> dict | None:
    """Full HF-keyed state dict on rank 0, None elsewhere (16-bit gathered under ZeRO-3); keys without the wrapper
    prefix. Under ZeRO 0-2 every rank holds the full weights, so only rank 0 copies them to host memory (an 8B model
    is 16 GB per copy)."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
        if sd is None:
            return None
    elif rank != 0:
        return None
    else:
        sd = engine.module.state_dict()
    prefix = "rm."
    return {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().contiguous() for k, v in sd.items()}


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns trainer_state."""
    load_path, _ = engine.load_checkpoint(str(path / "ds"), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path / 'ds'}")
    rng_file = path / "rng" / f"rank{rank}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def clean_partial(output_dir: str | Path) -> None:
    """Remove leftovers of checkpoint writes that were interrupted."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
