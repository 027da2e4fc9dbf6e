"""`rlhf export`: a finished run as a standalone transformers model.

    rlhf export from=runs/dpo/final output_dir=exports/dpo     # a policy -> <Arch>ForCausalLM
    rlhf export from=runs/rm/final output_dir=exports/rm       # a reward model -> ...ForSequenceClassification

1. Check `from` (a finished final/ folder), the output folder, and take the base model the
   checkpoint names.
2. Load that base unquantized at its own precision (`dtype=auto`), even when training ran on a
   4-bit base: merging into dequantized 4-bit weights bakes their rounding into the model.
3. Merge the LoRA adapter into it (W + B A x alpha / r), and for a reward model put its scalar
   head where transformers' sequence-classification models keep theirs (`score`, num_labels=1).
4. Write the folder whole or not at all (checkpoint.atomic_folder): safetensors shards, config,
   the tokenizer the run trained with (its chat template and pad token), the generation config
   (the run's stop tokens) and a model card with the lineage and the eval metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rlhf_cli import checkpoint, modeling
from rlhf_cli.gguf_export import check_gguf, write_gguf
from rlhf_cli.lineage import POLICY_STAGES, check_same_base, inherit_base_model
from rlhf_cli.loop import StopOnSignal
from rlhf_cli.rollout import stop_token_ids
from rlhf_cli.schema import ExportConfig, UserError
from rlhf_cli.scoring import HEAD
from rlhf_cli.tracking import make_console

EXPORT_MANIFEST = "rlhf_export.json"
HYDRA_RECORD = ".hydra"
# what the model card shows of each stage's settings, where the stage has them
CARD_SETTINGS = (
    "data.path", "optim.lr", "train.max_steps", "train.epochs", "train.batch_size",
    "train.grad_accum", "lora.r", "lora.alpha", "dpo.loss", "dpo.beta", "kto.loss", "kto.beta",
    "kto.desirable_weight", "kto.undesirable_weight", "reward.from", "reward.fns", "kl.coef",
    "kl.beta", "grpo.advantage", "grpo.group_size",
)  # fmt: skip


def train(config: ExportConfig, signals: StopOnSignal | None = None) -> dict[str, float]:
    console = make_console()
    # ------------------------------------------------------------ checks before any model loads
    source = Path(config.from_)
    manifest = checkpoint.check_parent(config.from_, "export", (*POLICY_STAGES, "reward"), "from")
    out = Path(config.output_dir)
    check_output_dir(out, config.overwrite)
    inherit_base_model(config, manifest, console, "from")
    tokenizer = modeling.load_tokenizer(config.model, path=str(source))  # as the run saved it
    check_same_base(config, manifest, tokenizer, config.from_, "from")
    evaluation = find_eval(config, source) if manifest["stage"] != "reward" else None
    device = modeling.resolve_device(config.device)
    dtype = base_dtype(config) if config.dtype == "auto" else getattr(torch, config.dtype)

    if config.format == "gguf" and manifest["stage"] == "reward":
        raise UserError(
            "format=gguf writes a policy (a causal LM) for llama.cpp; export a reward model with "
            "format=hf."
        )

    # ------------------------------------------------------------ merge
    model = merged_model(config, tokenizer, device, dtype, source)
    pre = None
    if config.format == "gguf":
        pre = check_gguf(model.config, tokenizer, manifest["base_model"], config.gguf.pre)
    state = None
    if manifest["stage"] == "reward":
        state = as_sequence_classifier(model, source, tokenizer)
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    kind = model.config.architectures[0]
    console.print(
        f"export: {source} ({manifest['stage']}) merged into {config.model.name_or_path} at "
        f"{str(dtype).removeprefix('torch.')} on {device} -> {kind}"
    )

    # ------------------------------------------------------------ write the folder whole
    record = {
        "source": str(source.resolve()),
        "stage": manifest["stage"],
        "base_model": manifest["base_model"],
        "dtype": str(dtype).removeprefix("torch."),
        "architecture": kind,
        "format": config.format,
        "gguf": {
            "file": f"{out.name}-{config.gguf.type}.gguf",
            "type": config.gguf.type,
            "pre": pre,
        }
        if pre
        else None,
        "score_bias": model.config.to_dict().get("rlhf_score_bias"),
        "eval": evaluation[0] if evaluation else None,
        "versions": checkpoint.package_versions(),
    }
    with checkpoint.atomic_folder(out) as tmp:
        if (out / HYDRA_RECORD).is_dir():  # this job's Hydra record stays with it
            shutil.copytree(out / HYDRA_RECORD, tmp / HYDRA_RECORD)
        if config.format == "gguf":
            gguf_file = tmp / record["gguf"]["file"]
            write_gguf(model, tokenizer, gguf_file, config.gguf.type, pre, out.name)
        else:
            model.save_pretrained(
                tmp, safe_serialization=True, max_shard_size=config.max_shard_size,
                state_dict=state,
            )  # fmt: skip
            if state is not None:  # save_pretrained names the class it was called on
                model.config.architectures = [kind]
                model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(manifest, source, record, evaluation))
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=1))
        for file in tmp.iterdir():  # safetensors writes its files private; a model is shared
            if file.is_file():
                file.chmod(0o644)
    if config.format == "gguf":
        written = out / record["gguf"]["file"]
        console.print(
            f"done: {written} ({written.stat().st_size / 2**20:,.0f} MiB, {config.gguf.type}, "
            f"pre-tokenizer {pre}); run it with llama.cpp (llama-cli -m {written}) or Ollama "
            f"(FROM {written.name} in a Modelfile)"
        )
        return {}
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    console.print(
        f"done: {kind}, {size:,.0f} MiB of safetensors in {out}; load it with "
        f"transformers.{'AutoModelForSequenceClassification' if state else 'AutoModelForCausalLM'}"
        f".from_pretrained({str(out)!r})"
    )
    return {}


# ---------------------------------------------------------------- checks
def check_output_dir(out: Path, overwrite: bool) -> None:
    """An export replaces only an earlier export, and only with overwrite=true; it never writes
    into a folder that holds anything else (a training run, someone's files)."""
    checkpoint.check_can_create(str(out))
    if not out.is_dir():
        return
    if (out / EXPORT_MANIFEST).is_file() and checkpoint.is_complete(out):
        if not overwrite:
            raise UserError(
                f"output_dir={out} already holds an export; pick another output_dir or pass "
                "overwrite=true to replace it."
            )
        return
    others = sorted(p.name for p in out.iterdir() if p.name != HYDRA_RECORD)
    if others:
        raise UserError(
            f"output_dir={out} already holds files that are not an rlhf export "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); pick a new or empty "
            "folder."
        )


def find_eval(config: ExportConfig, source: Path) -> tuple[str, dict] | None:
    """(path, eval.json) for the model card: `eval=` when given, else the newest eval.json in a
    folder beside the run's whose `policy` is this checkpoint (the demo's runs/demo/eval-dpo for
    runs/demo/dpo/final)."""
    if config.eval:
        path = Path(config.eval)
        path = path / checkpoint.EVAL_FILE if path.is_dir() else path
        if not path.is_file():
            raise UserError(
                f"eval={config.eval} is not an eval.json (nor a folder holding one); give the "
                "output of rlhf eval, or leave eval unset."
            )
        return str(path), checkpoint.read_json(path)
    target = source.resolve()
    found = []
    for path in target.parent.parent.glob(f"*/{checkpoint.EVAL_FILE}"):
        try:
            result = checkpoint.read_json(path)
        except (OSError, ValueError):
            continue
        policy = result.get("policy")
        if not policy:
            continue
        # a relative policy path was relative to where eval ran: here, or a folder above its own
        bases = [Path()] if Path(policy).is_absolute() else [Path.cwd(), *path.resolve().parents]
        if any((base / policy).resolve() == target for base in bases):
            found.append((path.stat().st_mtime, str(path), result))
    return max(found)[1:] if found else None


# ---------------------------------------------------------------- the model
def base_dtype(config: ExportConfig) -> torch.dtype:
    """The precision the base model's weights are stored in (its config's dtype; float32 when it
    names none)."""
    from transformers import AutoConfig

    path = modeling.resolve_model_path(config.model.name_or_path)
    base = AutoConfig.from_pretrained(
        path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    stored = getattr(base, "dtype", None) or getattr(base, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def merged_model(config: ExportConfig, tokenizer, device, dtype: torch.dtype, source: Path):
    """The base at `dtype`, unquantized, with the adapter in `source` merged into its weights."""
    from peft import PeftModel

    config.quant.mode = "none"
    config.quant.compute_dtype = str(dtype).removeprefix("torch.")
    base, _ = modeling.load_base_model(config, tokenizer, device)
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    return model.eval()


def as_sequence_classifier(model, source: Path, tokenizer) -> dict[str, torch.Tensor]:
    """Turn the merged causal LM's config into its <Arch>ForSequenceClassification with
    num_labels=1 and return the state dict to save: the backbone's weights, no LM head, and the
    reward head's weight as `score.weight`. transformers' classifier scores the last token that is
    not the pad token, as our scorer scores each row's last real token. Its `score` layer has no
    bias: a nonzero head bias (only reward.center_rewards_coefficient moves it) shifts every score
    by the same amount, changes no preference, and is recorded as `rlhf_score_bias`."""
    import transformers

    causal = model.config.architectures[0]
    name = causal.replace("ForCausalLM", "ForSequenceClassification")
    if name == causal or not hasattr(transformers, name):
        raise UserError(
            f"cannot export this reward model: transformers has no sequence-classification class "
            f"for {causal} (looked for {name}); export its policy stages instead."
        )
    head = modeling.ScalarHead(modeling.hidden_size(model))
    checkpoint.load_heads(source, {HEAD: head})
    weight = head.linear.weight.detach().to(model.dtype)
    bias = float(head.linear.bias.detach())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    state["score.weight"] = weight
    model.config.architectures = [name]
    model.config.num_labels = 1
    model.config.pad_token_id = tokenizer.pad_token_id
    if bias:
        model.config.rlhf_score_bias = bias
    return state


# ---------------------------------------------------------------- the model card
def lineage(source: Path) -> list[tuple[Path, dict]]:
    """(folder, manifest) of the checkpoint and each parent it names that still exists, oldest
    first."""
    chain, folder = [], source
    while folder is not None and (folder / checkpoint.MANIFEST).is_file():
        manifest = checkpoint.read_manifest(folder)
        chain.append((folder, manifest))
        parent = manifest.get("parent")
        folder = Path(parent["path"]) if parent else None
    return chain[::-1]


def _setting(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def model_card(
    manifest: dict, source: Path, record: dict, evaluation: tuple[str, dict] | None
) -> str:
    """README.md: what the model is, how it was trained (each stage's data, main settings and
    final metrics), how it scored, and how to load it."""
    base = manifest["base_model"]
    hub = "/" in base and not base.startswith(("/", ".", "~")) and not Path(base).exists()
    reward = manifest["stage"] == "reward"
    loader = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    lines = ["---"]
    if hub:
        lines.append(f"base_model: {base}")
    lines += [
        "library_name: transformers",
        f"pipeline_tag: {'text-classification' if reward else 'text-generation'}",
        f"tags: [rlhf, {manifest['stage']}, lora-merged]",
        "---",
        "",
        f"# {'Reward model' if reward else 'Policy'} trained with rlhf ({manifest['stage']})",
        "",
        f"A LoRA adapter trained by `rlhf {manifest['stage']}` on {base}, merged into the base's "
        f"weights at {record['dtype']} (`rlhf export`). Architecture: `{record['architecture']}`."
        + (
            f" Written as one GGUF file ({record['gguf']['type']}) for llama.cpp and Ollama."
            if record["gguf"]
            else ""
        ),
    ]
    if reward:
        lines.append(
            "It scores a (prompt, response) conversation rendered with its chat template: the "
            "logit of its single label, read at the last token that is not the pad token."
        )
        if record["score_bias"]:
            lines.append(
                f"Its scores are rlhf's minus the trained head's bias {record['score_bias']:.6g} "
                "(the same for every input; preferences are unchanged)."
            )
    lines += ["", "## Lineage", "", "| stage | checkpoint | settings | final metrics |",
              "|---|---|---|---|"]  # fmt: skip
    for folder, stage in lineage(source):
        settings = ", ".join(
            f"{key}={value}"
            for key in CARD_SETTINGS
            if (value := _setting(stage.get("config", {}), key)) not in (None, [], "")
        )
        metrics = ", ".join(
            f"{k} {v:.4g}" for k, v in (stage.get("final_metrics") or {}).items()
            if isinstance(v, int | float)
        )  # fmt: skip
        lines.append(f"| {stage['stage']} | `{folder}` | {settings} | {metrics} |")
    if evaluation:
        path, result = evaluation
        lines += ["", "## Evaluation", "", f"From `{path}` (`rlhf eval`):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        for key, value in result.get("metrics", {}).items():
            if isinstance(value, int | float) and not key.startswith("perf/"):
                lines.append(f"| {key} | {value:.4g} |")
    if record["gguf"]:
        file = f"{record['gguf']['file']}"
        use = ["```bash", f"llama-cli -m {file} -cnv", f'echo "FROM ./{file}" > Modelfile && '
               "ollama create my-model -f Modelfile", "```"]  # fmt: skip
    else:
        use = ["```python", f"from transformers import AutoTokenizer, {loader}", "",
               'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
               f'model = {loader}.from_pretrained("path/to/this/folder")', "```"]  # fmt: skip
    lines += [
        "",
        "## Use",
        "",
        *use,
        "",
        "Package versions at export: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)
