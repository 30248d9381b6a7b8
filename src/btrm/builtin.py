"""Built-in stand-ins that need no network: `tiny:<family>` models, `synthetic:<n>` preference pairs and
`synthetic-groups:<n>` rated groups of 4 responses.

They make the quickstart and tests self-contained. The real loading code (Hub ids, local paths) is unchanged:
a built-in reference is materialised once into `data.cache_dir` and then loaded from that local path.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from btrm.config import Config

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
SYNTHETIC_PREFIX = "synthetic:"
GROUPS_PREFIX = "synthetic-groups:"


def resolve_builtins(cfg: Config, is_main: bool, barrier) -> Config:
    """Config with built-in references replaced by materialised local paths (rank 0 builds, others wait)."""
    from btrm import tiny

    if not cfg.model.name_or_path.startswith(TINY_PREFIX) and not any(
            s.path.startswith((SYNTHETIC_PREFIX, GROUPS_PREFIX)) for s in cfg.data.sources + cfg.data.eval_sources):
        return cfg
    cfg = copy.deepcopy(cfg)
    root = Path(cfg.data.cache_dir) / "builtin" / f"v{tiny.BUILTIN_VERSION}"  # a new generator never reuses old files
    todo = []
    if cfg.model.name_or_path.startswith(TINY_PREFIX):
        family = cfg.model.name_or_path[len(TINY_PREFIX):]
        path = root / f"tiny-{family}"
        todo.append((path, lambda p=path, f=family: tiny.build_tiny_model(f, p)))
        cfg.model.name_or_path = str(path)
    for src in cfg.data.sources + cfg.data.eval_sources:
        if src.path.startswith(SYNTHETIC_PREFIX):
            spec = src.path[len(SYNTHETIC_PREFIX):]  # "<n>" or "<n>:<seed>"
            n, _, seed = spec.partition(":")
            path = root / f"synthetic-{n}-{seed or 0}.jsonl"
            todo.append((path, lambda p=path, n=int(n), s=int(seed or 0): tiny.write_preference_jsonl(p, n, s)))
            src.name = src.name or "synthetic"
            src.path = str(path)
        elif src.path.startswith(GROUPS_PREFIX):
            n, _, seed = src.path[len(GROUPS_PREFIX):].partition(":")
            path = root / f"synthetic-groups-{n}-{seed or 0}.jsonl"
            todo.append((path, lambda p=path, n=int(n), s=int(seed or 0): tiny.write_jsonl(
                p, tiny.make_group_rows(n, s))))
            src.name = src.name or "synthetic-groups"
            src.path = str(path)
    if is_main:
        for path, build in todo:
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                build(tmp)
                tmp.rename(path)
                log.info("built %s", path)
    barrier()
    return cfg
