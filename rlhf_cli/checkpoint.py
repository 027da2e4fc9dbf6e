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

import json
import os
import platform
import random
import re
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.schema import UserError

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
def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def atomic_folder(target: Path):
    """Yield a temporary folder beside `target`; on success mark it COMPLETE and rename it to
    `target` (replacing an older one); on failure remove it and leave `target` untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


# ---------------------------------------------------------------- adapters
def save_adapter(model, folder: Path, adapter_name: str = "default") -> None:
    """One named LoRA adapter as PEFT's own files (loadable by `PeftModel.from_pretrained`)."""
    from peft import get_peft_model_state_dict

    # a resized vocabulary (an added pad token) is not saved: loaders resize from the tokenizer
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS)
    )
    model.peft_config[adapter_name].save_pretrained(str(folder))


def save_adapters(model, folder: Path, adapters: dict[str, str] | None = None) -> None:
    """Several named adapters, each in its sub-folder ("." = the folder itself)."""
    for sub, name in (adapters or {".": "default"}).items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_adapter(model, folder / sub, name)


def load_adapter_weights(model, folder: Path, adapter_name: str = "default") -> None:
    from peft import set_peft_model_state_dict

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
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(folder / head_file(name)))


def load_heads(folder: Path, heads: dict[str, torch.nn.Module]) -> None:
    for name, head in heads.items():
        path = folder / head_file(name)
        if not path.is_file():
            raise UserError(
                f"{folder} has no {head_file(name)}; it was not saved by a stage with a {name}."
            )
        head.load_state_dict(load_file(str(path)))


# ---------------------------------------------------------------- resume checkpoints
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
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
    root = Path(output_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    with atomic_folder(target) as tmp:
        save_adapters(model, tmp, adapters)
        save_heads(tmp, heads or {})
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "progress": progress,
                "config": json.dumps(config or {}),
            },
            tmp / TRAINER_STATE,
        )
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    if config is not None:
        check_resume_config(json.loads(state.get("config", "{}")), config, folder)
    for sub, name in (adapters or {".": "default"}).items():
        load_adapter_weights(model, folder / sub, name)
    load_heads(folder, heads or {})
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]


# Keys a resumed run may change: where and how it reports, and how long it trains.
RESUMABLE_CHANGES = (
    "output_dir", "resume", "overwrite", "device", "logger.", "samples.", "train.log_every",
    "train.eval_every", "train.save_every", "train.keep_last", "train.max_steps", "train.epochs",
)  # fmt: skip


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {
            k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: node}


def check_resume_config(saved: dict, current: dict, folder: Path) -> None:
    """Refuse to resume with settings that would train differently from the interrupted run."""
    old, new = _flat(saved), _flat(current)
    changed = [
        key
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        diffs = ", ".join(f"{k}={old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
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


def refuse_finished_run(output_dir: str, overwrite: bool) -> None:
    """A training stage's final/ or an evaluation's eval.json marks a finished run."""
    done = next((name for name in (FINAL, EVAL_FILE) if (Path(output_dir) / name).exists()), None)
    if done and not overwrite:
        shown = f"{done}/" if done == FINAL else done
        raise UserError(
            f"output_dir={output_dir} already holds a finished run ({shown}); pick another output_dir "
            "or pass overwrite=true to replace it."
        )


def prepare_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> Path | None:
    """Check the output folder before any work; return the checkpoint to resume from (or None).

    A folder holding a finished run (final/) is refused unless overwrite=true; resume=auto picks the
    newest complete checkpoint; resume=PATH must be a complete checkpoint."""
    out = Path(output_dir)
    refuse_finished_run(output_dir, overwrite)
    if overwrite and (out / FINAL).exists():
        # replacing a finished run: its resume state goes now; its final/ is kept as final.previous/
        # until the new final/ is written, and the new run can itself be resumed after a crash
        shutil.rmtree(out / PREVIOUS_FINAL, ignore_errors=True)
        os.replace(out / FINAL, out / PREVIOUS_FINAL)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
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
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file() or not is_complete(path):
        raise UserError(
            f"resume={resume} is not a complete resume checkpoint (a checkpoints/step-NNNNNN folder "
            "with a COMPLETE marker); use resume=auto or resume=false."
        )
    return path


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
    target = Path(output_dir) / FINAL
    with atomic_folder(target) as tmp:
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
    shutil.rmtree(Path(output_dir) / PREVIOUS_FINAL, ignore_errors=True)
    return target


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} is not a finished rlhf checkpoint (no {MANIFEST}); point at a run's final/ folder."
        )
    return json.loads(path.read_text())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


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
    manifest = read_manifest(path)
    if manifest.get("stage") not in allowed:
        raw_base = f" (or from the raw base with {key}=null)" if key.endswith("init_from") else ""
        raise UserError(
            f"{key}={init_from} is a {manifest.get('stage')} checkpoint, but rlhf {stage} starts from "
            f"{' or '.join(allowed)} there{raw_base}."
        )
    return manifest
