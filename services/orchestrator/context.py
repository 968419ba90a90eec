"""`grace eval context`: Table 3, context-window extension methods compared.

For each method (no scaling = extrapolation, dynamic NTK, YaRN; paper 3.6 and
Table 3) and each window f x N (N = the model's native window):

- PPL: perplexity of long texts of f x N tokens built from ``data/`` files, in
  one forward pass each (the whole window in context);
- #Tokens: how many tokens the model generates for the test queries before it
  stops, with room up to the window.

Runs with transformers directly on the policy model; the rope scaling is set
through ``rope_parameters`` as vLLM is given it (``yarn`` like the rollout service).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.orchestrator.options import default_out
from shared.cli_options import opt
from shared.jsonl import read_jsonl
from shared.rope import yarn_parameters

log = logging.getLogger(__name__)

METHODS = {"extrapolation": "Extrapolation", "dynamic": "Dynamic NTK", "yarn": "YaRN"}
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def rope_setup(method: str, factor: float, native: int, rope_theta: float) -> tuple[dict, int]:
    """(rope_parameters, max_position_embeddings) for ``method`` at ``factor`` x the native window ``native``.

    At 1x every method is the unscaled model. Dynamic NTK scales the base once a
    sequence outgrows ``max_position_embeddings``, so that stays ``native``;
    YaRN interpolates from ``original_max_position_embeddings`` up to factor x native.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1 or method == "extrapolation":
        return {"rope_type": "default", "rope_theta": rope_theta}, native if factor == 1 else int(native * factor)
    if method == "dynamic":
        return {"rope_type": "dynamic", "factor": float(factor), "rope_theta": rope_theta}, native
    return yarn_parameters(factor, native, rope_theta), int(native * factor)


def text_sources(data_dir: Path = DATA_DIR) -> list[str]:
    """Documents for long texts: SFT responses, then the domain and general corpora (paragraphs)."""
    texts: list[str] = []
    sft = data_dir / "sft.jsonl"
    if sft.exists():
        texts += [f"{row.get('query', '')}\n{row.get('response', '')}".strip() for row in read_jsonl(sft)]
    for name in ("domain_corpus.txt", "general_corpus.txt"):
        path = data_dir / name
        if path.exists():
            texts += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [t for t in texts if t]


def long_token_sequences(token_docs: Sequence[Sequence[int]], length: int, count: int) -> tuple[list[list[int]], bool]:
    """``count`` sequences of exactly ``length`` tokens, documents joined in order, each starting at a
    different document; returns (sequences, repeated) where repeated says the corpus had to be cycled."""
    docs = [list(d) for d in token_docs if d]
    if not docs:
        raise ValueError("no text to build long sequences from")
    total = sum(len(d) for d in docs)
    repeated = total < length
    sequences = []
    for k in range(count):
        start = (k * len(docs)) // count
        seq: list[int] = []
        i = start
        while len(seq) < length:
            seq += docs[i % len(docs)]
            i += 1
        sequences.append(seq[:length])
    return sequences, repeated


def _methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown {unknown}; choose from {', '.join(METHODS)}")
    return methods


@dataclass
class ContextOptions:
    model: str | None = opt(None, "causal LM folder (default: policy_model, else the local model_preset set)")
    preset: Literal["tiny", "small"] | None = opt(None, "local model set when no model is given (default: model_preset)")
    out_dir: Path = opt(Path("runs/default/context"), "output folder (default: <run_root>/<run_id>/context-<time>)", "--out",
                        cli_default=None, parse=lambda v: v or default_out("context"))  # fmt: skip
    native_window: int | None = opt(None, "treat this as the native window N (default: the model's)")
    factors: list[float] = opt(help="windows as multiples of N", default_factory=lambda: [1.0, 2.0, 4.0], cli_type=str,
                               cli_default="1,2,4", parse=lambda v: [float(f) for f in v.split(",") if f.strip()])  # fmt: skip
    methods: list[str] = opt(help="extension methods", default_factory=lambda: list(METHODS), cli_type=str,
                             cli_default=",".join(METHODS), parse=_methods)  # fmt: skip
    texts: int = opt(2, "long texts per window for perplexity")
    prompts: int = opt(2, "test queries for the generated length")
    max_new_tokens: int | None = opt(None, "cap on generated tokens (default: up to the window)")
    queries: Path = opt(DATA_DIR / "test_queries.jsonl", "prompts for generation", cli_default=Path("data/test_queries.jsonl"))
    data_dir: Path = opt(DATA_DIR, cli=False)
    device: str = "auto"
    dtype: str = opt("auto", "auto | bf16 | fp32")  # auto = bf16 on CUDA, fp32 on CPU
    seed: int = opt(0, cli=False)
    temperature: float = opt(0.7, cli=False)
    top_p: float = opt(0.95, cli=False)

    def __post_init__(self) -> None:
        if not self.model:  # policy_model, else the local model set (preset, else model_preset)
            from shared.settings import ServiceSettings

            self.model = ServiceSettings(**({"model_preset": self.preset} if self.preset else {})).policy_path()


def _load(opts: ContextOptions, method: str, factor: float, native: int, theta: float):
    from transformers import AutoConfig, AutoModelForCausalLM

    from shared.devices import resolve_device, resolve_dtype

    rope, max_positions = rope_setup(method, factor, native, theta)
    config = AutoConfig.from_pretrained(opts.model)
    config.rope_parameters = rope
    config.max_position_embeddings = max_positions
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, cpu_bf16=False)
    model = AutoModelForCausalLM.from_pretrained(opts.model, config=config, dtype=dtype).to(device).eval()
    return model, device


def _perplexity(model, device, sequences: list[list[int]]) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.tensor([seq], device=device)
            out = model(input_ids=ids, labels=ids)  # mean NLL over len-1 predicted tokens
            nll += float(out.loss) * (len(seq) - 1)
            count += len(seq) - 1
    return math.exp(nll / count)


def _generated_tokens(model, tokenizer, device, prompts: list[str], window: int, opts: ContextOptions) -> float:
    import torch

    from shared.prompts import chat_messages

    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
    lengths = []
    for i, query in enumerate(prompts):
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(chat_messages(query), add_generation_prompt=True, return_dict=False)
        else:
            ids = tokenizer(query)["input_ids"]
        ids = list(ids[: window // 2])
        room = window - len(ids)
        if opts.max_new_tokens:
            room = min(room, opts.max_new_tokens)
        torch.manual_seed(opts.seed + i)
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=device), max_new_tokens=room, do_sample=True,
                temperature=opts.temperature, top_p=opts.top_p, eos_token_id=sorted(stop_ids) or None,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sorted(stop_ids) or [0])[0],
            )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        stop = next((k for k, t in enumerate(new) if t in stop_ids), None)
        lengths.append(len(new) if stop is None else stop)
    return sum(lengths) / len(lengths)


def run_context(opts: ContextOptions) -> list[dict]:
    """Measures every (method, factor); writes ``context.md`` (Table 3) and ``context.json``."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from services.orchestrator import report
    from shared.jsonl import read_queries
    from shared.tiny_models import native_window, yarn_rope_parameters

    hf_logging.disable_progress_bar()
    native = opts.native_window or native_window(opts.model)
    theta = yarn_rope_parameters(opts.model)["rope_theta"]
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    token_docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in text_sources(opts.data_dir)]
    prompts = [q["query"] for q in read_queries(opts.queries, opts.prompts)]
    results: list[dict] = []
    shared_1x: dict | None = None
    for factor in opts.factors:
        window = int(native * factor)
        sequences, repeated = long_token_sequences(token_docs, window, opts.texts)
        if repeated:
            log.warning("event=context_text_repeated window=%d corpus_tokens=%d", window, sum(map(len, token_docs)))
        for method in opts.methods:
            if factor == 1 and shared_1x is not None:  # every method is the unscaled model at 1x
                results.append({**shared_1x, "method": METHODS[method]})
                continue
            started = time.perf_counter()
            row = {"method": METHODS[method], "factor": factor, "window": window, "ppl": None, "tokens": None}
            try:
                model, device = _load(opts, method, factor, native, theta)
                row["ppl"] = _perplexity(model, device, sequences)
                row["tokens"] = _generated_tokens(model, tokenizer, device, prompts, window, opts)
                del model
            except (MemoryError, RuntimeError) as exc:
                if "out of memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                    raise
                row["error"] = "OOM"
            row["seconds"] = round(time.perf_counter() - started, 2)
            log.info("event=context_measured method=%s factor=%g ppl=%s tokens=%s seconds=%.1f",
                     method, factor, row["ppl"], row["tokens"], row["seconds"])  # fmt: skip
            results.append(row)
            if factor == 1:
                shared_1x = row
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report.context_table(results, opts.factors, native)
    (out / "context.md").write_text(
        f"# Context window extension (Table 3)\n\nmodel: `{opts.model}`, native window {native} tokens; "
        f"PPL over {opts.texts} texts per window, #Tokens over {len(prompts)} prompts.\n\n{table}"
    )
    (out / "context.json").write_text(json.dumps({"native_window": native, "results": results}, indent=2))
    return results
