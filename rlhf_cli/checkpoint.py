"""The only code that knows the on-disk layout of a run.

    <output_dir>/
      .hydra/                    Hydra's composed config and overrides
      checkpoints/step-000200/   resume state: adapter, optimizer, scheduler, RNG, data position
      final/                     adapter (safetensors) + tokenizer + rlhf_stage.json
      metrics.jsonl

Every folder is written under a temporary name, its files fsync'ed, a COMPLETE marker added, and
then renamed into place, so a crash never leaves a half-written checkpoint under a real name. A
checkpoint folder without the marker is ignored on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_cli.files import fsync, kill_point
from rlhf_cli.schema import UserError

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so that the CLI's
    import torch  # checks of output folders (cli.validate) import no model library

CHECKPOINTS = "checkpoints"
FINAL = "final"
PREVIOUS_FINAL = "final.previous"
EVAL_FILE = "eval.json"  # what `rlhf eval` writes into its output_dir
MANIFEST = "rlhf_stage.json"
COMPLETE = "COMPLETE"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------- atomic folders
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _index(folder: Path, sync: bool = True) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in `folder`, each fsync'ed on the way
    (unless sync=False: reading a finished folder)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            if sync:
                fsync(path)
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def discard(path: Path) -> None:
    """Remove a folder so that no half-deleted copy is ever left under its real name: rename it
    to a hidden name first (atomic), then delete."""
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class WriteError(Exception):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


@contextmanager
def atomic_folder(target: Path):
    """Yield a temporary folder beside `target`; on success write the COMPLETE marker (the index:
    every file's size and sha256), fsync, and rename it to `target` (replacing an older one); on
    failure remove it and leave `target` untouched. An OSError while writing (a full disk, a
    permission) becomes `WriteError`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = "final" if target.name == FINAL else "checkpoint"  # the kill points' names
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        kill_point(f"{kind}-files")
        index = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": _index(tmp)}
        (tmp / COMPLETE).write_text(json.dumps(index, indent=1))
        fsync(tmp / COMPLETE)
        fsync(tmp)
        kill_point(f"{kind}-marked")
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            kill_point(f"{kind}-swap")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync(target.parent)
    except OSError as err:
        raise WriteError(f"could not write {target} ({err.strerror or err})") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def damage(folder: Path) -> str | None:
    """What is wrong with a folder written by `atomic_folder` (no marker, a file missing, a size or
    checksum that differs from its index), or None when it is intact. A marker from before the
    index existed (a bare timestamp) counts as intact."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (it was never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return None
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{rel} differs from its checksum"
    return None


def content_id(folder: Path) -> str:
    """A sha256 of what a folder holds (every file's path and content): two folders with the
    same id hold the same adapter, head and settings."""
    files = _index(Path(folder), sync=False)
    files.pop(COMPLETE, None)  # the marker holds a write time
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def recover_interrupted_writes(folder: Path) -> None:
    """Tidy what a killed process left in `folder`: a target it had moved aside to replace
    (.old-NAME-PID) goes back when the new copy never landed; leftover temporary and trash
    folders of processes that are gone are deleted."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        m = re.match(r"^\.(tmp|old|trash)-(.+)-(\d+)$", path.name)
        if not m or _alive(int(m.group(3))):
            continue
        kind, name = m.group(1), m.group(2)
        if kind == "old" and not (folder / name).exists():
            os.replace(path, folder / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- adapters
def write_bytes(path: Path, content: bytes) -> None:
    """Every weight and state file goes through Python's own file I/O, so that a full disk or a
    permission problem surfaces as an OSError (which `atomic_folder` turns into `WriteError`)."""
    with path.open("wb") as handle:
        handle.write(content)


def write_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save as tensors_to_bytes

    write_bytes(
        path, tensors_to_bytes({k: v.detach().cpu().contiguous() for k, v in state.items()})
    )


def save_adapter(model, folder: Path, adapter_name: str = "default") -> None:
    """One named LoRA adapter as PEFT's own files (loadable by `PeftModel.from_pretrained`)."""
    from peft import get_peft_model_state_dict

    # a resized vocabulary (an added pad token) is not saved: loaders resize from the tokenizer
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    write_tensors(folder / ADAPTER_WEIGHTS, state)
    model.peft_config[adapter_name].save_pretrained(str(folder))


def save_adapters(model, folder: Path, adapters: dict[str, str] | None = None) -> None:
    """Several named adapters, each in its sub-folder ("." = the folder itself)."""
    for sub, name in (adapters or {".": "default"}).items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_adapter(model, folder / sub, name)


def load_adapter_weights(model, folder: Path, adapter_name: str = "default") -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(folder / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(
            f"the adapter in {folder} does not fit this model ({len(unexpected)} unexpected tensors)."
        )


def head_file(name: str) -> str:
    return f"{name}.safetensors"


def save_heads(folder: Path, heads: dict[str, torch.nn.Module]) -> None:
    """Each scalar head as <name>.safetensors beside the adapter."""
    for name, head in heads.items():
        write_tensors(folder / head_file(name), head.state_dict())


def load_heads(folder: Path, heads: dict[str, torch.nn.Module]) -> None:
    from safetensors.torch import load_file

    for name, head in heads.items():
        path = folder / head_file(name)
        if not path.is_file():
            raise UserError(
                f"{folder} has no {head_file(name)}; it was not saved by a stage with a {name}."
            )
        head.load_state_dict(load_file(str(path)))


# ---------------------------------------------------------------- resume checkpoints
def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str,
    step: int,
    model,
    optimizer,
    scheduler,
    progress: dict,
    keep_last: int,
    heads: dict[str, torch.nn.Module] | None = None,
    config: dict | None = None,
    adapters: dict[str, str] | None = None,
) -> Path:
    """A resume checkpoint at `step` (with the run's config, checked on resume); older ones beyond
    `keep_last` are deleted afterwards. `adapters` maps sub-folders to adapter names (default: the
    adapter "default" at the top)."""
    from rlhf_cli import distributed

    root = Path(output_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    rngs = distributed.gather_objects(rng_state())  # every process's random state
    if distributed.is_main():  # rank 0 writes for all; the others wait until it is done
        _write_checkpoint(output_dir, target, model, optimizer, scheduler, progress, keep_last,
                          heads, config, adapters, rngs)  # fmt: skip
    distributed.barrier()
    return target


def _write_checkpoint(
    output_dir, target, model, optimizer, scheduler, progress, keep_last, heads, config, adapters,
    rngs,
) -> None:  # fmt: skip
    import torch

    with _say_what_is_intact(output_dir), atomic_folder(target) as tmp:
        save_adapters(model, tmp, adapters)
        save_heads(tmp, heads or {})
        buffer = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs,  # one state per process (rank order)
                "progress": progress,
                "config": json.dumps(config or {}),
            },
            buffer,
        )
        write_bytes(tmp / TRAINER_STATE, buffer.getvalue())
    kill_point("checkpoint-saved")
    for old in list_checkpoints(output_dir)[:-keep_last]:
        discard(old)


def load_checkpoint(
    folder: Path,
    model,
    optimizer,
    scheduler,
    heads: dict[str, torch.nn.Module] | None = None,
    config: dict | None = None,
    adapters: dict[str, str] | None = None,
) -> dict:
    """Restore adapters, heads, optimizer, scheduler and RNG from `folder` after checking that
    `config` trains the same way as the checkpoint's; return its progress dict."""
    import torch

    from rlhf_cli import distributed

    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    if config is not None:
        check_resume_config(json.loads(state.get("config", "{}")), config, folder)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process
    if len(rngs) != distributed.world():
        raise UserError(
            f"cannot resume from {folder}: it was saved by {len(rngs)} process(es), and this run has "
            f"{distributed.world()}; resume with the same number of processes."
        )
    for sub, name in (adapters or {".": "default"}).items():
        load_adapter_weights(model, folder / sub, name)
    load_heads(folder, heads or {})
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:  # e.g. PPO's optimizer gained a group for the value (value.lr)
        raise UserError(
            f"cannot resume from {folder}: its optimizer state does not fit this version's "
            "optimizer (it was written by an earlier version of rlhf); start afresh with "
            "resume=false or another output_dir."
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rngs[distributed.rank()])
    return state["progress"]


# Keys a resumed run may change: where and how it reports (including the metric it returns to a
# sweeper), and how long it trains.
RESUMABLE_CHANGES = (
    "output_dir", "resume", "overwrite", "device", "logger.", "samples.", "train.log_every",
    "train.eval_every", "train.save_every", "train.keep_last", "train.max_steps", "train.epochs",
    "train.max_nonfinite", "objective.", "model.gradient_checkpointing",
)  # fmt: skip


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {
            k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: node}


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """The settings that would make a run train differently from a saved one: dotted key ->
    (saved value, current value), in key order."""
    old, new = _flat(saved), _flat(current)
    # a key only one side has came or went with a version of rlhf: the saved run trained
    # without it, as this version does with its default (its settings were checked then)
    return {
        key: (old[key], new[key])
        for key in sorted(set(old) & set(new))
        if old[key] != new[key] and not key.startswith(RESUMABLE_CHANGES)
    }


def check_resume_config(saved: dict, current: dict, folder: Path) -> None:
    """Refuse to resume with settings that would train differently from the interrupted run."""
    changed = list(config_changes(saved, current).items())
    if changed:
        diffs = ", ".join(f"{k}={was!r} -> {now!r}" for k, (was, now) in changed[:3])
        raise UserError(
            f"cannot resume from {folder}: the run changed {diffs}; resume with the settings it was started "
            "with, or start afresh with resume=false or another output_dir."
        )


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete resume checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    ]
    return [p for _, p in sorted(found)]


def finished(folder: Path) -> str | None:
    """What marks `folder` as a finished run: a training stage's final/ or an evaluation's
    eval.json (None when neither is there)."""
    return next((name for name in (FINAL, EVAL_FILE) if (folder / name).exists()), None)


def finished_result(folder: Path) -> tuple[dict, dict] | None:
    """(config, final metrics) of the intact finished run in `folder`, or None."""
    done = finished(folder)
    if done == FINAL and damage(folder / FINAL) is None:
        manifest = read_json(folder / FINAL / MANIFEST)
        return manifest["config"], manifest["final_metrics"]
    if done == EVAL_FILE:
        result = read_json(folder / EVAL_FILE)
        return result["config"], result["metrics"]
    return None


def refuse_finished_run(output_dir: str, overwrite: bool) -> None:
    done = finished(Path(output_dir))
    if done and not overwrite:
        shown = f"{done}/" if done == FINAL else done
        raise UserError(
            f"output_dir={output_dir} already holds a finished run ({shown}); pick another output_dir "
            "or pass overwrite=true to replace it."
        )


def refuse_finished_sweep(output_dir: str, overwrite: bool, jobs: int) -> None:
    """A sweep's jobs write <output_dir>/0, 1, ...: refuse to run one whose jobs have all finished."""
    done = [n for n in range(jobs) if finished(Path(output_dir) / str(n))]
    if jobs and len(done) == jobs and not overwrite:
        raise UserError(
            f"output_dir={output_dir} already holds this sweep's {jobs} finished jobs (0/ to {jobs - 1}/); "
            "pick another output_dir or pass overwrite=true to run them again."
        )


def remove_if_unused(output_dir: str) -> None:
    """After bad input: delete the run folder when it holds nothing but Hydra's .hydra/ record."""
    out = Path(output_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra"}:
        shutil.rmtree(out, ignore_errors=True)


def check_can_create(output_dir: str) -> None:
    """Before anything is written (Hydra creates the folder first): the nearest existing folder on
    the way to `output_dir` must be a folder we can write to."""
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(
            f"output_dir={output_dir} cannot be created: {existing} is a file; choose a folder path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"output_dir={output_dir} is not writable ({existing} does not allow it); choose a folder "
            "you can write to."
        )


def prepare_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> Path | None:
    """Check the output folder before any work; return the checkpoint to resume from (or None).

    A folder holding a finished run (final/) is refused unless overwrite=true; resume=auto picks the
    newest complete checkpoint; resume=PATH must be a complete checkpoint."""
    out = Path(output_dir)
    refuse_finished_run(output_dir, overwrite)
    recover_interrupted_writes(out)
    recover_interrupted_writes(out / CHECKPOINTS)
    if overwrite and (out / FINAL).exists():
        # replacing a finished run: its resume state goes now; its final/ is kept as final.previous/
        # until the new final/ is written, and the new run can itself be resumed after a crash
        discard(out / PREVIOUS_FINAL)
        os.replace(out / FINAL, out / PREVIOUS_FINAL)
        discard(out / CHECKPOINTS)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"output_dir={output_dir} is not writable ({err.strerror}); choose a folder you can write to."
        ) from None
    if resume is None:
        return None
    if resume == "auto":
        return newest_intact_checkpoint(output_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file() or not is_complete(path):
        raise UserError(
            f"resume={resume} is not a complete resume checkpoint (a checkpoints/step-NNNNNN folder "
            "with a COMPLETE marker); use resume=auto or resume=false."
        )
    if problem := damage(path):
        raise UserError(f"resume={resume} is damaged ({problem}); use resume=auto or resume=false.")
    return path


def newest_intact_checkpoint(output_dir: str) -> Path | None:
    """resume=auto: the newest complete checkpoint whose files match their checksums; damaged ones
    are reported and passed over."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = damage(folder)
        if problem is None:
            return folder
        print(f"skipping damaged checkpoint {folder} ({problem})", file=sys.stderr, flush=True)
    return None


def latest_checkpoint(output_dir: str) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def what_is_intact(output_dir: str) -> str:
    """After a failed write: which resume state survived it, as a clause of the error sentence."""
    previous = latest_checkpoint(output_dir)
    return f"the previous checkpoint {previous} is intact" if previous else "no checkpoint yet"


@contextmanager
def _say_what_is_intact(output_dir: str):
    """Add to a `WriteError` which earlier state survived it (known before the write begins)."""
    kept = what_is_intact(output_dir)
    try:
        yield
    except WriteError as err:
        raise WriteError(f"{err}; {kept}") from err.__cause__


# ---------------------------------------------------------------- final/ and its manifest
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in (
        "rlhf-cli",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "hydra-core",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_final(
    output_dir: str,
    model,
    tokenizer,
    manifest: dict,
    extra_files: dict[str, Any] | None = None,
    heads: dict[str, torch.nn.Module] | None = None,
    adapters: dict[str, str] | None = None,
) -> Path:
    """final/: the adapter(s) (`adapters`: sub-folder -> adapter name; the top one is what the next
    stage starts from), scalar heads, the tokenizer, rlhf_stage.json and
    extra JSON files, atomically."""
    from rlhf_cli import distributed

    target = Path(output_dir) / FINAL
    if distributed.is_main():  # rank 0 writes for all; the others wait until it is done
        _write_final(output_dir, target, model, tokenizer, manifest, extra_files, heads, adapters)
    distributed.barrier()
    return target


def _write_final(output_dir, target, model, tokenizer, manifest, extra_files, heads, adapters):
    with _say_what_is_intact(output_dir), atomic_folder(target) as tmp:
        save_adapters(model, tmp, adapters)
        save_heads(tmp, heads or {})
        tokenizer.save_pretrained(str(tmp))
        manifest = {
            **manifest,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    discard(Path(output_dir) / PREVIOUS_FINAL)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} is not a finished rlhf checkpoint (no {MANIFEST}); point at a run's final/ folder."
        )
    return json.loads(path.read_text())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def check_parent(
    init_from: str, stage: str, allowed: tuple[str, ...], key: str = "init_from"
) -> dict:
    """The manifest of the checkpoint a stage starts from, after checking it is a finished checkpoint
    of an allowed kind; one sentence otherwise."""
    path = Path(init_from)
    if not path.exists():
        raise UserError(
            f"{key}={init_from} does not exist; point it at a finished run's final/ folder."
        )
    if not (path / MANIFEST).is_file() and (path / FINAL / MANIFEST).is_file():
        raise UserError(
            f"{key}={init_from} is a run folder; use its final/ folder: {key}={path / FINAL}."
        )
    if not is_complete(path) or not (path / MANIFEST).is_file():
        raise UserError(
            f"{key}={init_from} is not a complete rlhf checkpoint (no {MANIFEST} or {COMPLETE} marker: "
            "a half-written or foreign folder); point it at a finished run's final/ folder."
        )
    if problem := damage(path):
        raise UserError(f"{key}={init_from} is damaged ({problem}); retrain it or restore a copy.")
    manifest = read_manifest(path)
    if manifest.get("stage") not in allowed:
        raw_base = f" (or from the raw base with {key}=null)" if key.endswith("init_from") else ""
        raise UserError(
            f"{key}={init_from} is a {manifest.get('stage')} checkpoint, but rlhf {stage} starts from "
            f"{' or '.join(allowed)} there{raw_base}."
        )
    return manifest
