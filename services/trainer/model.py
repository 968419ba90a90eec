"""The policy: base model + LoRA (peft), and its response log-probabilities.

One model copy serves as both the policy and the reference: the reference is
the same model with the adapter disabled (peft ``disable_adapter()``), so
LoRA/QLoRA training never holds a second model (paper 4.1, the memory reason
the paper picks a single-sample loss).

On CUDA: 4-bit nf4 QLoRA (bitsandbytes), FlashAttention-2 when installed,
gradient checkpointing, bf16. On CPU: plain torch, fp32 by default.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from shared.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from services.trainer.config import TrainerSettings
    from shared.rope import RopeConfig

log = logging.getLogger(__name__)

# Each LM-head tile holds about this many logits (64 MiB in fp32).
LOGITS_PER_TILE = 1 << 24


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs, resolved once from the settings and the machine."""

    device: torch.device
    dtype: torch.dtype  # weights (non-quantized) and autocast compute dtype
    autocast: bool  # bf16 autocast over fp32 weights (CPU only)
    quantize: bool  # 4-bit nf4 QLoRA
    attn_implementation: str
    gradient_checkpointing: bool

    def autocast_context(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)


def resolve_runtime(settings: TrainerSettings) -> Runtime:
    device = resolve_device()
    cuda = device.type == "cuda"
    dtype = resolve_dtype(settings.precision, device, cpu_bf16=False)
    if settings.quantization == "nf4" and not cuda:
        raise ValueError("quantization=nf4 needs CUDA (bitsandbytes 4-bit kernels)")
    quantize = cuda and settings.quantization in ("auto", "nf4") and importlib.util.find_spec("bitsandbytes") is not None
    if settings.quantization == "nf4" and not quantize:
        raise ValueError("quantization=nf4 needs bitsandbytes (pip install -e '.[gpu]')")
    attn = settings.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if cuda:
            attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else FUSED_SDPA
    checkpointing = settings.gradient_checkpointing == "on" or (settings.gradient_checkpointing == "auto" and cuda)
    return Runtime(
        device=device,
        dtype=dtype,
        # CPU bf16 = autocast over fp32 weights (AVX512-BF16 matmuls, fp32 master weights for AdamW)
        autocast=dtype == torch.bfloat16 and not cuda,
        quantize=quantize,
        attn_implementation=attn,
        gradient_checkpointing=checkpointing,
    )


# --------------------------------------------------------------------------- attention on CUDA without flash-attn

FUSED_SDPA = "grace_fused_sdpa"


def fused_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         dtype: torch.dtype = torch.bfloat16, **_: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' SDPA attention in the shape PyTorch's fused CUDA kernels accept: q/k/v in ``dtype``
    and the K/V heads repeated to the query heads, instead of ``enable_gqa``.

    Measured on an H200 (``scripts/gpu_check.py --checks attention``, Qwen2-0.5B shape, one 8k-token
    sequence, forward and backward): transformers' own path handed SDPA fp32 q/k with ``enable_gqa``, so
    only the math kernel ran and materialised the attention matrix, 114.6 GiB peak (QLoRA's fp32 residual
    stream; fused kernels take fp16/bf16 only). Here flash, memory-efficient and cuDNN all run, 20.6 GiB,
    and a 32k-token GRACE-KTO step (YaRN x4) fits in 8.5 GiB, where the other path ran out of 140 GiB.
    Training forwards only (no KV cache): a query longer than one token is the whole causal sequence.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=attention_mask is None and query.shape[2] > 1)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register_fused_sdpa(dtype: torch.dtype) -> None:
    """Registers ``FUSED_SDPA`` with transformers, computing in ``dtype`` (the weights' dtype; bf16 for QLoRA)."""
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_SDPA, functools.partial(fused_sdpa_attention, dtype=dtype))


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(path: str | Path, rope: RopeConfig | None) -> Any:
    """The base config under the run's RoPE setting (paper 3.6).

    YaRN (``rope.yarn_factor`` x the native window, the native window override honoured, exactly as the
    rollout serves it) only with ``scope="inference_and_training"``; otherwise, and for ``rope=None``,
    the model's native RoPE: the paper applies YaRN "in vLLM ... at inference".
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    factor = rope.training_factor() if rope is not None else None
    if factor:
        from shared.tiny_models import native_window, yarn_rope_parameters

        native = rope.native_window or native_window(path)
        config.rope_parameters = yarn_rope_parameters(path, factor, native)
        config.max_position_embeddings = int(factor * native)
    return config


def load_base(path: str | Path, runtime: Runtime, rope: RopeConfig | None = None) -> Any:
    """The frozen base model on ``runtime.device`` (4-bit when ``runtime.quantize``), RoPE per ``model_config``."""
    from transformers import AutoModelForCausalLM

    if runtime.attn_implementation == FUSED_SDPA:
        register_fused_sdpa(runtime.dtype)
    kwargs: dict[str, Any] = {
        "config": model_config(path, rope),
        "attn_implementation": runtime.attn_implementation,
        "dtype": torch.float32 if runtime.autocast else runtime.dtype,
    }
    if runtime.quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": runtime.device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not runtime.quantize:
        model.to(runtime.device)
    model.config.use_cache = False
    if runtime.quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=runtime.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif runtime.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def lora_config(settings: TrainerSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_policy(
    settings: TrainerSettings, runtime: Runtime | None = None, base_path: str | Path | None = None
) -> tuple[Any, Any, Runtime]:
    """(peft model with a fresh LoRA adapter, tokenizer, runtime)."""
    from peft import get_peft_model

    runtime = runtime or resolve_runtime(settings)
    path = Path(base_path or settings.policy_path())
    tokenizer = load_tokenizer(path)
    base = load_base(path, runtime, settings.rope())
    torch.manual_seed(settings.seed)
    model = get_peft_model(base, lora_config(settings))
    log.info(
        "event=policy_loaded base=%s device=%s dtype=%s autocast=%s qlora=%s attn=%s checkpointing=%s rope=%s "
        "trainable=%d", path, runtime.device, runtime.dtype, runtime.autocast, runtime.quantize,
        runtime.attn_implementation, runtime.gradient_checkpointing, "yarn" if settings.rope().training_factor() else "native",
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )  # fmt: skip
    return model, tokenizer, runtime


def reset_adapter(model: Any, seed: int) -> None:
    """Re-initializes the LoRA weights (B = 0, so the policy equals the reference again)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


def load_adapter_weights(model: Any, adapter_dir: str | Path) -> None:
    """Loads a saved adapter's weights into the live peft model (same rank and targets)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    live = model.peft_config["default"]
    if int(config["r"]) != live.r or set(config["target_modules"]) != set(live.target_modules):
        raise ValueError(f"adapter {adapter_dir} has rank {config['r']} / targets {config['target_modules']}, "
                         f"the trainer {live.r} / {sorted(live.target_modules)}")  # fmt: skip
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {adapter_dir}: unexpected keys {unexpected[:3]}")


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA entries of the model's state dict, on CPU; under ZeRO-3 gathered from their shards
    (a collective: call it on every rank). ``save_adapter`` turns it into PEFT's file layout."""
    inner = getattr(model, "module", model)
    params = [p for n, p in inner.named_parameters() if "lora_" in n]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if "lora_" in k}


def save_adapter(model: Any, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT files (adapter_config.json, adapter_model.safetensors) that peft and vLLM load."""
    inner = getattr(model, "module", model)
    inner.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)


# --------------------------------------------------------------------------- log-probabilities


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and the LM head of a (peft-wrapped, DeepSpeed-wrapped) causal LM."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_decoder(), inner.get_output_embeddings()


class _TokenLogProb(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row, tile by tile, without keeping [N, V] logits.

    With a gradient wanted, the forward also builds d logp / d h = W[target] - p W
    (one [N, H] tensor), so the backward is a row scaling: no logits are saved
    or recomputed. The LM head itself is frozen (LoRA), so no weight gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
        rows = max(1, LOGITS_PER_TILE // weight.shape[0])
        compute_dtype = torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        w = weight.to(compute_dtype)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            logits = (hidden[start:end].to(compute_dtype) @ w.t()).float()
            if bias is not None:
                logits += bias.float()
            target = targets[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, target[:, None]).squeeze(1) - lse
            if grad_h is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))  # in place: the tile is not needed any more
                grad_h[start:end] = weight[target].float() - (probs.to(compute_dtype) @ w).float()
        ctx.save_for_backward(grad_h)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        grad_hidden = (grad_logps[:, None] * grad_h).to(ctx.hidden_dtype) if grad_h is not None else None
        return grad_hidden, None, None, None


def token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``targets`` under the LM head applied to ``hidden`` ([N, H] -> [N])."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad):  # full fine-tuning: plain autograd
        logits = F.linear(hidden, weight, bias).float()
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    gather = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):  # ZeRO-3 shards the head; the head's own forward hook is bypassed here
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None])
    with gather:
        return _TokenLogProb.apply(hidden, weight, bias, targets)


@dataclass
class Sequence:
    """A prompt+response token sequence; log-probabilities count response tokens only."""

    ids: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


def response_token_logps(
    model: Any, sequences: list[Sequence], pad_id: int, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob, row, token id) of every response token of the sequences, from one right-padded forward.

    Right padding needs no attention mask: under causal attention a real
    token never sees the padding after it. Only response positions go
    through the LM head.
    """
    backbone, head = backbone_and_head(model)
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
        target_mask[row, seq.prompt_len - 1 : len(seq.ids) - 1] = True  # position t predicts token t+1
    # positions as indices built here on the CPU: a boolean mask on the device would synchronise (nonzero)
    row_cpu, column = target_mask.nonzero(as_tuple=True)
    targets = input_ids[row_cpu, column + 1].to(runtime.device)
    rows, positions = row_cpu.to(runtime.device), (row_cpu * width + column).to(runtime.device)
    with runtime.autocast_context():
        hidden = backbone(input_ids=input_ids.to(runtime.device), use_cache=False).last_hidden_state
        selected = hidden.flatten(0, 1).index_select(0, positions)
        per_token = token_logps(selected, head, targets)
    return per_token, rows, targets


def sequence_logps(model: Any, sequences: list[Sequence], pad_id: int, runtime: Runtime) -> torch.Tensor:
    """Summed response log-probabilities of each sequence (one forward, see ``response_token_logps``)."""
    per_token, rows, _ = response_token_logps(model, sequences, pad_id, runtime)
    return torch.zeros(len(sequences), dtype=torch.float32, device=runtime.device).index_add(0, rows, per_token)
