"""Model loading: devices, quantization choices, pad token, LoRA wrapping, fingerprints."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import modeling
from rlhf_cli.schema import QuantConfig, UserError

from conftest import config_of, model_config


def test_auto_quant_is_nf4_on_cuda_and_none_on_cpu():
    assert (
        modeling.resolve_quant(
            QuantConfig(mode="auto", double_quant=True, compute_dtype="auto"), torch.device("cpu")
        )
        == "none"
    )
    assert (
        modeling.resolve_quant(
            QuantConfig(mode="auto", double_quant=True, compute_dtype="auto"), torch.device("cuda")
        )
        == "nf4"
    )
    assert (
        modeling.resolve_quant(
            QuantConfig(mode="nf4", double_quant=True, compute_dtype="auto"), torch.device("cpu")
        )
        == "nf4"
    )


def test_int8_on_cpu_and_cuda_without_cuda_are_user_errors():
    with pytest.raises(UserError, match="quant=int8 needs CUDA"):
        modeling.resolve_quant(
            QuantConfig(mode="int8", double_quant=True, compute_dtype="auto"), torch.device("cpu")
        )
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda was requested but CUDA is not available"):
            modeling.resolve_device("cuda")


def test_nf4_model_has_4bit_linears_and_only_lora_is_trainable(tiny_model):
    import bitsandbytes as bnb

    config = config_of("sft")
    config.model.name_or_path = str(tiny_model)
    config.quant.mode = "nf4"
    tokenizer = modeling.load_tokenizer(config.model)
    model, quant = modeling.load_model(config, tokenizer, torch.device("cpu"))
    assert quant == "nf4"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every linear layer of every block is adapted ("all-linear"), the output head is not
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_cpu_4bit_layers_compute_the_same_after_an_eval_pass_and_a_checkpoint(
    tiny_model, monkeypatch
):
    """On a CPU with AVX512-BF16 (faked here, so the test means the same on every machine),
    bitsandbytes would repack a Linear4bit for a bf16 kernel at an eval-mode no-grad forward and
    unpack it at state_dict(): a training step's numbers would depend on what ran before it, and a
    resumed run would drift from an uninterrupted one. modeling.one_cpu_4bit_kernel keeps one
    kernel: the training forward is bit-identical before and after both."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    config = config_of("sft")
    config.model.name_or_path = str(tiny_model)
    config.quant.mode = "nf4"
    tokenizer = modeling.load_tokenizer(config.model)
    model, _ = modeling.load_model(config, tokenizer, torch.device("cpu"))
    ids = torch.tensor([[5, 9, 17, 33, 65, 129]])

    def train_logits():
        model.train()
        return model(input_ids=ids).logits

    before = train_logits()
    with modeling.eval_mode(model), torch.no_grad():
        model(input_ids=ids)  # a reference pass, a rollout or an evaluation
    after_eval = train_logits()
    model.state_dict()  # what every checkpoint takes
    after_save = train_logits()
    assert torch.equal(before, after_eval) and torch.equal(before, after_save)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(state, "packing_format_for_cpu", False)


def test_unfit_target_modules_is_a_user_error(tiny_model):
    config = config_of("sft")
    config.model.name_or_path = str(tiny_model)
    config.lora.target_modules = ["no_such_proj"]
    tokenizer = modeling.load_tokenizer(config.model)
    with pytest.raises(UserError, match="lora.target_modules"):
        modeling.load_model(config, tokenizer, torch.device("cpu"))


def test_missing_model_is_a_user_error(tmp_path):
    config = config_of("sft")
    config.model.name_or_path = str(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="nothing-here does not exist"):
        modeling.load_tokenizer(config.model)


def test_added_pad_token_when_there_is_no_unk(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.unk_token = None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    loaded = modeling.load_tokenizer(model_config(str(tmp_path)))
    assert loaded.pad_token == modeling.PAD_TOKEN and loaded.pad_token_id != loaded.eos_token_id


def test_fingerprint_separates_tokenizers(tiny_model, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    tokenizer = modeling.load_tokenizer(model_config(str(tiny_model)))
    same = modeling.fingerprint(config, modeling.load_tokenizer(model_config(str(tiny_model))))
    assert modeling.fingerprint(config, tokenizer) == same
    tokenizer.add_tokens(["<extra>"])
    assert modeling.fingerprint(config, tokenizer) != same


def test_a_pad_named_special_token_is_reused_before_adding_one(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.unk_token = None
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    tokenizer.save_pretrained(tmp_path)
    loaded = modeling.load_tokenizer(model_config(str(tmp_path)))
    assert loaded.pad_token == "<|finetune_right_pad_id|>" and len(loaded) == len(tokenizer)


def test_an_added_pad_token_keeps_the_adapter_small_and_loadable(tiny_model, tmp_path):
    """With a new pad token the embeddings are resized, but the adapter saves only LoRA weights;
    peft loads it onto the base once the base is resized to the saved tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli import checkpoint

    base_dir = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.unk_token = None
    tokenizer.save_pretrained(base_dir)
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(base_dir)
    config = config_of("sft")
    config.model.name_or_path = str(base_dir)
    loaded = modeling.load_tokenizer(config.model)
    assert loaded.pad_token == modeling.PAD_TOKEN
    model, _ = modeling.load_model(config, loaded, torch.device("cpu"))
    out = tmp_path / "adapter"
    out.mkdir()
    checkpoint.save_adapter(model, out)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(loaded))
    PeftModel.from_pretrained(base, out)


# ---------------------------------------------------------------- sparse LoRA dropout (CPU)
@pytest.mark.parametrize("chunk", [None, 7])  # 7: many rounds of drawing gaps
def test_dropped_positions_are_bernoulli_p(chunk):
    torch.manual_seed(0)
    n, p = 400_000, 0.05
    dropped = modeling.dropped_positions(n, p, torch.device("cpu"), chunk)
    assert (dropped.diff() > 0).all() and dropped.min() >= 0 and dropped.max() < n
    mask = torch.zeros(n, dtype=torch.bool)
    mask[dropped] = True
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(mask.sum().item() - n * p) < 5 * sd  # the count
    # independence: neighbours dropped together at rate p^2, and every position is reachable
    both = (mask[:-1] & mask[1:]).sum().item()
    assert abs(both - (n - 1) * p * p) < 5 * ((n - 1) * p * p) ** 0.5
    # every position, the first and the last included, is dropped at rate p
    counts = torch.zeros(10)
    for _ in range(4000):
        counts[modeling.dropped_positions(10, 0.3, torch.device("cpu"), chunk)] += 1
    assert ((counts / 4000 - 0.3).abs() < 5 * (0.3 * 0.7 / 4000) ** 0.5).all(), counts


def test_sparse_dropout_scales_kept_values_and_masks_the_gradient_alike():
    torch.manual_seed(1)
    layer = modeling.SparseDropout(0.1)
    x = (torch.rand(64, 33, 48) + 0.5).requires_grad_(True)  # no zeros: a zero out = dropped
    out = layer(x)
    kept = out != 0
    assert 0.85 < kept.float().mean() < 0.95
    # x * fl(1 / 0.9) against x / 0.9: an ulp or two (2.4e-7 relative), under the default float32
    # rtol 1.3e-6; a wrong scale (1 - p, or none) is 10% off
    torch.testing.assert_close(out[kept], x[kept] / 0.9)
    weights = torch.randn_like(x)
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights * kept / 0.9)  # the same, on the gradient
    # eval mode and p = 0 (what disable_dropout sets) pass the input through untouched
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    layer.p = 0.0
    assert torch.equal(layer(x), x)


def test_sparse_dropout_matches_nn_dropout_in_distribution():
    """Same mean and second moment of the output as nn.Dropout (a different random stream)."""
    torch.manual_seed(2)
    x = torch.rand(200, 1000) + 1
    sparse = modeling.SparseDropout(0.05)(x)
    plain = torch.nn.functional.dropout(x, 0.05, training=True)
    # statistical: two independent means of 2e5 values differ by ~1e-3 (first moment) and ~1.4e-3
    # (second) relative, so 0.01 is 7 standard errors; float32 pairwise means are off by < 1e-5
    for a, b in ((sparse, plain), (sparse**2, plain**2)):
        torch.testing.assert_close(a.mean(), b.mean(), rtol=0.01, atol=0)
    # the dropped share of 2e5: standard error sqrt(0.05 x 0.95 / 2e5) = 4.9e-4, 0.003 is 6 of them
    torch.testing.assert_close((sparse == 0).float().mean(), torch.tensor(0.05), atol=0.003, rtol=0)


def test_lora_dropout_layers_become_sparse_and_keep_p(tiny_model):
    config = config_of("sft")
    config.model.name_or_path = str(tiny_model)
    config.quant.mode = "none"
    config.lora.dropout = 0.07
    tokenizer = modeling.load_tokenizer(config.model)
    model, _ = modeling.load_model(config, tokenizer, torch.device("cpu"))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    lora = [m for name, m in model.named_modules() if ".lora_dropout." in name]
    assert lora and all(type(m) is modeling.SparseDropout and m.p == 0.07 for m in lora)
    assert set(map(id, lora)) <= set(map(id, dropouts))
    # a train-mode forward pass differs from eval mode only through the dropout
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        model.eval()
        clean = model(input_ids=ids).logits
        model.train()
        modeling.disable_dropout(model)
        # exact: with p = 0, dropout returns its input, so both passes do the same operations
        assert torch.equal(model(input_ids=ids).logits, clean)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_4bit_parameters_count_as_their_unpacked_weights_whatever_the_storage_dtype(storage):
    # CPU packs nf4 into uint8 (2 weights an element); on CUDA, prepare_model_for_kbit_training's
    # bf16 storage packs 4 an element: a count from numel() alone under-reports either
    import bitsandbytes as bnb

    weight = bnb.nn.Params4bit(
        torch.randn(32, 64), requires_grad=False, quant_type="nf4", quant_storage=storage
    )._quantize("cpu")
    assert weight.numel() * weight.element_size() * 2 == 32 * 64  # 4 bits a weight, packed
    holder = torch.nn.Module()
    holder.packed = weight
    holder.bias = torch.nn.Parameter(torch.zeros(32))
    assert modeling.unpacked_numel(weight) == 32 * 64
    assert modeling.parameter_counts(holder) == (32, 32 * 64 + 32)
