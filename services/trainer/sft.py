"""`grace sft`: the SFT stage (paper 4.1) that makes the starting policy.

Fine-tunes on the project's tagged examples under the 3.1 system prompt, loss
on response tokens only, full-parameter (the paper's choice) or LoRA (then
merged). Writes a plain model folder (safetensors, tokenizer, chat template)
that vLLM serves and the trainer loads as its base. The RoPE setting is the
run's (``common:`` yarn_factor, native_window, rope_scope; ``SftOptions.rope``
is checked against it): YaRN is applied at load only with
``rope_scope=inference_and_training`` and never baked into the saved config.

Real models get the paper's defaults (one epoch). A model under 10M parameters
(the tiny preset) trains in rounds of 100 epochs on sections cut to random
16-token windows (answers to a random 16 to 128 tokens), the structure tags weighted 5x, until 90% of the answers it
samples for the seed queries (temperature 1, top-p 0.95, as the rollout
samples) parse: the demo's "SFT until the policy reliably emits the format".
It also learns the 3.2 query-generation turn, since in the demo the policy is
its own query generator (4 such turns per epoch, each a new draw).
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

from shared.cli_options import opt
from shared.jsonl import read_jsonl, read_queries
from shared.rope import RopeConfig, check_rope

log = logging.getLogger(__name__)

# Paper 4.1: full-parameter SFT, one epoch, lr 1e-6 (LoRA SFT: a LoRA-sized lr).
_PAPER = {"epochs": 1, "batch_size": 8, "section_tokens": 0, "answer_tokens": 0, "tag_weight": 1.0,
           "target_tag_rate": 0.0, "max_rounds": 1, "query_generation_examples": 0}  # fmt: skip
PAPER_DEFAULTS = {"full": {**_PAPER, "lr": 1e-6}, "lora": {**_PAPER, "lr": 1e-4}}
# Models under SMALL_MODEL_PARAMS (the local tiny preset) need far more updates, and short sections:
# such a model cannot write a coherent long document, so on full-length examples its greedy output loops
# inside <answer> and never closes it; on sections cut to 16 tokens (closing tags kept) it learns the format.
# Answers cut to a random 16-128 tokens (summary and outline 16) teach it answers of varied length, so the
# m answers of a group differ in L (sampled: 4 to 118 tokens, median 25, where fixed 16-token answers gave ~15).
SMALL_MODEL_PARAMS = 10_000_000
_SMALL = {"epochs": 100, "lr": 1e-2, "batch_size": 4, "section_tokens": 16, "answer_tokens": 128, "tag_weight": 5.0,
          "target_tag_rate": 0.9, "max_rounds": 2, "query_generation_examples": 4}  # fmt: skip
SMALL_MODEL_DEFAULTS = {"full": _SMALL, "lora": _SMALL}  # the same for both modes


@dataclass(kw_only=True)
class SftOptions:
    data: Path = opt(Path("data/sft.jsonl"), "jsonl with 'query' and a tagged 'response'")
    out: Path = opt(..., "folder of the starting policy (merged model + tokenizer, safetensors)")
    base: str | None = opt(None, "base model folder (default: GRACE_TRAINER_POLICY_MODEL or the tiny policy)")
    mode: str = opt("full", "full (all parameters, the paper's SFT) or lora (merged after training)")
    # None = the default for the model's size (PAPER_DEFAULTS or SMALL_MODEL_DEFAULTS)
    epochs: int | None = opt(None, "passes over the data (default: 1 as the paper; 50 for models under 10M parameters)")
    lr: float | None = opt(None, "peak learning rate (default: 1e-6 full / 1e-4 LoRA as the paper; 1e-2 under 10M parameters)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    batch_size: int | None = opt(None, "examples per step (default: 8; 4 under 10M parameters)")
    max_length: int = opt(2048, "longest example in tokens (longer responses are cut)")
    section_tokens: int | None = opt(None, "cut each tagged section to N tokens (0 = off; default: 16 for models under 10M "
                                     "parameters, else off)")  # fmt: skip
    answer_tokens: int | None = opt(None, "cut answers to a random length up to N tokens, >= --section-tokens (default: off; "
                                    "128 under 10M parameters)")  # fmt: skip
    # the end of turn is weighted as a tag
    tag_weight: float | None = opt(None, "loss weight of the structure tags (default: 1; 5 under 10M parameters)")
    target_tag_rate: float | None = opt(None, "train in rounds until this share of sampled seed-query answers parses "
                                        "(default: off; 0.9 under 10M parameters)")  # fmt: skip
    max_rounds: int | None = opt(None, "most rounds of --epochs epochs (default: 1; 2 under 10M parameters)")
    # a turn: the 3.2 prompt on seed queries -> a one-line list holding an SFT query (the tiny policy generates the demo's)
    query_generation_examples: int | None = opt(None, "3.2 query-generation turns per epoch (default: 0; 4 under 10M "
                                                "parameters, the demo's generator)")  # fmt: skip
    seed: int = 0
    # the run's RoPE setting (RunConfig.rope) to check the trainer settings against; None = not checked
    rope: RopeConfig | None = opt(
        None, 'the run\'s RoPE setting to check against, as JSON ({"yarn_factor", "native_window", "scope"})', cli_type=str,
        parse=lambda v: RopeConfig.model_validate_json(v) if v else None)  # fmt: skip
    min_lr_ratio: float = opt(0.1, cli=False)
    warmup_ratio: float = opt(0.1, cli=False)
    seed_queries: Path = opt(Path("data/seed_queries.jsonl"), cli=False)  # the rollout's seed set: probe and generation prompts
    probe_size: int = opt(48, cli=False)
    run_id: str = opt("sft", cli=False)


def load_examples(path: Path) -> list[tuple[str, str]]:
    rows = [(row["query"], row["response"]) for row in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def condense(response: str, tokenizer: Any, max_tokens: int, rng: random.Random | None = None,
             answer_tokens: int = 0) -> str:  # fmt: skip
    """The tagged response with each section cut to ``max_tokens`` tokens (tags kept); untagged: unchanged.

    Without ``rng`` the first tokens of each section are kept; with it, a random window of each
    section, so every epoch shows new content in the same format. ``answer_tokens`` > ``max_tokens``
    (with ``rng``): the answer's window is a random length in [max_tokens, answer_tokens], so the
    policy learns answers of varied length, and sampled groups differ in L.
    """
    from shared.parsing import extract_structured

    parts = extract_structured(response)
    if parts is None or max_tokens <= 0:
        return response

    def cut(text: str, length: int = max_tokens) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = rng.randrange(len(ids) - length + 1) if rng is not None and len(ids) > length else 0
        return tokenizer.decode(ids[start : start + length], skip_special_tokens=True).strip() or text[:1]

    answer_length = rng.randint(max_tokens, answer_tokens) if rng is not None and answer_tokens > max_tokens else max_tokens
    return (f"<summary>{cut(parts.summary)}</summary><outline>{cut(parts.outline)}</outline>"
            f"<answer>{cut(parts.answer, answer_length)}</answer>")  # fmt: skip


def _single_token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Ids of those ``tokens`` the vocabulary holds as one token (the tiny tokenizer has the tags as tokens)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def run_sft(opts: SftOptions) -> dict[str, Any]:
    """Trains in rounds of ``epochs`` epochs until the sampled tag rate on the probe queries reaches
    the target, ``max_rounds`` or ``max_steps``; saves the round with the best rate. The first round follows a cosine
    schedule from ``lr`` to ``lr * min_lr_ratio``; later rounds continue at the final rate (a warm
    restart to the peak measurably undid the format on the tiny policy)."""
    import torch

    from services.trainer.config import TrainerSettings
    from services.trainer.model import load_base, load_tokenizer, lora_config, model_config, resolve_runtime
    from services.trainer.train import Encoder, Trainer
    from shared.tiny_models import STRUCTURE_TAGS

    if opts.mode not in PAPER_DEFAULTS:
        raise ValueError(f"mode must be full or lora, not {opts.mode!r}")
    settings = TrainerSettings(**({"policy_model": opts.base} if opts.base else {}))
    check_rope(opts.run_id, opts.rope, settings.rope(), "SFT stage")  # one RoPE setting per run (paper 3.6)
    runtime = resolve_runtime(settings.model_copy(update={"quantization": "none"}))  # SFT trains full weights
    base = settings.policy_path()
    tokenizer = load_tokenizer(base)
    model = load_base(base, runtime, settings.rope())  # YaRN only with rope_scope=inference_and_training
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    defaults = (SMALL_MODEL_DEFAULTS if small else PAPER_DEFAULTS)[opts.mode]
    chosen = {k: getattr(opts, k) if getattr(opts, k) is not None else v for k, v in defaults.items()}
    epochs, lr, section_tokens = chosen["epochs"], chosen["lr"], chosen["section_tokens"]
    if opts.mode == "lora":
        from peft import get_peft_model

        torch.manual_seed(opts.seed)
        model = get_peft_model(model, lora_config(settings.model_copy(update={"lora_rank": 16, "lora_alpha": 32})))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    examples = load_examples(opts.data)
    probe = probe_queries(opts.seed_queries, opts.probe_size) if chosen["target_tag_rate"] else []
    generation = QueryGenerationExamples(opts.seed_queries, [q for q, _ in examples], chosen["query_generation_examples"])
    encode = Encoder(tokenizer, opts.max_length)
    rng = random.Random(opts.seed)
    tag_ids = torch.tensor(_single_token_ids(tokenizer, [*STRUCTURE_TAGS, tokenizer.eos_token]), device=runtime.device)

    def token_weights(targets: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isin(targets, tag_ids), chosen["tag_weight"], 1.0)

    started = time.perf_counter()
    losses: list[float] = []
    rounds: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (-1.0, -1, None)  # (tag rate, round, weights)
    torch.manual_seed(opts.seed)
    optimizer_state = None
    for round_index in range(chosen["max_rounds"]):
        steps_left = opts.max_steps - len(losses) if opts.max_steps else None
        plan = _plan_round(examples, generation, encode, tokenizer, rng, epochs, chosen["batch_size"], section_tokens,
                           opts.seed + round_index * epochs, steps_left, chosen["answer_tokens"])  # fmt: skip
        # the schedule of the docstring on the trainer's epoch loop; the AdamW state carries over between rounds
        final = lr * opts.min_lr_ratio
        peak, warmup = (lr, opts.warmup_ratio) if round_index == 0 else (final, 0.0)
        schedule = {"learning_rate": peak, "min_learning_rate": final, "warmup_ratio": warmup}
        trainer = Trainer(model, tokenizer, settings.model_copy(update=schedule), runtime, "sft", optimizer_state=optimizer_state)
        round_losses = [row["loss"] for row in trainer.train_plan(plan, token_weights).metrics]
        optimizer_state = trainer.optimizer_state_dict()
        losses += round_losses
        rate = (
            sampled_tag_rate(model, tokenizer, probe, _probe_tokens(section_tokens, chosen["answer_tokens"]), opts.seed)
            if probe
            else None
        )
        rounds.append(
            {"round": round_index + 1, "steps": len(plan), "loss": round_losses[-1] if plan else None, "tag_rate": rate}
        )
        log.info("event=sft_round round=%d steps=%d loss=%s tag_rate=%s target=%s", round_index + 1, len(plan),
                 rounds[-1]["loss"], rate, chosen["target_tag_rate"])  # fmt: skip
        if rate is not None and rate > best[0]:  # the best round so far (a later round may lose the format again)
            best = (rate, round_index, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if rate is None or rate >= chosen["target_tag_rate"] or (opts.max_steps and len(losses) >= opts.max_steps):
            break
    else:
        log.warning("event=sft_tag_rate_below_target best_tag_rate=%s target=%s rounds=%d", best[0],
                    chosen["target_tag_rate"], len(rounds))  # fmt: skip
    if best[2] is not None and best[1] != len(rounds) - 1:
        model.load_state_dict(best[2])
        log.info("event=sft_best_round round=%d tag_rate=%s", best[1] + 1, best[0])
    seconds = time.perf_counter() - started
    if opts.mode == "lora":
        model = model.merge_and_unload()
    native = model_config(base, None)  # the saved config stays native: YaRN is a serving-time choice
    model.config.rope_parameters = native.rope_parameters
    model.config.max_position_embeddings = native.max_position_embeddings
    model.config.use_cache = True
    summary = {"base": str(base), "mode": opts.mode, **chosen, "steps": len(losses), "examples": len(examples),
               "rounds": rounds, "tag_rate": rounds[best[1]]["tag_rate"] if best[2] is not None else rounds[-1]["tag_rate"],
               "kept_round": (best[1] if best[2] is not None else len(rounds) - 1) + 1, "first_loss": losses[0] if losses else float("nan"),
               "final_loss": losses[-1] if losses else float("nan"), "seconds": round(seconds, 2)}  # fmt: skip
    _save_policy(model, tokenizer, Path(opts.out), summary)
    log.info("event=sft_done out=%s %s", opts.out, " ".join(f"{k}={v}" for k, v in summary.items() if k != "rounds"))
    return {"out": str(opts.out), **summary}


def _plan_round(examples: list[tuple[str, str]], generation: QueryGenerationExamples, encode: Any, tokenizer: Any,
                rng: random.Random, epochs: int, batch_size: int, section_tokens: int, seed: int,
                max_steps: int | None, answer_tokens: int = 0) -> list[list[Any]]:  # fmt: skip
    """The sequences of each step of one round; condensed examples draw new section windows every epoch,
    query-generation turns new examples and targets."""
    from services.trainer.batching import plan_batches

    plan: list[list[Any]] = []
    for epoch in range(epochs):
        if epoch == 0 or section_tokens or generation.per_epoch:
            seqs = [
                encode(q, condense(r, tokenizer, section_tokens, rng, answer_tokens) if section_tokens else r)
                for q, r in examples
            ]
            seqs += [encode("", target, messages) for messages, target in generation.draw(rng)]
        plan += [[seqs[i] for i in batch] for batch in plan_batches(len(seqs), batch_size, seed + epoch)]
        if max_steps and len(plan) >= max_steps:
            return plan[:max_steps]
    return plan


class QueryGenerationExamples:
    """SFT turns for the 3.2 prompt: five seed queries as examples -> a list holding one training query.

    The target is written as the rollout constrains the generator's output (one line, no ``"`` or ``\\``:
    see the orchestrator's ``query_list_regex``).
    """

    def __init__(self, seed_queries: Path, targets: list[str], per_epoch: int):
        from shared.queries import load_queries

        self.per_epoch = per_epoch
        self.seeds = load_queries(seed_queries) if per_epoch else []
        self.targets = targets

    def draw(self, rng: random.Random) -> list[tuple[list[dict[str, str]], str]]:
        from shared.prompts import query_generation_prompt
        from shared.queries import prompt_lang, sample_examples

        turns = []
        for _ in range(self.per_epoch):
            examples = sample_examples(self.seeds, rng)
            prompt = query_generation_prompt([e.query for e in examples], prompt_lang(examples))
            target = " ".join(rng.choice(self.targets).replace('"', "").replace("\\", "").split())
            turns.append(([{"role": "user", "content": prompt}], json.dumps([target], ensure_ascii=False)))
        return turns


def probe_queries(path: Path, limit: int) -> list[str]:
    """``limit`` queries spread evenly over a query file (the rollout's format; the SFT probe set)."""
    rows = read_queries(path)
    queries = [row["query"] for row in rows][:: max(1, len(rows) // max(limit, 1))][:limit]
    if not queries:
        raise ValueError(f"{path}: no queries to probe the tag rate with")
    return queries


def _probe_tokens(section_tokens: int, answer_tokens: int = 0) -> int:
    """New tokens a probe answer may take: 8x room for the three sections, so a looping section fails to close."""
    return 8 * (2 * section_tokens + max(section_tokens, answer_tokens)) if section_tokens else 2048


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


def sample_answers(model: Any, tokenizer: Any, queries: list[str], max_new_tokens: int, seed: int = 0,
                   temperature: float = 1.0, top_p: float = 0.95) -> list[str]:  # fmt: skip
    """One sampled answer per query under the 3.1 chat prompt, sampled as the rollout samples (temperature 1,
    top-p 0.95), not greedily: the iterations train on sampled responses."""
    import torch

    from shared.prompts import chat_messages

    model.eval()
    model.config.use_cache = True
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [tokenizer.apply_chat_template(chat_messages(q), add_generation_prompt=True, tokenize=False) for q in queries]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(next(model.parameters()).device)
    tokenizer.padding_side = side
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                             top_k=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.config.use_cache = False
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def sampled_tag_rate(model: Any, tokenizer: Any, queries: list[str], max_new_tokens: int, seed: int = 0) -> float:
    """Share of ``queries`` whose sampled answer (``sample_answers``) ``extract_structured`` parses."""
    from shared.parsing import extract_structured

    answers = sample_answers(model, tokenizer, queries, max_new_tokens, seed)
    return sum(extract_structured(a) is not None for a in answers) / max(len(answers), 1)
