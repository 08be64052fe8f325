"""How Table 1's stages run: in-process `lightning` commands, reused when done, rerun when their settings changed.

`run_stages` runs every stage of `table1_stages.build_stages` that is not done; a finished stage leaves
``DONE.json`` (timings and its `stage_fingerprints` entry) beside its outputs and is reused on a rerun, an
interrupted fit resumes from its ``last.ckpt``, and a stage whose fingerprint changed is retired
(`retire_stage`: moved aside, nothing deleted) and rerun, with every stage that loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules.fileio import write_json
from experiments.table1_stages import CALIBRATED_CKPT, Stage, checkpoint_path, stage_args, stage_inputs


def stage_fingerprints(stages: Sequence[Stage]) -> dict[str, str]:
    """A hash per stage of what decides its outputs: the contents of its config files, its overrides, what it
    loads and how it is scored, and the fingerprint of the stage it loads (so a refitted model retests).

    Run folders and W&B names are left out: the same stages under another ``--out`` have the same prints.
    """
    by_name = {s.name: s for s in stages}
    prints: dict[str, str] = {}

    def fingerprint(stage: Stage) -> str:
        if stage.name not in prints:
            digest = hashlib.sha256()
            for config in stage.configs:
                path = Path(config)
                digest.update(path.read_bytes() if path.is_file() else config.encode())
                digest.update(b"\0")
            for part in (*stage.overrides, stage.kind, str(stage.test_set), str(stage.checkpoint_file),
                         stage.threshold_rule):
                digest.update(part.encode() + b"\0")
            for name in stage_inputs(stage):
                if name in by_name:
                    digest.update(fingerprint(by_name[name]).encode())
            prints[stage.name] = digest.hexdigest()[:16]
        return prints[stage.name]

    for stage in stages:
        fingerprint(stage)
    return prints


def stage_done(stage: Stage, runs_dir: Path, eval_dir: Path, fingerprint: str | None = None) -> bool:
    """A stage is reused when its marker, resolved config and checkpoint (fit) or metrics (test) exist, and
    the marker's ``fingerprint`` (`stage_fingerprints`), where it has one, is ``fingerprint``."""
    run_dir = runs_dir / stage.name
    config_name = "config.yaml" if stage.kind == "fit" else f"config-{stage.kind}.yaml"
    if not (run_dir / "DONE.json").is_file() or not (run_dir / config_name).is_file():
        return False
    if fingerprint is not None and stage_changed(stage, runs_dir, fingerprint):
        return False
    if stage.kind == "fit":
        return checkpoint_path(runs_dir, stage.name).is_file()
    if stage.kind == "validate":
        return (runs_dir / str(stage.checkpoint_from) / "checkpoints" / CALIBRATED_CKPT).is_file()
    return (eval_dir / stage.name / "metrics.json").is_file()


def stage_changed(stage: Stage, runs_dir: Path, fingerprint: str) -> bool:
    """Whether the stage's finished run was made with other settings than ``fingerprint`` (False without a
    marker, or with a marker from before fingerprints were recorded)."""
    marker = runs_dir / stage.name / "DONE.json"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text()).get("fingerprint")
    return recorded is not None and recorded != fingerprint


def move_aside(source: Path, stamp: str | None = None) -> Path:
    """Moves ``source`` (a file or folder) to ``<name>.replaced-<UTC time>`` beside it (``-2``, ``-3``, ... when two
    replacements fall within one second): outputs that must not be reused are kept, never deleted."""
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = source.with_name(f"{source.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = source.with_name(f"{source.name}.replaced-{stamp}-{n}")
    os.replace(source, target)
    return target


def retire_stage(stage: Stage, runs_dir: Path, eval_dir: Path) -> list[Path]:
    """Moves a stage's earlier outputs (its run folder, a test's results, a calibration's checkpoint) aside
    (`move_aside`), so a rerun with new settings neither resumes nor reuses them and nothing is deleted. Returns
    where they went."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    sources = [runs_dir / stage.name]
    if stage.kind == "test":
        sources.append(eval_dir / stage.name)
    if stage.kind == "validate":
        sources.append(runs_dir / str(stage.checkpoint_from) / "checkpoints" / CALIBRATED_CKPT)
    return [move_aside(source, stamp) for source in sources if source.exists()]


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_stages(
    stages: Sequence[Stage],
    out_dir: Path,
    group: str,
    force: bool = False,
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """Runs every stage not already done, printing which runs and the ETA; returns per-stage timings.

    The ETA scales the remaining stages' estimates by how the finished ones compared with theirs.
    """
    from experiments import cli

    runs_dir, eval_dir = out_dir / "runs", out_dir / "eval"
    timings_path = out_dir / "timings.json"
    timings: dict[str, dict[str, Any]] = {}
    if timings_path.is_file():
        timings = json.loads(timings_path.read_text()).get("stages", {})
    start = time.perf_counter()
    spent_actual = spent_estimate = 0.0
    prints = stage_fingerprints(stages)
    for k, stage in enumerate(stages, 1):
        changed = stage_changed(stage, runs_dir, prints[stage.name])
        if changed or (force and (runs_dir / stage.name).exists()):  # a rerun, not a resume of the old fit
            moved = retire_stage(stage, runs_dir, eval_dir)
            why = "settings changed since it ran" if changed else "--force"
            log(f"[{k:2d}/{len(stages)}] {stage.kind:4s} {stage.name:24s} {why}: rerun "
                f"(earlier outputs kept as {', '.join(p.name for p in moved)})")
        remaining = [s for s in stages[k - 1 :] if force or not stage_done(s, runs_dir, eval_dir, prints[s.name])]
        ratio = spent_actual / spent_estimate if spent_estimate > 0 else 1.0
        eta = ratio * sum(s.estimate_s for s in remaining)
        elapsed = time.perf_counter() - start
        if not force and stage_done(stage, runs_dir, eval_dir, prints[stage.name]):
            log(f"[{k:2d}/{len(stages)}] {stage.kind:4s} {stage.name:24s} reused ({runs_dir / stage.name})")
            timings.setdefault(stage.name, {"reused": True})  # keep the measured entry of the run that made it
            continue
        log(
            f"[{k:2d}/{len(stages)}] {stage.kind:4s} {stage.name:24s} running  "
            f"elapsed {_fmt_duration(elapsed)}  ETA {_fmt_duration(eta)}"
        )
        args = stage_args(stage, runs_dir, eval_dir, group)
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            cli.run_cli(args)
        except SIGTERMException as err:  # a SystemExit without a code: not a finished stage, and no next one
            raise RuntimeError(f"stage {stage.name} {cli.STOPPED_BY_SIGTERM}; not marked done, the same command "
                               "resumes it") from err
        except SystemExit as err:  # a config error: jsonargparse already printed the key at fault
            if err.code not in (0, None):
                raise RuntimeError(f"stage {stage.name} failed: lightning {' '.join(args)}") from err
        except ValueError as err:  # a refused value, e.g. a calibrated rule on a model without a threshold
            raise RuntimeError(f"stage {stage.name} failed: {err}") from err
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        spent_actual += seconds
        spent_estimate += stage.estimate_s
        timings[stage.name] = {"kind": stage.kind, "model": stage.model, "test_set": stage.test_set,
                               "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                               "estimate_s": stage.estimate_s, "reused": False}
        write_json(runs_dir / stage.name / "DONE.json", {**timings[stage.name], "fingerprint": prints[stage.name]})
        write_timings(timings_path, timings)
        log(f"        {stage.name} done in {_fmt_duration(seconds)}")
    write_timings(timings_path, timings)
    return timings


def write_timings(path: Path, timings: Mapping[str, Mapping[str, Any]]) -> None:
    """``timings.json``: wall and CPU seconds per stage (the latest run of each) and their totals.

    CPU seconds (this process, all threads) tell a run slowed by other jobs on the machine from a slow stage.
    """
    total = sum(float(t.get("seconds", 0.0)) for t in timings.values())
    cpu = sum(float(t.get("cpu_seconds", 0.0)) for t in timings.values())
    payload = {"stages": dict(timings), "total_seconds": round(total, 2), "total_cpu_seconds": round(cpu, 2),
               "cpu_count": os.cpu_count()}
    write_json(path, payload)
