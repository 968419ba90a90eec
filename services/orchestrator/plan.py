"""`grace plan`: a capacity plan for one semi-online iteration, from first principles.

Everything here is arithmetic on model shapes and device numbers (no I/O but
the thin ``load_shape`` that reads a ``config.json``), so tests check each
formula against a hand calculation.

Model of one iteration (paper 3.2-3.5; the stages run one after another in
``grace run``: rollout -> reward -> train -> swap -> eval):

- rollout: decode is bound by memory bandwidth: every decode step reads the
  weights once plus the KV cache of the running batch; the batch is what the
  KV cache memory left after the weights holds (and vLLM's max_num_seqs);
  prompts are prefilled once per query (prefix caching shares them across m);
- reward: prefill of M_G and M_D over each document and of the encoder over
  query, summary and document: bound by compute, 2 x params x tokens FLOPs
  plus attention;
- trainer: the reference pass (forward, no grad, samples and their mismatched
  KL pairs, once per iteration), then per epoch a no-grad policy pass over the
  KL pairs and a forward+backward pass with LoRA (factors below);
- swap: the adapter is written to the store and loaded by vLLM;
- eval: the held-out queries, one response each, decoded and scored.

FLOP counts: a linear layer of ``in x out`` costs ``2 in out`` per token
forward; attention costs ``4 x q_dim x context`` per token and layer forward
(QK^T and AV), context = position (causal) or the sequence (bidirectional).
Biases and norms are left out (< 0.1% of the parameters).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GB = 1e9
GIB = 2**30

# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a transformer; ``from_config`` reads it from a HF config.json."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    window: int  # native context window (the reward's perplexity window)
    gated_mlp: bool = True  # SwiGLU (gate, up, down: Qwen2/Llama) vs GELU MLP (up, down: BERT/XLM-R)
    causal: bool = True  # decoder (causal attention, LM head) vs bidirectional encoder (no LM head)
    tied_embeddings: bool = False  # LM head shares the input embedding matrix
    positions: int = 0  # learned position embeddings (XLM-R); 0 with RoPE
    extra_linear: int = 0  # per-token heads outside the layers (BGE-M3: colbert H x H + sparse H x 1)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one transformer block, by its Hugging Face name."""
        h, i = self.hidden, self.intermediate
        modules = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h)}
        if self.gated_mlp:
            modules.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            modules.update(up_proj=(h, i), down_proj=(i, h))
        return modules

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_modules().values())

    @property
    def embedding_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden if self.causal else 0

    @property
    def params(self) -> int:
        """All weights: blocks, embeddings, the LM head unless tied, extra heads."""
        untied_head = 0 if self.tied_embeddings else self.lm_head_params
        return self.layers * self.layer_params + self.embedding_params + untied_head + self.extra_linear

    @property
    def matmul_params(self) -> int:
        """Weights a token multiplies through (blocks + extra heads; the LM head is counted per scored token)."""
        return self.layers * self.layer_params + self.extra_linear

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """A HF config.json (Qwen2/Llama/Mistral decoders, BERT/RoBERTa/XLM-R encoders)."""
        model_type = str(config.get("model_type", ""))
        encoder = "bert" in model_type or "roberta" in model_type  # bert, roberta, xlm-roberta: bidirectional encoders
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        window = int(config.get("max_position_embeddings") or 2048)
        if encoder:
            return cls(name=name, layers=int(config["num_hidden_layers"]), hidden=hidden,
                       intermediate=int(config["intermediate_size"]), heads=heads, kv_heads=heads, head_dim=head_dim,
                       vocab=int(config["vocab_size"]), window=window - 2 if "roberta" in model_type else window,
                       gated_mlp=False, causal=False, tied_embeddings=True, positions=window,
                       extra_linear=hidden * hidden + hidden)  # fmt: skip  # BGE-M3 colbert + sparse heads
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        native = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
        return cls(name=name, layers=int(config["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(config["intermediate_size"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
                   vocab=int(config["vocab_size"]), window=int(native or window),
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)))  # fmt: skip


# Public config.json values (huggingface.co/<repo>/blob/main/config.json), hard-coded: no hub at run time.
MODEL_PRESETS: dict[str, ModelShape] = {
    # Qwen/Qwen2.5-7B: hidden 3584, 28 layers, 28 heads, 4 kv heads, intermediate 18944, vocab 152064,
    # untied LM head; 7.62B parameters; 32,768-token native context (the Qwen2.5 model card).
    "qwen2.5-7b": ModelShape("qwen2.5-7b", layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
                             head_dim=128, vocab=152064, window=32768),
    # Qwen/Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 kv heads, intermediate 8960, vocab 151936, tied.
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2,
                               head_dim=128, vocab=151936, window=32768, tied_embeddings=True),
    # Qwen/Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936, tied.
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2,
                               head_dim=64, vocab=151936, window=32768, tied_embeddings=True),
    # meta-llama/Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate 14336, vocab 128256.
    "llama-3.1-8b": ModelShape("llama-3.1-8b", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                               head_dim=128, vocab=128256, window=131072),
    # BAAI/bge-m3 = XLM-RoBERTa-large: 24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 250002,
    # 8194 positions (8192 tokens + RoBERTa's offset of 2); + colbert_linear (1024x1024) and sparse_linear (1024x1).
    "bge-m3": ModelShape("bge-m3", layers=24, hidden=1024, intermediate=4096, heads=16, kv_heads=16, head_dim=64,
                         vocab=250002, window=8192, gated_mlp=False, causal=False, tied_embeddings=True,
                         positions=8194, extra_linear=1024 * 1024 + 1024),
}  # fmt: skip

TINY_ROLES = {"policy": "policy", "general": "general", "domain": "domain", "encoder": "embedding"}


def load_shape(spec: str, role: str = "policy") -> ModelShape:
    """A preset name, ``tiny``/``small`` (the local model set, this role's model) or a folder with config.json."""
    key = spec.lower()
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    path = Path(spec)
    if key in ("tiny", "small") and not (path / "config.json").exists():
        from shared.tiny_models import ensure_model_set

        path = Path(getattr(ensure_model_set(key), TINY_ROLES[role]))
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.exists():
        raise ValueError(f"{spec!r}: not a preset ({', '.join(MODEL_PRESETS)}, tiny, small) nor a config.json folder")
    return ModelShape.from_config(
        json.loads(config_file.read_text()), name=f"{spec} ({role})" if key in ("tiny", "small") else spec
    )


# --------------------------------------------------------------------------- formulas


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: float = 2) -> float:
    """KV cache per token: K and V, every layer, every KV head."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def attention_flops(shape: ModelShape, seq_len: int) -> float:
    """Forward QK^T + AV FLOPs of one sequence: 4 q_dim per (query, key) pair per layer."""
    pairs = seq_len * (seq_len + 1) / 2 if shape.causal else seq_len * seq_len
    return 4 * shape.layers * shape.q_dim * pairs


def forward_flops(shape: ModelShape, seq_len: int, lm_head_tokens: int | None = None) -> float:
    """Forward FLOPs of one sequence; ``lm_head_tokens`` positions go through the LM head (default: all)."""
    head_tokens = seq_len if lm_head_tokens is None else lm_head_tokens
    return 2 * shape.matmul_params * seq_len + attention_flops(shape, seq_len) + 2 * shape.lm_head_params * head_tokens


def lora_params(shape: ModelShape, rank: int, modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> int:  # fmt: skip
    """LoRA A (r x in) + B (out x r) on each named module of every block."""
    table = shape.linear_modules()
    return shape.layers * sum(rank * (table[m][0] + table[m][1]) for m in modules if m in table)


# AdamW with mixed precision: fp32 master weights + fp32 gradients + two fp32 moments = 16 B per trained
# parameter (PEFT keeps LoRA weights in fp32 on a bf16 base: autocast_adapter_dtype; bf16 weights + bf16
# grads + fp32 master + 2 moments is the same 16 B).
ADAMW_BYTES_PER_PARAM = 16


def optimizer_bytes(trainable: int) -> float:
    return ADAMW_BYTES_PER_PARAM * trainable


# bitsandbytes nf4 with double quantization: 4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax
# = 4.127 bits per weight (QLoRA paper, Dettmers et al. 2023, sec. 3). Only the block linears are
# quantized; embeddings and the LM head stay bf16.
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)


def weight_bytes(shape: ModelShape, dtype_bytes: float = 2, nf4: bool = False) -> float:
    if not nf4:
        return shape.params * dtype_bytes
    quantized = shape.layers * shape.layer_params
    return quantized * NF4_BITS_PER_PARAM / 8 + (shape.params - quantized) * dtype_bytes


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool, dtype_bytes: float = 2) -> float:
    """Activations kept for the backward pass, per token, all layers.

    Without checkpointing, per layer: the inputs of the two norms and of the
    q/k/v and gate/up matmuls (4 h), q and the attention output (2 q_dim),
    k and v (2 kv_dim), and in the MLP gate, up, act(gate) and their product
    (4 I; 2 I for a GELU MLP); sdpa/flash attention keeps no scores matrix
    (Korthikanti et al. 2022 count the same tensors for GPT without flash:
    34 h + 5 a s per layer). With checkpointing only each block's input (h)
    stays, plus one block recomputed at a time.
    """
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate
    per_layer = (4 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + mlp) * dtype_bytes
    if checkpointing:
        return shape.layers * shape.hidden * dtype_bytes + per_layer
    return shape.layers * per_layer


# --------------------------------------------------------------------------- devices and efficiency


@dataclass(frozen=True)
class Device:
    """One accelerator: vendor peak numbers plus the fractions of them software reaches.

    Efficiency fractions (GPUs): not measurable on this project's CPU machines;
    the sources are stated where the constants are defined below.
    """

    name: str
    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    bandwidth: float  # memory bandwidth, B/s
    memory: float  # bytes
    prefill_mfu: float  # achieved / peak FLOP/s for no-grad prefill (reward, reference, vLLM prefill)
    train_mfu: float  # achieved / peak FLOP/s for forward + backward
    decode_bw_util: float  # achieved / peak bandwidth during decode
    decode_step_overhead_s: float  # scheduler, sampling, launch per decode step, independent of the batch
    decode_seq_overhead_s: float  # per running sequence per decode step (sampling, detokenizing, streaming)
    peak_flops_fp32: float | None = None  # for services that run in fp32 (the CPU demo); None = peak_flops
    prefill_mfu_fp32: float | None = None  # fp32 fractions where they differ (measured on CPU); None = the bf16 ones
    train_mfu_fp32: float | None = None
    kind: str = "gpu"

    def peak(self, dtype_bytes: float) -> float:
        return self.peak_flops_fp32 if dtype_bytes >= 4 and self.peak_flops_fp32 else self.peak_flops

    def prefill_rate(self, dtype_bytes: float) -> float:
        """Achieved no-grad FLOP/s."""
        fp32 = dtype_bytes >= 4 and self.prefill_mfu_fp32 is not None
        return self.peak(dtype_bytes) * (self.prefill_mfu_fp32 if fp32 else self.prefill_mfu)

    def train_rate(self, dtype_bytes: float) -> float:
        """Achieved forward + backward FLOP/s."""
        fp32 = dtype_bytes >= 4 and self.train_mfu_fp32 is not None
        return self.peak(dtype_bytes) * (self.train_mfu_fp32 if fp32 else self.train_mfu)


# Efficiency fractions on GPUs (assumptions, stated with their source):
# - PREFILL_MFU 0.40: the share of bf16 peak that long-sequence no-grad prefill reaches in HF/vLLM
#   (issue 16's own sizing uses 40%; vLLM and HF prefill of 7B models at >=4k tokens is commonly 40-60%).
# - TRAIN_MFU 0.35: forward+backward of a 7B LoRA model in HF+PEFT (reported MFU for 7B fine-tuning is
#   35-50% with FSDP/DeepSpeed, e.g. MosaicML LLM Foundry's tables; LoRA adds small unfused ops).
# - DECODE_BW_UTIL 0.70: vLLM decode reaches 60-80% of HBM bandwidth at moderate batch ("MBU",
#   Databricks, "LLM Inference Performance Engineering: Best Practices", 2023).
# - DECODE_STEP_OVERHEAD_S 1 ms + 20 us per sequence: vLLM's per-step scheduling/sampling with CUDA graphs.
PREFILL_MFU = 0.40
TRAIN_MFU = 0.35
DECODE_BW_UTIL = 0.70
DECODE_STEP_OVERHEAD_S = 1e-3
DECODE_SEQ_OVERHEAD_S = 20e-6
# QLoRA's nf4 dequantization before each matmul: training with bitsandbytes nf4 took 39% longer than bf16
# LoRA in S. Raschka, "Practical Tips for Finetuning LLMs Using LoRA" (2023). Not measurable here (CUDA only).
QLORA_SLOWDOWN = 1.39
# Forward+backward factor with LoRA: forward 2 P, backward 2 P (input gradients only: the frozen base
# needs no weight gradients; the LoRA weight gradients are < 3% of that), + 2 P recompute with gradient
# checkpointing: 6 P per token with checkpointing (the CUDA default), 4 P without. Attention: 1 + 2 (+1).
TRAIN_FLOPS_FACTOR_NO_CHECKPOINTING = 2.0  # x forward
TRAIN_FLOPS_FACTOR_CHECKPOINTING = 3.0  # x forward
# vLLM keeps this much of each GPU for activations/CUDA graphs outside the KV cache (its profiling run);
# 2 GiB is typical for a 7B model at max_num_batched_tokens 8192.
VLLM_RESERVE_BYTES = 2 * GIB
# CUDA context, allocator fragmentation, NCCL buffers per process.
RUNTIME_RESERVE_BYTES = 1.5 * GIB
# Adapter hand-off: written by the trainer, read by vLLM, from shared storage (assumed 1 GB/s), plus the
# hot-swap latency `grace bench rollout` measured on CPU (0.14 s: README, Benchmarks).
STORAGE_BANDWIDTH = 1 * GB
SWAP_FIXED_S = 0.14

_GPU: dict[str, Any] = {"prefill_mfu": PREFILL_MFU, "train_mfu": TRAIN_MFU, "decode_bw_util": DECODE_BW_UTIL,
                        "decode_step_overhead_s": DECODE_STEP_OVERHEAD_S, "decode_seq_overhead_s": DECODE_SEQ_OVERHEAD_S}  # fmt: skip
# Vendor datasheets, dense (no-sparsity) BF16 tensor throughput:
DEVICES: dict[str, Device] = {
    # NVIDIA H100 SXM5 datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense; HBM3 3.35 TB/s; 80 GB.
    "h100": Device("H100 SXM 80GB", 989e12, 3.35e12, 80 * GB, **_GPU),
    # NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense; HBM3e 4.8 TB/s; 141 GB.
    "h200": Device("H200 SXM 141GB", 989e12, 4.8e12, 141 * GB, **_GPU),
    # NVIDIA A100 80GB SXM datasheet: BF16 312 TFLOPS dense (624 with sparsity); HBM2e 2,039 GB/s; 80 GB.
    "a100": Device("A100 SXM 80GB", 312e12, 2.039e12, 80 * GB, **_GPU),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity); GDDR6 864 GB/s; 48 GB.
    "l40s": Device("L40S 48GB", 362.05e12, 864e9, 48 * GB, **_GPU),
}


# --------------------------------------------------------------------------- inputs


DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PlanInputs:
    policy: ModelShape
    general: ModelShape
    domain: ModelShape
    encoder: ModelShape
    device: Device
    gpus: int = 8
    k: int = 250  # queries per iteration (paper: 250 or 500)
    m: int = 8  # responses per query
    total_queries: int = 1000  # query budget N: ceil(N / K) iterations
    prompt_tokens: int = 400  # system prompt (3.1) + query, per request
    doc_tokens: int = 5400  # the <answer> document D
    summary_tokens: int = 300  # <summary> + <outline> + tags around D in a response
    query_tokens: int = 40  # one query (encoder input; query generation)
    queries_per_generation: int = 5  # queries one query-generation call returns (3.2)
    lora_rank: int = 64
    lora_modules: tuple[str, ...] = DEFAULT_LORA_MODULES
    qlora: bool = True
    gradient_checkpointing: bool = True
    epochs: int = 1
    batch_size: int = 8
    micro_batch_tokens: int = 4096  # trainer's padded tokens per forward (a longer sequence is its own micro-batch)
    reward_batch_tokens: int = 16384  # reward's max_batch_tokens
    logits_chunk: int = 2048  # reward's LM-head chunk
    eval_queries: int = 8  # held-out queries evaluated per iteration (grace run: 8, demo: 12)
    max_num_seqs: int = 256  # vLLM's running-batch cap
    gpu_memory_utilization: float = 0.9  # vLLM's share of each GPU
    kv_cache_bytes: float | None = None  # vLLM's --kv-cache-memory-bytes per replica (CPU: 256 MiB); None = the share
    rollout_dtype_bytes: float = 2
    reward_dtype_bytes: float = 2
    trainer_dtype_bytes: float = 2
    trainer_step_overhead_s: float = 0.0  # optimizer step, Python, per optimizer step
    stage_overhead_s: dict[str, float] = field(default_factory=dict)  # fixed seconds per stage (HTTP, Redis, ...)

    @property
    def responses(self) -> int:
        return self.k * self.m

    @property
    def response_tokens(self) -> int:
        return self.summary_tokens + self.doc_tokens

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def iterations(self) -> int:
        return math.ceil(self.total_queries / self.k)


# --------------------------------------------------------------------------- stages


@dataclass
class Stage:
    seconds: float
    bound: str  # compute | memory | overhead
    flops: float = 0.0
    bytes_read: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServiceMemory:
    weights: float
    kv_cache: float = 0.0
    activations: float = 0.0
    optimizer: float = 0.0
    reserve: float = 0.0
    gpus: int = 1  # GPUs one instance spans (tensor parallel)

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.optimizer + self.reserve

    def fits(self, device: Device) -> bool:
        return self.total <= device.memory * self.gpus


def _tp_for(weights: float, p: PlanInputs) -> int:
    """Smallest power-of-two tensor parallel size whose share of the weights leaves room for a KV cache."""
    usable = p.device.memory * p.gpu_memory_utilization - VLLM_RESERVE_BYTES
    tp = 1
    while weights / tp > 0.8 * usable and tp < 64:
        tp *= 2
    return tp


def rollout_memory(p: PlanInputs) -> ServiceMemory:
    """Per vLLM replica: weights, the KV cache vLLM allocates (what is left of its share), reserve."""
    weights = weight_bytes(p.policy, p.rollout_dtype_bytes)
    tp = _tp_for(weights, p)
    lora = 3 * lora_params(p.policy, p.lora_rank, p.lora_modules) * p.rollout_dtype_bytes  # max_loras slots
    budget = p.device.memory * p.gpu_memory_utilization * tp
    kv = max(0.0, budget - weights - lora - VLLM_RESERVE_BYTES * tp) if p.kv_cache_bytes is None else p.kv_cache_bytes
    return ServiceMemory(weights=weights + lora, kv_cache=kv, reserve=VLLM_RESERVE_BYTES * tp, gpus=tp)


def _decode(p: PlanInputs, sequences: int, replicas: int, tp: int, kv_tokens: float, out_tokens: int, prompt: int) -> Stage:
    """Decode ``sequences`` of ``out_tokens`` each on ``replicas`` vLLM replicas in waves of the batch the KV cache holds."""
    d = p.device
    if sequences <= 0:
        return Stage(0.0, "none")
    per_replica = math.ceil(sequences / replicas)
    batch = int(min(p.max_num_seqs, per_replica, kv_tokens // (prompt + out_tokens)))
    if batch < 1:
        return Stage(math.inf, "memory", detail={"batch": 0, "reason": "one sequence does not fit the KV cache"})
    waves = math.ceil(per_replica / batch)
    steps = waves * out_tokens
    weights = weight_bytes(p.policy, p.rollout_dtype_bytes)
    kv_per_step = batch * (prompt + out_tokens / 2) * kv_bytes_per_token(p.policy, p.rollout_dtype_bytes)
    bytes_step = (weights + kv_per_step) / tp  # per GPU
    t_mem = bytes_step / (d.bandwidth * d.decode_bw_util)
    flops_step = batch * (2 * (p.policy.matmul_params + p.policy.lm_head_params)
                          + 4 * p.policy.layers * p.policy.q_dim * (prompt + out_tokens / 2)) / tp  # fmt: skip
    t_comp = flops_step / d.prefill_rate(p.rollout_dtype_bytes)
    t_over = d.decode_step_overhead_s + batch * d.decode_seq_overhead_s
    step = max(t_mem, t_comp) + t_over
    bound = "overhead" if t_over > max(t_mem, t_comp) else ("memory" if t_mem >= t_comp else "compute")
    return Stage(steps * step, bound, flops=flops_step * tp * steps * replicas, bytes_read=bytes_step * tp * steps * replicas,
                 detail={"batch": batch, "waves": waves, "steps": steps, "step_ms": round(step * 1e3, 3),
                         "step_memory_ms": round(t_mem * 1e3, 3), "step_compute_ms": round(t_comp * 1e3, 3),
                         "step_overhead_ms": round(t_over * 1e3, 3)})  # fmt: skip


def _prefill_seconds(p: PlanInputs, flops: float, gpus: int, dtype_bytes: float) -> float:
    return flops / (p.device.prefill_rate(dtype_bytes) * gpus)


def rollout_stage(p: PlanInputs, gpus: int) -> Stage:
    mem = rollout_memory(p)
    replicas = gpus // mem.gpus
    if replicas < 1:
        return Stage(math.inf, "memory", detail={"reason": f"needs {mem.gpus} GPUs per replica"})
    kv_tokens = mem.kv_cache / kv_bytes_per_token(p.policy, p.rollout_dtype_bytes)
    # query generation (3.2): ceil(K / queries per call) short completions, then m responses per query
    calls = math.ceil(p.k / p.queries_per_generation)
    gen = _decode(p, calls, replicas, mem.gpus, kv_tokens, p.queries_per_generation * p.query_tokens, p.prompt_tokens)
    sample = _decode(p, p.responses, replicas, mem.gpus, kv_tokens, p.response_tokens, p.prompt_tokens)
    # prompts prefilled once per query (prefix caching shares them across the m samples)
    prefill = _prefill_seconds(p, (calls + p.k) * forward_flops(p.policy, p.prompt_tokens, 1), replicas * mem.gpus,
                               p.rollout_dtype_bytes)  # fmt: skip
    fixed = p.stage_overhead_s.get("rollout", 0.0)
    seconds = gen.seconds + sample.seconds + prefill + fixed
    return Stage(seconds, sample.bound, flops=gen.flops + sample.flops, bytes_read=gen.bytes_read + sample.bytes_read,
                 detail={"replicas": replicas, "tensor_parallel": mem.gpus, "kv_cache_tokens": int(kv_tokens),
                         "query_generation_s": gen.seconds, "sampling_s": sample.seconds, "prefill_s": prefill,
                         "fixed_s": fixed, **{k: v for k, v in sample.detail.items()}})  # fmt: skip


def _windows(length: int, window: int) -> list[int]:
    """Lengths of the strided sliding windows over ``length`` tokens (stride 3/4 of the window, as the reward)."""
    if length <= window:
        return [length]
    stride = max(1, window * 3 // 4)
    starts = range(0, length - window + stride, stride)
    return [min(window, length - s) for s in starts if s < length]


def reward_flops_per_response(p: PlanInputs) -> dict[str, float]:
    """Forward FLOPs to score one response: M_G and M_D over D (windows), the encoder over summary and D."""
    lm = {}
    for name, shape in (("general", p.general), ("domain", p.domain)):
        lm[name] = sum(forward_flops(shape, w) for w in _windows(p.doc_tokens, shape.window))
    enc_doc = min(p.doc_tokens, p.encoder.window)
    enc = forward_flops(p.encoder, enc_doc) + forward_flops(p.encoder, min(p.summary_tokens, p.encoder.window))
    enc += forward_flops(p.encoder, p.query_tokens) / p.m  # the query once per group
    return {**lm, "encoder": enc}


def reward_memory(p: PlanInputs) -> ServiceMemory:
    b = p.reward_dtype_bytes
    weights = sum(weight_bytes(s, b) for s in (p.general, p.domain, p.encoder))
    big = max((p.general, p.domain), key=lambda s: s.hidden)
    tokens = p.reward_batch_tokens
    # no grad: one block's tensors at a time (activation_bytes_per_token with one layer) + fp32 logits of a chunk
    layer = activation_bytes_per_token(replace(big, layers=1), checkpointing=False, dtype_bytes=b)
    logits = 2 * min(p.logits_chunk, tokens) * big.vocab * 4  # logits + cross-entropy's fp32 copy
    gpus = max(1, math.ceil((weights + tokens * layer + logits + RUNTIME_RESERVE_BYTES) / p.device.memory))
    return ServiceMemory(weights=weights, activations=tokens * layer + logits, reserve=RUNTIME_RESERVE_BYTES, gpus=gpus)


def reward_stage(p: PlanInputs, gpus: int, responses: int | None = None) -> Stage:
    mem = reward_memory(p)
    workers = gpus // mem.gpus
    if workers < 1:
        return Stage(math.inf, "memory", detail={"reason": f"M_G + M_D + encoder need {mem.gpus} GPUs"})
    n = p.responses if responses is None else responses
    parts = reward_flops_per_response(p)
    flops = n * sum(parts.values())
    seconds = _prefill_seconds(p, flops, workers * mem.gpus, p.reward_dtype_bytes)
    fixed = p.stage_overhead_s.get("reward", 0.0) if responses is None else 0.0
    return Stage(seconds + fixed, "compute", flops=flops,
                 detail={"workers": workers, "tokens": n * p.doc_tokens * 2, "fixed_s": fixed,
                         **{f"{k}_s": _prefill_seconds(p, n * v, workers * mem.gpus, p.reward_dtype_bytes)
                            for k, v in parts.items()}})  # fmt: skip


def trainer_memory(p: PlanInputs) -> ServiceMemory:
    b = p.trainer_dtype_bytes
    weights = weight_bytes(p.policy, b, nf4=p.qlora)
    trainable = lora_params(p.policy, p.lora_rank, p.lora_modules)
    tokens = max(p.micro_batch_tokens, p.sequence_tokens)
    acts = tokens * activation_bytes_per_token(p.policy, p.gradient_checkpointing, b)
    logits = 2 * tokens * p.policy.vocab * 4  # fp32 logits and their gradient
    return ServiceMemory(weights=weights + 4 * trainable, activations=acts + logits,
                         optimizer=optimizer_bytes(trainable) - 4 * trainable, reserve=RUNTIME_RESERVE_BYTES)  # fmt: skip


def trainer_flops(p: PlanInputs) -> dict[str, float]:
    fwd = forward_flops(p.policy, p.sequence_tokens)
    n = p.responses
    factor = TRAIN_FLOPS_FACTOR_CHECKPOINTING if p.gradient_checkpointing else TRAIN_FLOPS_FACTOR_NO_CHECKPOINTING
    return {
        "reference": 2 * n * fwd,  # samples + mismatched KL pairs, adapter disabled, once per iteration
        "kl_policy": p.epochs * n * fwd,  # z_ref: no-grad policy pass over the KL pairs (eq. 12)
        "train": p.epochs * n * fwd * factor,  # forward + backward with LoRA
    }


def trainer_stage(p: PlanInputs, gpus: int) -> Stage:
    mem = trainer_memory(p)
    if not mem.fits(p.device):
        return Stage(math.inf, "memory", detail={"reason": "the policy does not fit one GPU (ZeRO-3 is not modelled)"})
    ranks = min(gpus, p.batch_size)  # data parallel: a rank needs at least one sample of the batch
    d = p.device
    parts = trainer_flops(p)
    slow = QLORA_SLOWDOWN if p.qlora else 1.0
    no_grad_rate = d.prefill_rate(p.trainer_dtype_bytes) * ranks
    no_grad = (parts["reference"] + parts["kl_policy"]) / no_grad_rate * slow
    train = parts["train"] / (d.train_rate(p.trainer_dtype_bytes) * ranks) * slow
    steps = p.epochs * math.ceil(p.responses / p.batch_size)
    fixed = p.stage_overhead_s.get("trainer", 0.0) + steps * p.trainer_step_overhead_s
    return Stage(no_grad + train + fixed, "compute", flops=sum(parts.values()),
                 detail={"ranks": ranks, "reference_s": parts["reference"] / no_grad_rate * slow,
                         "train_s": train, "kl_policy_s": parts["kl_policy"] / no_grad_rate * slow,
                         "optimizer_steps": steps, "qlora_slowdown": slow, "fixed_s": fixed})  # fmt: skip


def swap_stage(p: PlanInputs) -> Stage:
    adapter = lora_params(p.policy, p.lora_rank, p.lora_modules) * 4  # PEFT saves the fp32 adapter
    seconds = 2 * adapter / STORAGE_BANDWIDTH + SWAP_FIXED_S + p.stage_overhead_s.get("swap", 0.0)
    return Stage(seconds, "overhead", bytes_read=2 * adapter, detail={"adapter_bytes": adapter})


def eval_stage(p: PlanInputs, rollout_gpus: int, reward_gpus: int) -> Stage:
    mem = rollout_memory(p)
    replicas = rollout_gpus // mem.gpus
    if replicas < 1:
        return Stage(math.inf, "memory")
    kv_tokens = mem.kv_cache / kv_bytes_per_token(p.policy, p.rollout_dtype_bytes)
    gen = _decode(p, p.eval_queries, replicas, mem.gpus, kv_tokens, p.response_tokens, p.prompt_tokens)
    score = reward_stage(p, reward_gpus, responses=p.eval_queries)
    fixed = p.stage_overhead_s.get("eval", 0.0)
    return Stage(gen.seconds + score.seconds + fixed, gen.bound, flops=gen.flops + score.flops,
                 detail={"decode_s": gen.seconds, "score_s": score.seconds, "fixed_s": fixed, "batch": gen.detail.get("batch")})  # fmt: skip


STAGES = ("rollout", "reward", "trainer", "swap", "eval")


def iteration_stages(p: PlanInputs, split: tuple[int, int, int]) -> dict[str, Stage]:
    """Per-stage seconds of one iteration for a (rollout, reward, trainer) GPU split."""
    g_r, g_w, g_t = split
    return {"rollout": rollout_stage(p, g_r), "reward": reward_stage(p, g_w), "trainer": trainer_stage(p, g_t),
            "swap": swap_stage(p), "eval": eval_stage(p, g_r, g_w)}  # fmt: skip


def iteration_seconds(p: PlanInputs, split: tuple[int, int, int]) -> float:
    return sum(s.seconds for s in iteration_stages(p, split).values())


def splits(gpus: int) -> list[tuple[int, int, int]]:
    """Every (rollout, reward, trainer) split of ``gpus`` with at least one GPU each."""
    return [(r, w, gpus - r - w) for r in range(1, gpus - 1) for w in range(1, gpus - r)]


def best_split(p: PlanInputs) -> tuple[tuple[int, int, int], float]:
    """The split of ``p.gpus`` that minimises the iteration time (stages run one after another)."""
    if p.gpus < 3:
        raise ValueError("the split needs at least 3 GPUs (one per service); with fewer, services share them (shared_split)")
    scored = [(iteration_seconds(p, s), s) for s in splits(p.gpus)]
    seconds, split = min(scored, key=lambda item: (item[0], item[1]))
    return split, seconds


def time_shared_seconds(p: PlanInputs) -> float:
    """Lower bound: every stage on all GPUs (services swapped in and out of the same GPUs)."""
    return iteration_seconds(p, (p.gpus, p.gpus, p.gpus))


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    inputs: PlanInputs
    split: tuple[int, int, int]
    stages: dict[str, Stage]
    memory: dict[str, ServiceMemory]
    growth: list[dict[str, Any]]
    time_shared_s: float | None

    @property
    def iteration_s(self) -> float:
        return sum(s.seconds for s in self.stages.values())

    @property
    def critical_path(self) -> list[str]:
        return list(STAGES)  # semi-online: each stage waits for the one before

    @property
    def dominant(self) -> str:
        return max(self.stages, key=lambda k: self.stages[k].seconds)

    def summary(self) -> dict[str, Any]:
        p = self.inputs
        return {
            "device": p.device.name, "gpus": p.gpus,
            "models": {"policy": p.policy.name, "general": p.general.name, "domain": p.domain.name, "encoder": p.encoder.name},
            "params": {"policy": p.policy.params, "general": p.general.params, "domain": p.domain.params,
                       "encoder": p.encoder.params, "lora": lora_params(p.policy, p.lora_rank, p.lora_modules)},
            "k": p.k, "m": p.m, "doc_tokens": p.doc_tokens, "iterations": p.iterations,
            "stages_s": {k: _round(v.seconds) for k, v in self.stages.items()},
            "bounds": {k: v.bound for k, v in self.stages.items()},
            "iteration_s": _round(self.iteration_s), "run_s": _round(self.iteration_s * p.iterations),
            "memory_gb": {k: {"total": _round(v.total / GB), "weights": _round(v.weights / GB), "kv_cache": _round(v.kv_cache / GB),
                              "activations": _round(v.activations / GB), "optimizer": _round(v.optimizer / GB),
                              "gpus_per_instance": v.gpus, "fits": v.fits(p.device)} for k, v in self.memory.items()},
            "critical_path": self.critical_path, "dominant_stage": self.dominant,
            "best_split": {"rollout": self.split[0], "reward": self.split[1], "trainer": self.split[2]},
            "colocated": len(set(self.split)) == 1 and self.split[0] == p.gpus,
            "gpu_memory_utilization": p.gpu_memory_utilization,
            "time_shared_lower_bound_s": None if self.time_shared_s is None else _round(self.time_shared_s),
            "growth": self.growth,
        }  # fmt: skip


def _round(x: float) -> float | None:
    if x is None or math.isinf(x):
        return None
    return float(f"{x:.4g}")


def growth_table(p: PlanInputs, split: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Iteration seconds as K, m and the document length change one at a time (same split)."""
    rows = []
    for name, values in (("k", (p.k // 2, p.k, p.k * 2)), ("m", (4, 8, 16)), ("doc_tokens", (p.doc_tokens // 2, p.doc_tokens, p.doc_tokens * 2))):  # fmt: skip
        for v in values:
            q = replace(p, **{name: max(1, v)})
            stages = iteration_stages(q, split)
            rows.append({"vary": name, "value": max(1, v), "iteration_s": _round(sum(s.seconds for s in stages.values())),
                         **{f"{k}_s": _round(s.seconds) for k, s in stages.items()}})  # fmt: skip
    return rows


def make_plan(p: PlanInputs, split: tuple[int, int, int] | None = None) -> Plan:
    """The plan for a fixed split, or the best one of ``p.gpus`` GPUs."""
    if split is None:
        split = best_split(p)[0] if p.gpus >= 3 and p.device.kind == "gpu" else shared_split(p)
    if p.device.kind == "gpu" and split == shared_split(p):
        p = replace(p, gpu_memory_utilization=colocated_vllm_share(p))
    stages = iteration_stages(p, split)
    memory = {"rollout": rollout_memory(p), "reward": reward_memory(p), "trainer": trainer_memory(p)}
    shared = time_shared_seconds(p) if p.gpus >= 3 and p.device.kind == "gpu" else None
    return Plan(p, split, stages, memory, growth_table(p, split), shared)


def _fmt_s(x: float) -> str:
    if math.isinf(x):
        return "does not fit"
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.3g} s"


def markdown(plan: Plan) -> str:
    p, d = plan.inputs, plan.inputs.device
    g_r, g_w, g_t = plan.split
    lines = [
        f"## Capacity plan: {p.device.name} x {p.gpus}", "",
        (f"policy {p.policy.name} ({p.policy.params / 1e9:.3g}B), M_G {p.general.name}, M_D {p.domain.name}, "
         f"encoder {p.encoder.name} ({p.encoder.params / 1e6:.0f}M); K={p.k}, m={p.m} ({p.responses} responses), "
         f"prompt {p.prompt_tokens} + response {p.response_tokens} tokens (document {p.doc_tokens}); "
         f"LoRA r={p.lora_rank} ({lora_params(p.policy, p.lora_rank, p.lora_modules) / 1e6:.1f}M), "
         f"{'QLoRA nf4' if p.qlora else ('bf16' if p.trainer_dtype_bytes == 2 else 'fp32') + ' LoRA'}, "
         f"{p.iterations} iterations for {p.total_queries} queries."), "",
        "| stage | GPUs | time | bound | detail |", "|---|---|---|---|---|",
    ]  # fmt: skip
    gpus = {"rollout": g_r, "reward": g_w, "trainer": g_t, "swap": "-", "eval": f"{g_r}+{g_w}"}
    for name, st in plan.stages.items():
        detail = ", ".join(f"{k}={_short(v)}" for k, v in st.detail.items() if k in _DETAIL_KEYS)
        lines.append(f"| {name} | {gpus[name]} | {_fmt_s(st.seconds)} | {st.bound} | {detail} |")
    lines.append(f"| **iteration** | {p.gpus} | **{_fmt_s(plan.iteration_s)}** | critical path: "
                 f"{' -> '.join(plan.critical_path)} | dominant: {plan.dominant}; run of {p.iterations}: "
                 f"{_fmt_s(plan.iteration_s * p.iterations)} |")  # fmt: skip
    if g_r == g_w == g_t == p.gpus and d.kind == "gpu":
        lines.append(f"\nColocated: rollout, reward and trainer share each of the {p.gpus} GPU(s); vLLM gets "
                     f"--gpu-memory-utilization {p.gpu_memory_utilization:.2f} (what reward and trainer leave, less 2%).")  # fmt: skip
    if plan.time_shared_s is not None:
        lines.append(f"\nLower bound with every stage on all {p.gpus} GPUs (services time-sharing them): "
                     f"{_fmt_s(plan.time_shared_s)} per iteration.")  # fmt: skip
    lines += ["", "| service (per instance) | GPUs | weights | KV cache | activations | optimizer | total | fits |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, mem in plan.memory.items():
        lines.append(f"| {name} | {mem.gpus} | {mem.weights / GB:.1f} GB | {mem.kv_cache / GB:.1f} GB | "
                     f"{mem.activations / GB:.2f} GB | {mem.optimizer / GB:.2f} GB | {mem.total / GB:.1f} GB | "
                     f"{'yes' if mem.fits(p.device) else 'no'} ({p.device.memory * mem.gpus / GB:.0f} GB) |")  # fmt: skip
    lines += ["", "| vary | value | iteration | rollout | reward | trainer | eval |", "|---|---|---|---|---|---|---|"]
    for row in plan.growth:
        lines.append(f"| {row['vary']} | {row['value']} | {_fmt_s(row['iteration_s'] or math.inf)} | "
                     + " | ".join(_fmt_s(row[f'{k}_s'] or math.inf) for k in ("rollout", "reward", "trainer", "eval")) + " |")  # fmt: skip
    lines += ["", "Assumptions (constants in services/orchestrator/plan.py, with their sources):",
              f"- peak {d.peak_flops / 1e12:.4g} TFLOP/s bf16 dense"
              + (f", {d.peak_flops_fp32 / 1e12:.4g} fp32" if d.peak_flops_fp32 else "")
              + f", {d.bandwidth / 1e9:.4g} GB/s, {d.memory / GB:.4g} GB;",
              f"- prefill {d.prefill_mfu:.0%} and training {d.train_mfu:.0%} of peak"
              + (f" (fp32: {d.prefill_mfu_fp32:.0%} and {d.train_mfu_fp32:.0%})" if d.prefill_mfu_fp32 else "")
              + (f"; decode {d.decode_bw_util:.0%} of bandwidth + {d.decode_step_overhead_s * 1e3:.3g} ms per step"
                 f" + {d.decode_seq_overhead_s * 1e6:.3g} us per sequence per step;"),
              (f"- training = {TRAIN_FLOPS_FACTOR_CHECKPOINTING if p.gradient_checkpointing else TRAIN_FLOPS_FACTOR_NO_CHECKPOINTING:g} x forward "
               f"(2P fwd + 2P bwd, frozen base{' + 2P recompute' if p.gradient_checkpointing else ''}); reference pass over samples and "
               f"KL pairs once; QLoRA x{QLORA_SLOWDOWN if p.qlora else 1.0} (nf4 dequantization);"),
              ("- all responses parsed, all the same length; stages sequential; data-parallel replicas scale linearly "
               "(no tensor-parallel or all-reduce cost);"),
              f"- swap: fp32 adapter written and read at {STORAGE_BANDWIDTH / GB:g} GB/s + {SWAP_FIXED_S} s."]  # fmt: skip
    return "\n".join(lines)


_DETAIL_KEYS = ("replicas", "tensor_parallel", "batch", "waves", "step_ms", "workers", "ranks", "reference_s",
                "train_s", "general_s", "encoder_s", "decode_s", "score_s", "adapter_bytes", "fixed_s")  # fmt: skip


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- the demo's setting


# `grace demo` (services/orchestrator/demo.py): K=16, m=8, 3 iterations, 24 held-out queries; the rollout serves the
# tiny model in fp32, the trainer trains fp32 LoRA rank 16 for 2 epochs without checkpointing (CPU), the
# reward runs bf16 where the CPU has native bf16. Token counts: means over data/ in the tiny tokenizer
# (chat prompt of a seed query 248; an SFT response 514, of which the <answer> document 446).
DEMO_SETTINGS: dict[str, Any] = {
    "k": 16, "m": 8, "total_queries": 48, "prompt_tokens": 250, "doc_tokens": 450, "summary_tokens": 65,
    "query_tokens": 94, "lora_rank": 16, "qlora": False, "gradient_checkpointing": False, "epochs": 2,
    "eval_queries": 24, "rollout_dtype_bytes": 4, "trainer_dtype_bytes": 4, "reward_dtype_bytes": 2, "gpus": 1,
}  # fmt: skip


def shared_split(p: PlanInputs) -> tuple[int, int, int]:
    """Fewer than 3 GPUs (or a CPU): the services share every device, each stage using all of it in turn."""
    return (p.gpus, p.gpus, p.gpus)


def colocated_vllm_share(p: PlanInputs) -> float:
    """vLLM's --gpu-memory-utilization when reward and trainer share each GPU with it: what they leave, less 2%."""
    others = reward_memory(p).total + trainer_memory(p).total
    return max(0.0, round((p.device.memory - others) / p.device.memory - 0.02, 2))


def measured_stage_seconds(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """Iteration rows of a run's metrics.jsonl (`grace run` / `grace demo`): iteration and seconds."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "iteration":
            rows.append({"iteration": row["iteration"], "seconds": float(row["seconds"])})
    return rows
