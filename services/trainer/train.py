"""One training epoch over an iteration's weighted samples (paper 3.5, 4.1).

GRACE-KTO step, for a random batch of 8:

1. reference log-probs of every sample and of its mismatched KL pair come from
   one pass over the iteration *before* training (adapter disabled, no grad);
2. z_ref: a no-grad policy pass over the batch's mismatched pairs (eq. 12);
3. the policy pass with gradients runs the batch as padding-free, length-sorted
   micro-batches, each adding its share of the batch-mean loss (eq. 11) plus
   mu x the SFT loss on positives;
4. one AdamW step under the cosine schedule.

Baselines share the machinery: binary ``kto`` (sign of W only), ``dpo`` and
``orpo`` on each group's best-vs-worst pair, ``sft`` on positives, and ``grpo``
(the online RL baseline: per-token clipped ratio to the sampling policy,
group-relative advantages from the rank-sum z-scores, no critic).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.trainer import losses
from services.trainer.batching import cosine_lr, mismatched_partners, plan_batches
from services.trainer.config import TrainerSettings
from services.trainer.model import Runtime, Sequence, response_token_logps, sequence_logps
from shared.packing import token_budget_batches as micro_batches
from shared.prompts import chat_messages
from shared.schemas import WeightedSample

log = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]
# (batch, this rank's part, batch size / world) -> (metrics row, tokens): one loss family's optimizer step
LossStep = Callable[[list[int], list[int], float], tuple[dict[str, Any], int]]


# --------------------------------------------------------------------------- tokenization


class Encoder:
    """Chat-template tokenization: prompt = 3.1 system prompt + query, response up to end of turn."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._prompts: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, query: str, messages: list[dict[str, str]] | None = None) -> list[int]:
        key = query if messages is None else json.dumps(messages)
        if key not in self._prompts:
            text = self.tokenizer.apply_chat_template(
                messages or chat_messages(query), add_generation_prompt=True, tokenize=False
            )
            self._prompts[key] = self._ids(text)
        return self._prompts[key]

    def __call__(self, query: str, response: str, messages: list[dict[str, str]] | None = None) -> Sequence:
        """``messages``: another prompt than the 3.1 system prompt + ``query`` (SFT's query-generation turns)."""
        prompt = self.prompt(query, messages)
        turns = (messages or chat_messages(query)) + [{"role": "assistant", "content": response}]
        full = self._ids(self.tokenizer.apply_chat_template(turns, tokenize=False))
        start = _common_prefix(prompt, full)  # where the response starts (tokens may merge at the boundary)
        response_ids = full[start:]
        eos = self.tokenizer.eos_token_id
        if eos in response_ids:  # the turn ends at eos, as sampling stops there
            response_ids = response_ids[: response_ids.index(eos) + 1]
        prompt_ids = full[:start]
        if len(prompt_ids) >= self.max_length // 2:  # keep room for the response: cut the prompt's left side
            prompt_ids = prompt_ids[-(self.max_length // 2) :]
        response_ids = response_ids[: max(self.max_length - len(prompt_ids), 1)]
        return Sequence(ids=prompt_ids + response_ids, prompt_len=len(prompt_ids))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def mismatched(matched: Sequence, other: Sequence, max_length: int) -> Sequence:
    """(x, y'): this sample's prompt with another sample's response (KTO's KL pair), cut to ``max_length``."""
    response = other.ids[other.prompt_len :][: max(max_length - matched.prompt_len, 1)]
    return Sequence(ids=matched.ids[: matched.prompt_len] + response, prompt_len=matched.prompt_len)


# --------------------------------------------------------------------------- optimizer


def deepspeed_config(path: str | Path, settings: TrainerSettings, micro_batch_size: int) -> dict[str, Any]:
    """A ZeRO config file with its "auto" fields filled from the settings (one micro-batch per rank per step)."""
    config = json.loads(Path(path).read_text())
    _, world = rank_world()
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world,
        "gradient_clipping": settings.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if "optimizer" not in config:  # ZeRO shards the client AdamW that Optimizer passes (DeepSpeed calls it "untested")
        config.setdefault("zero_allow_untested_optimizer", True)
    return config


class Optimizer:
    """AdamW over the trainable (LoRA) parameters; a DeepSpeed engine under the deepspeed launcher."""

    def __init__(self, model: Any, settings: TrainerSettings, micro_batch_size: int):
        self.settings = settings
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine = None
        fused = bool(self.params) and self.params[0].is_cuda
        adamw = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=fused or None)
        if settings.deepspeed is not None:
            import deepspeed

            # the same AdamW, handed to DeepSpeed: ZeRO-2/3 refuse to run without an optimizer, and the
            # config files name none (the learning rate follows our schedule through param_groups)
            config = deepspeed_config(settings.deepspeed, settings, micro_batch_size)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
        else:
            self.optimizer = adamw

    @property
    def model(self) -> Any:
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


# --------------------------------------------------------------------------- the epoch


@dataclass
class EpochResult:
    loss: str
    samples: int
    steps: int = 0
    tokens: int = 0  # prompt+response tokens of the trained sequences, summed over steps
    seconds: float = 0.0
    lambdas: tuple[float, float] = (1.0, 1.0)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        last = self.metrics[-1] if self.metrics else {}
        return {
            "loss": self.loss, "samples": self.samples, "steps": self.steps, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "lambda_desirable": self.lambdas[0], "lambda_undesirable": self.lambdas[1],
            "final_loss": last.get("loss"), "mean_loss": _mean([m["loss"] for m in self.metrics]),
        }  # fmt: skip


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def init_distributed(settings: TrainerSettings) -> None:
    """One process per device under a launcher (``torchrun`` or ``deepspeed``, WORLD_SIZE > 1).

    With ``settings.deepspeed``: DeepSpeed's NCCL group (ZeRO shards the optimizer). Without: a plain
    process group, NCCL on GPUs and gloo on CPU, whose gradients ``average_gradients`` all-reduces."""
    import os

    cuda = torch.cuda.is_available()
    if cuda and (settings.deepspeed is not None or "LOCAL_RANK" in os.environ):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if settings.deepspeed is not None:
        import deepspeed

        deepspeed.init_distributed()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")


def average_gradients(params: list[torch.Tensor]) -> None:
    """Data parallelism without DeepSpeed: each rank's gradients become the mean over ranks (one
    all-reduce of the flattened LoRA gradients). A rank whose share of a batch was empty adds zeros."""
    _, world = rank_world()
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).to(p.dtype)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains the live peft model in place; one ``train`` call = ``settings.epochs`` epochs (paper: 1)."""

    def __init__(
        self, model: Any, tokenizer: Any, settings: TrainerSettings, runtime: Runtime, loss: str | None = None, *,
        step_offset: int = 0, later_steps: int = 0, optimizer_state: dict[str, Any] | None = None,
    ):  # fmt: skip
        """``step_offset``, ``later_steps``: the steps before and after this call on a run-long cosine
        (``lr_schedule="run"``, see ``batching.run_schedule``); 0 and 0 = a cosine over this call alone.
        ``optimizer_state``: an AdamW state dict to continue from (plain AdamW only)."""
        self.model = model
        self.step_offset = step_offset
        self.later_steps = later_steps
        self.optimizer_state = optimizer_state
        self.optimizer: Optimizer | None = None  # the last call's, for saving its state
        self.tokenizer = tokenizer
        self.settings = settings
        self.runtime = runtime
        self.loss = loss or settings.loss
        self.encode = Encoder(tokenizer, settings.max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rank, self.world = rank_world()
        # Each rank trains batch[rank::world] and normalises its loss by the batch's count / world, so the
        # gradients averaged over ranks (DeepSpeed, or ``average_gradients``) are those of the whole batch.
        # DeepSpeed wants one backward per rank per step: the rank's share runs as one (padded) micro-batch.
        self.token_budget = settings.micro_batch_tokens if settings.deepspeed is None else 1 << 62

    # ---- forward helpers

    @contextlib.contextmanager
    def _scoring(self, reference: bool):
        """No-grad eval mode for scoring passes; ``reference`` disables the adapter (pi_ref = the base)."""
        was_training = self.model.training
        self.model.eval()
        context = self.model.disable_adapter() if reference else contextlib.nullcontext()
        try:
            with torch.no_grad(), context:
                yield
        finally:
            self.model.train(was_training)

    def logps(self, sequences: list[Sequence], *, reference: bool = False) -> torch.Tensor:
        """No-grad summed response log-probs, micro-batched by length; ``reference`` disables the adapter."""
        out = torch.empty(len(sequences), dtype=torch.float32, device=self.runtime.device)
        if not sequences:
            return out
        with self._scoring(reference):
            for group in micro_batches([len(s.ids) for s in sequences], self.token_budget):
                out[group] = sequence_logps(self.model, [sequences[i] for i in group], self.pad_id, self.runtime)
        return out

    def token_logps(self, sequences: list[Sequence], *, reference: bool = False) -> list[torch.Tensor]:
        """No-grad per-token response log-probs, one float32 CPU tensor per sequence (``reference``: adapter off)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        if not sequences:
            return out
        with self._scoring(reference):
            for group in micro_batches([len(s.ids) for s in sequences], self.token_budget):
                part = [sequences[i] for i in group]
                per_token, _, _ = response_token_logps(self.model, part, self.pad_id, self.runtime)
                for i, chunk in zip(group, per_token.float().cpu().split([s.response_len for s in part])):
                    out[i] = chunk
        return out

    def _grad_logps(self, sequences: list[Sequence]) -> torch.Tensor:
        return sequence_logps(self._forward_model, sequences, self.pad_id, self.runtime)

    def _schedule(self, steps: int) -> Callable[[int], float]:
        """LR of this call's step k: step offset + k of a cosine over offset + steps + later steps."""
        s, offset = self.settings, self.step_offset
        total = offset + steps + self.later_steps
        return lambda step: cosine_lr(offset + step, total, s.learning_rate, s.min_learning_rate, s.warmup_ratio)

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        """The AdamW state after the last call (the loaded one if it made no step); None under DeepSpeed."""
        if self.optimizer is None:
            return self.optimizer_state
        return None if self.optimizer.engine is not None else self.optimizer.optimizer.state_dict()

    def _batches(self, n: int, iteration: int) -> list[list[int]]:
        s = self.settings
        return [b for epoch in range(s.epochs) for b in plan_batches(n, s.batch_size, s.seed + 1000 * iteration + epoch)]

    def _prepare(self, micro_batch_size: int) -> Optimizer:
        self.model.train()
        optimizer = Optimizer(self.model, self.settings, micro_batch_size)
        if self.optimizer_state is not None:
            if optimizer.engine is not None:
                raise ValueError("carrying the optimizer state between iterations is not supported under DeepSpeed yet")
            optimizer.optimizer.load_state_dict(self.optimizer_state)
        self._forward_model = optimizer.model or self.model
        self.optimizer = optimizer
        return optimizer

    def _emit(self, result: EpochResult, row: dict[str, Any], on_step: StepCallback | None) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        result.metrics.append(row)
        log.info("event=train_step %s", " ".join(f"{k}={v}" for k, v in row.items()))
        if on_step is not None:
            on_step(row)

    # ---- the epoch loop (TRL's shape: one loop, one loss step per loss family)

    def _epoch(
        self, result: EpochResult, batches: list[list[int]], iteration: int, micro_batch_size: int,
        loss_step: LossStep, on_step: StepCallback | None, started: float,
    ) -> EpochResult:  # fmt: skip
        """One optimizer step per planned batch. ``loss_step(batch, mine, share)`` runs this rank's part of
        the batch (``mine`` = ``batch[rank::world]``; ``share`` = the batch's size over the world, which a
        loss normalises by so that gradients averaged over ranks are the whole batch's) as micro-batches
        with their backward passes, and returns the step's metrics and tokens."""
        self._prepare(micro_batch_size)
        lr_at = self._schedule(len(batches))
        for step, batch in enumerate(batches):
            step_started = time.perf_counter()
            row, tokens = loss_step(batch, batch[self.rank :: self.world], len(batch) / self.world)
            lr = lr_at(step)
            grad_norm = self.optimizer.step(lr)
            result.tokens += tokens
            self._emit(result, {"iteration": iteration, "step": step + 1, "steps": len(batches), **row, "lr": lr,
                                "grad_norm": grad_norm, "tokens": tokens, "seconds": time.perf_counter() - step_started},
                       on_step)  # fmt: skip
        result.steps = len(batches)
        result.seconds = time.perf_counter() - started
        return result

    def train(self, samples: list[WeightedSample], iteration: int = 0, on_step: StepCallback | None = None) -> EpochResult:
        if self.loss in ("grace_kto", "kto"):
            return self._train_kto(samples, iteration, on_step)
        if self.loss in ("dpo", "orpo"):
            return self._train_pairs(samples, iteration, on_step)
        if self.loss == "sft":
            return self._train_sft(samples, iteration, on_step)
        if self.loss == "grpo":
            return self._train_grpo(samples, iteration, on_step)
        raise ValueError(f"unknown loss {self.loss!r}")

    # ---- GRACE-KTO and binary KTO

    def _train_kto(self, samples: list[WeightedSample], iteration: int, on_step: StepCallback | None) -> EpochResult:
        s = self.settings
        started = time.perf_counter()
        desirable = torch.tensor([x.weight >= 0 for x in samples], dtype=torch.bool)
        # binary KTO keeps only the sign (eq. 10), so every |W| = 1
        weights = torch.tensor([x.weight for x in samples], dtype=torch.float32)
        if self.loss == "kto":
            weights = torch.where(desirable, 1.0, -1.0)
        n_pos = int(desirable.sum())
        lam = losses.class_weights(n_pos, len(samples) - n_pos, s.lambda_mode, (s.lambda_desirable, s.lambda_undesirable))
        result = EpochResult(loss=self.loss, samples=len(samples), lambdas=lam)
        if not samples:
            return result
        seqs = [self.encode(x.query, x.response) for x in samples]
        batches = self._batches(len(samples), iteration)
        kl_keys = sorted({pair for b in batches for pair in zip(b, mismatched_partners(b))})
        kl_seqs = {key: mismatched(seqs[key[0]], seqs[key[1]], s.max_length) for key in kl_keys}

        # 1. reference log-probs, once per iteration (adapter disabled, no grad)
        ref = self.logps(seqs, reference=True).cpu()
        ref_kl = dict(zip(kl_keys, self.logps([kl_seqs[k] for k in kl_keys], reference=True).cpu().tolist()))
        log.info("event=reference_done iteration=%d sequences=%d seconds=%.2f",
                 iteration, len(seqs) + len(kl_keys), time.perf_counter() - started)  # fmt: skip
        device = self.runtime.device

        def loss_step(batch: list[int], mine: list[int], share: float) -> tuple[dict[str, Any], int]:
            # 2. z_ref from the mismatched pairs under the current policy (eq. 12)
            pairs = list(zip(batch, mismatched_partners(batch)))[self.rank :: self.world]
            policy_kl = self.logps([kl_seqs[p] for p in pairs])
            z_ref = losses.kl_reference_point(policy_kl, torch.tensor([ref_kl[p] for p in pairs], device=device))
            # 3. policy pass with gradients, padding-free micro-batches of the batch
            positive_tokens = sum(seqs[i].response_len for i in batch if desirable[i]) / self.world
            kto_sum = sft_sum = 0.0
            batch_logps = torch.empty(len(mine), dtype=torch.float32)
            for group in micro_batches([len(seqs[i].ids) for i in mine], self.token_budget):
                idx = [mine[g] for g in group]
                logps = self._grad_logps([seqs[i] for i in idx])
                reference = ref[idx].to(device)
                if self.loss == "kto":
                    kto = losses.kto_loss(logps, reference, desirable[idx].to(device), z_ref, s.beta, *lam, num_sequences=share)
                else:
                    kto = losses.grace_kto_loss(
                        logps, reference, weights[idx].to(device), z_ref, s.beta, *lam, num_sequences=share
                    )
                loss = kto
                positive = desirable[idx].to(device)
                if s.sft_weight > 0 and positive_tokens > 0 and bool(positive.any()):
                    sft = losses.sft_loss(logps[positive], num_tokens=positive_tokens)  # token mean over the batch's positives
                    loss = loss + s.sft_weight * sft
                    sft_sum += float(sft.detach())
                self.optimizer.backward(loss)
                kto_sum += float(kto.detach())
                batch_logps[list(group)] = logps.detach().float().cpu()
            w_abs = weights[mine].abs()
            row = {
                "loss": kto_sum + s.sft_weight * sft_sum, "loss_kto": kto_sum, "loss_sft": sft_sum, "z_ref": float(z_ref),
                "weight_abs_mean": float(w_abs.mean()), "weight_abs_min": float(w_abs.min()), "weight_abs_max": float(w_abs.max()),
                "desirable": int(desirable[mine].sum()), "undesirable": int((~desirable[mine]).sum()),
                **losses.reward_stats(batch_logps, ref[mine], weights[mine], s.beta),
            }  # fmt: skip
            return row, sum(len(seqs[i].ids) for i in mine)

        # 4. one optimizer step per batch
        return self._epoch(result, batches, iteration, math.ceil(s.batch_size / self.world), loss_step, on_step, started)

    # ---- DPO / ORPO on best-vs-worst pairs

    def _train_pairs(self, samples: list[WeightedSample], iteration: int, on_step: StepCallback | None) -> EpochResult:
        s = self.settings
        started = time.perf_counter()
        pairs = losses.best_worst_pairs([x.group_id for x in samples], [x.weight for x in samples])
        result = EpochResult(loss=self.loss, samples=2 * len(pairs))
        if not pairs:
            return result
        used = sorted({i for pair in pairs for i in pair})
        seqs = {i: self.encode(samples[i].query, samples[i].response) for i in used}
        ref: dict[int, float] = {}
        if self.loss == "dpo":
            ref = dict(zip(used, self.logps([seqs[i] for i in used], reference=True).cpu().tolist()))
        device = self.runtime.device

        def loss_step(batch: list[int], mine_ids: list[int], share: float) -> tuple[dict[str, Any], int]:
            mine = [pairs[b] for b in mine_ids]
            loss_sum = 0.0
            margins: list[float] = []
            # chosen and rejected of a pair share one forward/backward: the pairwise memory cost (paper 4.1)
            lengths = [2 * max(len(seqs[c].ids), len(seqs[r].ids)) for c, r in mine]
            for group in micro_batches(lengths, self.token_budget):
                chosen = [mine[g][0] for g in group]
                rejected = [mine[g][1] for g in group]
                logps = self._grad_logps([seqs[i] for i in chosen + rejected])
                pc, pr = logps[: len(group)], logps[len(group) :]
                if self.loss == "dpo":
                    rc = torch.tensor([ref[i] for i in chosen], device=device)
                    rr = torch.tensor([ref[i] for i in rejected], device=device)
                    loss = losses.dpo_loss(pc, pr, rc, rr, s.beta) * len(group) / share
                    margins += (s.beta * ((pc - rc) - (pr - rr))).detach().cpu().tolist()
                else:
                    tc = torch.tensor([seqs[i].response_len for i in chosen], device=device, dtype=torch.float32)
                    tr = torch.tensor([seqs[i].response_len for i in rejected], device=device, dtype=torch.float32)
                    loss = losses.orpo_loss(pc, pr, tc, tr, s.orpo_alpha) * len(group) / share
                self.optimizer.backward(loss)
                loss_sum += float(loss.detach())
            row: dict[str, Any] = {"loss": loss_sum, "pairs": len(mine)}
            if margins:
                row["reward_margin"] = sum(margins) / len(margins)
            return row, sum(len(seqs[i].ids) for pair in mine for i in pair)

        batches = self._batches(len(pairs), iteration)
        return self._epoch(result, batches, iteration, 2 * math.ceil(s.batch_size / self.world), loss_step, on_step, started)

    # ---- SFT on positives

    def _train_sft(self, samples: list[WeightedSample], iteration: int, on_step: StepCallback | None) -> EpochResult:
        started = time.perf_counter()
        positives = [x for x in samples if x.weight >= 0 and x.parsed]
        result = EpochResult(loss="sft", samples=len(positives))
        if not positives:
            return result
        seqs = [self.encode(x.query, x.response) for x in positives]
        batches = self._batches(len(seqs), iteration)
        micro_batch_size = math.ceil(self.settings.batch_size / self.world)
        return self._epoch(result, batches, iteration, micro_batch_size, self._nll_step(seqs), on_step, started)

    def train_plan(
        self, plan: list[list[Sequence]], token_weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_step: StepCallback | None = None,
    ) -> EpochResult:  # fmt: skip
        """Token-mean NLL on encoded sequences, one optimizer step per batch of ``plan`` (the SFT stage's
        rounds); ``token_weights(targets)`` weighs each response token (the SFT stage up-weights the tags)."""
        seqs = [seq for batch in plan for seq in batch]
        ends = list(itertools.accumulate((len(batch) for batch in plan), initial=0))
        batches = [list(range(start, end)) for start, end in zip(ends, ends[1:])]
        result = EpochResult(loss="sft", samples=len(seqs))
        micro_batch_size = max((len(b) for b in plan), default=1)
        return self._epoch(
            result, batches, 0, micro_batch_size, self._nll_step(seqs, token_weights), on_step, time.perf_counter()
        )

    def _nll_step(self, seqs: list[Sequence], token_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LossStep:
        """SFT's loss step: the token mean over the whole batch's responses of -log p (times ``token_weights``)."""

        def loss_step(batch: list[int], mine: list[int], share: float) -> tuple[dict[str, Any], int]:
            total = sum(seqs[i].response_len for i in batch) / self.world  # token mean over the whole batch
            loss_sum = 0.0
            for group in micro_batches([len(seqs[i].ids) for i in mine], self.token_budget):
                part = [seqs[mine[g]] for g in group]
                if token_weights is None:
                    logps = self._grad_logps(part)
                else:
                    per_token, _, targets = response_token_logps(self._forward_model, part, self.pad_id, self.runtime)
                    logps = token_weights(targets) * per_token
                loss = losses.sft_loss(logps, num_tokens=total)
                self.optimizer.backward(loss)
                loss_sum += float(loss.detach())
            return {"loss": loss_sum}, sum(len(seqs[i].ids) for i in mine)

        return loss_step

    # ---- GRPO: the online RL baseline

    def _train_grpo(self, samples: list[WeightedSample], iteration: int, on_step: StepCallback | None) -> EpochResult:
        """GRPO (no critic) on the iteration's groups, per-token ratios, token mean over each batch
        (``losses.grpo_loss``, TRL's ``bnpo``).

        The sampling policy is the adapter this iteration starts from (the samples were generated by
        it), so its per-token log-probs come from one no-grad pass with the adapter *on*, before the
        first update. The reference of the optional KL term (``grpo_beta_kl``) is the base model
        (adapter off), computed only when beta_kl > 0.
        """
        s = self.settings
        started = time.perf_counter()
        result = EpochResult(loss="grpo", samples=len(samples))
        if not samples:
            return result
        advantages = torch.tensor(
            losses.group_advantages([x.group_id for x in samples], [x.z if x.parsed else None for x in samples]),
            dtype=torch.float32,
        )
        seqs = [self.encode(x.query, x.response) for x in samples]
        # 1. the sampling policy's (and, with a KL term, the reference's) per-token log-probs, once per iteration
        old = self.token_logps(seqs)
        ref = self.token_logps(seqs, reference=True) if s.grpo_beta_kl > 0 else None
        log.info("event=sampling_logps_done iteration=%d sequences=%d seconds=%.2f",
                 iteration, len(seqs) * (2 if ref else 1), time.perf_counter() - started)  # fmt: skip
        device = self.runtime.device

        def loss_step(batch: list[int], mine: list[int], share: float) -> tuple[dict[str, Any], int]:
            response_tokens = sum(seqs[i].response_len for i in mine)  # the metrics' denominator
            share_tokens = sum(seqs[i].response_len for i in batch) / self.world  # the loss's
            loss_sum = ratio_sum = clipped = kl_sum = 0.0
            for group in micro_batches([len(seqs[i].ids) for i in mine], self.token_budget):
                idx = [mine[g] for g in group]
                per_token, rows, _ = response_token_logps(self._forward_model, [seqs[i] for i in idx], self.pad_id, self.runtime)
                per_token = per_token.float()
                old_t = torch.cat([old[i] for i in idx]).to(device)
                ref_t = torch.cat([ref[i] for i in idx]).to(device) if ref is not None else None
                adv_t = advantages[idx].to(device)[rows]
                loss = losses.grpo_loss(per_token, old_t, adv_t, ref_t, num_tokens=share_tokens,
                                        epsilon=s.grpo_epsilon, beta_kl=s.grpo_beta_kl)  # fmt: skip
                self.optimizer.backward(loss)
                loss_sum += float(loss.detach())
                with torch.no_grad():
                    ratio = torch.exp(per_token.detach() - old_t)
                    ratio_sum += float(ratio.sum())
                    clipped += float(
                        (((ratio < 1 - s.grpo_epsilon) & (adv_t < 0)) | ((ratio > 1 + s.grpo_epsilon) & (adv_t > 0))).sum()
                    )
                    if ref_t is not None:
                        delta = ref_t - per_token.detach()
                        kl_sum += float((torch.exp(delta) - delta - 1).sum())
            adv = advantages[mine]
            row = {
                "loss": loss_sum, "advantage_mean": float(adv.mean()), "advantage_min": float(adv.min()),
                "advantage_max": float(adv.max()), "ratio_mean": ratio_sum / max(response_tokens, 1),
                "clip_ratio": clipped / max(response_tokens, 1),
            }  # fmt: skip
            if ref is not None:
                row["kl"] = kl_sum / max(response_tokens, 1)
            return row, sum(len(seqs[i].ids) for i in mine)

        # 2. one optimizer step per batch
        batches = self._batches(len(samples), iteration)
        return self._epoch(result, batches, iteration, math.ceil(s.batch_size / self.world), loss_step, on_step, started)
