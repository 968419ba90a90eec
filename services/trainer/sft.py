"""`grace sft`: the SFT stage (paper 4.1) that makes the starting policy.

Fine-tunes on the project's tagged examples under the 3.1 system prompt, loss
on response tokens only, full-parameter (the paper's choice) or LoRA (then
merged). Writes a plain model folder (safetensors, tokenizer, chat template)
that vLLM serves and the trainer loads as its base; YaRN is applied at load
time for training (as the rollout serves it) and never baked into the saved
config.

Defaults (measured on the tiny preset, 2 CPU cores): full-parameter, lr 2e-3,
6 epochs over the 44 examples (36 steps of 8) take the tiny policy from
untagged text to greedy outputs that ``extract_structured`` parses.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Paper 4.1: full-parameter SFT, one epoch, lr 1e-6 (LoRA SFT: a LoRA-sized lr).
PAPER_DEFAULTS = {
    "full": {"epochs": 1, "lr": 1e-6, "batch_size": 8, "section_tokens": 0},
    "lora": {"epochs": 1, "lr": 1e-4, "batch_size": 8, "section_tokens": 0},
}
# Models under SMALL_MODEL_PARAMS (the local tiny preset) need far more updates, and short sections:
# such a model cannot write a coherent long document, so on full-length examples its greedy output loops
# inside <answer> and never closes it; on sections cut to 16 tokens (closing tags kept) it learns the format.
SMALL_MODEL_PARAMS = 10_000_000
SMALL_MODEL_DEFAULTS = {
    "full": {"epochs": 50, "lr": 1e-2, "batch_size": 4, "section_tokens": 16},
    "lora": {"epochs": 50, "lr": 1e-2, "batch_size": 4, "section_tokens": 16},
}


@dataclass
class SftOptions:
    out: Path
    data: Path = Path("data/sft.jsonl")
    base: str | None = None
    mode: str = "full"
    # None = the default for the model's size (PAPER_DEFAULTS or SMALL_MODEL_DEFAULTS)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    section_tokens: int | None = None
    max_steps: int | None = None
    max_length: int = 2048
    seed: int = 0
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.1


def load_examples(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row["query"], row["response"]))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def condense(response: str, tokenizer: Any, max_tokens: int, rng: random.Random | None = None) -> str:
    """The tagged response with each section cut to ``max_tokens`` tokens (tags kept); untagged: unchanged.

    Without ``rng`` the first tokens of each section are kept; with it, a random window of each
    section, so every epoch shows new content in the same format.
    """
    from shared.parsing import extract_structured

    parts = extract_structured(response)
    if parts is None or max_tokens <= 0:
        return response

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = rng.randrange(len(ids) - max_tokens + 1) if rng is not None and len(ids) > max_tokens else 0
        return tokenizer.decode(ids[start : start + max_tokens], skip_special_tokens=True).strip() or text[:1]

    return (f"<summary>{cut(parts.summary)}</summary><outline>{cut(parts.outline)}</outline>"
            f"<answer>{cut(parts.answer)}</answer>")  # fmt: skip


def run_sft(opts: SftOptions) -> dict[str, Any]:
    from services.trainer.batching import cosine_lr, micro_batches, plan_batches
    from services.trainer.config import TrainerSettings
    from services.trainer.model import base_model_path, load_base, load_tokenizer, lora_config, model_config, resolve_runtime, sequence_logps
    from services.trainer.train import Encoder

    if opts.mode not in PAPER_DEFAULTS:
        raise ValueError(f"mode must be full or lora, not {opts.mode!r}")
    settings = TrainerSettings(**({"policy_model": opts.base} if opts.base else {}))
    runtime = resolve_runtime(settings.model_copy(update={"quantization": "none"}))  # SFT trains full weights
    base = base_model_path(settings)
    tokenizer = load_tokenizer(base)
    model = load_base(base, runtime, settings.yarn_factor)
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    defaults = (SMALL_MODEL_DEFAULTS if small else PAPER_DEFAULTS)[opts.mode]
    epochs = opts.epochs or defaults["epochs"]
    lr = opts.lr or defaults["lr"]
    batch_size = opts.batch_size or defaults["batch_size"]
    section_tokens = defaults["section_tokens"] if opts.section_tokens is None else opts.section_tokens
    if opts.mode == "lora":
        from peft import get_peft_model

        torch.manual_seed(opts.seed)
        model = get_peft_model(model, lora_config(settings.model_copy(update={"lora_rank": 16, "lora_alpha": 32})))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    examples = load_examples(opts.data)
    encode = Encoder(tokenizer, opts.max_length)
    rng = random.Random(opts.seed)
    # the sequences of each step; condensed examples draw new section windows every epoch
    plan: list[list[Any]] = []
    for epoch in range(epochs):
        if epoch == 0 or section_tokens:
            seqs = [encode(q, condense(r, tokenizer, section_tokens, rng) if section_tokens else r) for q, r in examples]
        plan += [[seqs[i] for i in batch] for batch in plan_batches(len(seqs), batch_size, opts.seed + epoch)]
        if opts.max_steps and len(plan) >= opts.max_steps:
            break
    if opts.max_steps:
        plan = plan[: opts.max_steps]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id or 0
    started = time.perf_counter()
    losses: list[float] = []
    model.train()
    torch.manual_seed(opts.seed)
    for step, batch in enumerate(plan):
        tokens = sum(seq.response_len for seq in batch)
        total = 0.0
        for group in micro_batches([len(seq.ids) for seq in batch], settings.micro_batch_tokens):
            logps = sequence_logps(model, [batch[g] for g in group], pad_id, runtime)
            loss = -logps.sum() / tokens  # token-mean NLL of the batch's responses
            loss.backward()
            total += float(loss.detach())
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, len(plan), lr, lr * opts.min_lr_ratio, opts.warmup_ratio)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        log.info("event=sft_step step=%d steps=%d loss=%.4f tokens=%d", step + 1, len(plan), total, tokens)
    seconds = time.perf_counter() - started
    if opts.mode == "lora":
        model = model.merge_and_unload()
    native = model_config(base, None)  # the saved config stays native: YaRN is a serving-time choice
    model.config.rope_parameters = native.rope_parameters
    model.config.max_position_embeddings = native.max_position_embeddings
    model.config.use_cache = True
    summary = {"base": str(base), "mode": opts.mode, "epochs": epochs, "lr": lr, "batch_size": batch_size, "steps": len(plan),
               "examples": len(examples), "section_tokens": section_tokens, "final_loss": losses[-1] if losses else float("nan"),
               "first_loss": losses[0] if losses else float("nan"), "seconds": round(seconds, 2)}  # fmt: skip
    _save_policy(model, tokenizer, Path(opts.out), summary)
    log.info("event=sft_done out=%s %s", opts.out, " ".join(f"{k}={v}" for k, v in summary.items()))
    return {"out": str(opts.out), **summary}


def _save_policy(model: Any, tokenizer: Any, out: Path, summary: dict[str, Any]) -> None:
    """Model + tokenizer into a temporary sibling, then renamed into place."""
    from transformers import GenerationConfig

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_state.json").write_text(json.dumps(summary, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def greedy_parse_rate(model_dir: str | Path, queries: list[str], max_new_tokens: int = 768, yarn_factor: float | None = 4.0) -> float:
    """Share of ``queries`` whose greedy answer ``extract_structured`` parses (the SFT acceptance check)."""
    from services.trainer.model import Runtime, load_base, load_tokenizer
    from shared.parsing import extract_structured
    from shared.prompts import chat_messages

    runtime = Runtime(torch.device("cpu"), torch.float32, False, False, "sdpa", False)
    tokenizer = load_tokenizer(model_dir)
    model = load_base(model_dir, runtime, yarn_factor).eval()
    model.config.use_cache = True
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(chat_messages(q), add_generation_prompt=True, tokenize=False) for q in queries]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(extract_structured(a) is not None for a in answers) / max(len(answers), 1)
