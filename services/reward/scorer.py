"""Models and batched compute of the reward metrics (paper 3.3, appendix A).

One ``Scorer`` holds the models for the life of the process. Per call:

- responses are parsed once; identical documents, summaries and queries are
  computed once (each query is encoded once per group, or once overall);
- the document's tokens (policy tokenizer) give L and E;
- PPL_G and PPL_D come from the same token windows: every document is cut
  into strided sliding windows (never truncated), all windows of all documents
  are sorted by length and packed into batches under a token budget, and only
  the positions that are scored go through the LM head, in chunks;
- BGE-M3 dense, lexical and multi-vector outputs come from one encoder pass
  over every unique text, length-sorted and batched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.reward import metrics as M
from services.reward.config import RewardSettings
from shared.calibration import DegenerateGroups, calibrate
from shared.devices import resolve_device, resolve_dtype
from shared.packing import token_budget_batches
from shared.parsing import extract_structured
from shared.schemas import GroupResult, Metrics, ResponseResult, ScoreResponse

log = logging.getLogger(__name__)


@dataclass
class ComputeStats:
    """Work done by the models: real (unpadded) tokens, padded tokens and matmul FLOPs."""

    lm_tokens: int = 0
    lm_padded_tokens: int = 0
    lm_head_tokens: int = 0
    encoder_tokens: int = 0
    encoder_padded_tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0

    def add(self, other: ComputeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Encoded:
    """BGE-M3 outputs of one text: dense vector, lexical weights, multi-vectors."""

    dense: torch.Tensor
    lexical: dict[int, float]
    colbert: torch.Tensor


def apply_memory_cap(fraction: float | None, device: torch.device) -> float | None:
    """Caps this process's CUDA caching allocator at ``fraction`` of the device's memory (before any model loads).

    An allocation past the cap raises ``torch.OutOfMemoryError`` in this process instead of taking memory that
    a colocated vLLM (``--gpu-memory-utilization``) or trainer counts on. Returns the cap applied (None: none).
    """
    if fraction is None:
        return None
    if device.type != "cuda":
        log.warning("event=gpu_memory_fraction_ignored device=%s fraction=%s", device, fraction)
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.info("event=gpu_memory_cap device=cuda:%d fraction=%s", index, fraction)
    return fraction


def matmul_params(module: torch.nn.Module) -> int:
    """Weights that take part in matmuls (every >= 2-D parameter except embedding tables)."""
    skip = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in skip)


class CausalScorer:
    """Sum of token NLLs under one causal LM, batched over sliding windows."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
        self.model.to(device).eval()
        self.body = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        config = self.model.config
        self.layers = config.num_hidden_layers
        self.hidden = config.hidden_size
        self.body_params = matmul_params(self.body)
        self.head_params = self.head.weight.numel()
        self.device = device

    @torch.inference_mode()
    def nll_sums(
        self, segments: list[tuple[list[int], int]], pad_id: int, budget: int, chunk: int, stats: ComputeStats
    ) -> list[float]:
        """Per segment (token ids, first scored position): summed NLL of the scored positions."""
        out = [0.0] * len(segments)
        for batch in token_budget_batches([len(ids) for ids, _ in segments], budget):
            width = len(segments[batch[0]][0])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            rows, cols = [], []
            for r, s in enumerate(batch):
                tokens, start = segments[s]
                ids[r, : len(tokens)] = torch.tensor(tokens)
                rows += [r] * (len(tokens) - start)
                cols += range(start, len(tokens))
            ids = ids.to(self.device)
            # Right padding and a causal mask: real tokens never attend to the pads
            # after them, so no attention mask is needed (and SDPA keeps its fast path).
            hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            rows_t = torch.tensor(rows, device=self.device)
            cols_t = torch.tensor(cols, device=self.device)
            states = hidden[rows_t, cols_t - 1]  # position t is predicted from t-1
            targets = ids[rows_t, cols_t]
            nll = torch.empty(len(rows), dtype=torch.float32, device=self.device)
            for lo in range(0, len(rows), chunk):
                logits = self.head(states[lo : lo + chunk]).float()
                nll[lo : lo + chunk] = F.cross_entropy(logits, targets[lo : lo + chunk], reduction="none")
            sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device)
            sums.index_add_(0, rows_t, nll.double())
            for s, value in zip(batch, sums.tolist()):
                out[s] = value
            real = sum(len(segments[s][0]) for s in batch)
            stats.lm_tokens += real
            stats.lm_padded_tokens += width * len(batch)
            stats.lm_head_tokens += len(rows)
            stats.flops += 2 * self.body_params * real + 2 * self.head_params * len(rows)
            # causal attention scores and values: ~2 x 2 x T^2/2 x hidden per layer
            stats.flops += sum(2 * self.layers * len(segments[s][0]) ** 2 * self.hidden for s in batch)
        return out


class BgeM3Encoder:
    """XLM-RoBERTa + BGE-M3's colbert_linear and sparse_linear heads, one pass for all three outputs."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, max_length: int | None):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").to(device).eval()
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BGE-M3 reads the raw [CLS] state; the pooler would be wasted work
        hidden = self.model.config.hidden_size
        colbert_path, sparse_path = path / "colbert_linear.pt", path / "sparse_linear.pt"
        if not colbert_path.exists() or not sparse_path.exists():
            raise FileNotFoundError(f"{path} lacks colbert_linear.pt / sparse_linear.pt (not a BGE-M3 folder)")
        colbert_state = torch.load(colbert_path, map_location="cpu", weights_only=True)
        self.colbert = torch.nn.Linear(hidden, colbert_state["weight"].shape[0])
        self.colbert.load_state_dict(colbert_state)
        self.sparse = torch.nn.Linear(hidden, 1)
        self.sparse.load_state_dict(torch.load(sparse_path, map_location="cpu", weights_only=True))
        self.colbert.to(device, dtype).eval()
        self.sparse.to(device, dtype).eval()
        config = self.model.config
        positions = config.max_position_embeddings
        if config.model_type in ("xlm-roberta", "roberta"):
            positions -= (config.pad_token_id or 0) + 1  # RoBERTa position ids start after the pad id
        tok_max = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**7 else positions
        self.max_length = min(max_length or positions, positions, tok_max)
        special = [
            self.tokenizer.cls_token_id,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            self.tokenizer.unk_token_id,
        ]
        self.skip = {t for t in special if t is not None}
        self.pad_id = self.tokenizer.pad_token_id
        self.layers, self.hidden = config.num_hidden_layers, hidden
        self.params = matmul_params(self.model) + self.colbert.weight.numel() + self.sparse.weight.numel()
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], budget: int, stats: ComputeStats) -> list[Encoded]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out: list[Encoded | None] = [None] * len(texts)
        for batch in token_budget_batches([len(e) for e in encoded], budget):
            width = len(encoded[batch[0]])
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            padded = any(len(encoded[i]) < width for i in batch)
            # without padding no mask is needed, and SDPA can take its fused kernel
            states = self.model(input_ids=ids, attention_mask=mask if padded else None).last_hidden_state
            dense = F.normalize(states[:, 0].float(), dim=-1)  # eq. 13: [CLS]
            weights = torch.relu(self.sparse(states)).squeeze(-1).float().cpu()  # eq. 14
            colbert = F.normalize(self.colbert(states[:, 1:]).float(), dim=-1)  # eq. 15, [CLS] left out
            for r, i in enumerate(batch):
                n = len(encoded[i])
                lexical = M.token_weights(encoded[i], weights[r, :n].tolist(), self.skip)
                out[i] = Encoded(dense[r].cpu(), lexical, colbert[r, : n - 1].cpu())
            real = sum(len(encoded[i]) for i in batch)
            stats.encoder_tokens += real
            stats.encoder_padded_tokens += width * len(batch)
            stats.flops += 2 * self.params * real + sum(4 * self.layers * len(encoded[i]) ** 2 * self.hidden for i in batch)
        return out  # type: ignore[return-value]


def relevance(query: Encoded, passage: Encoded, weights: tuple[float, float, float]) -> float:
    return M.relevance(
        M.dense_score(query.dense, passage.dense),
        M.lexical_score(query.lexical, passage.lexical),
        M.colbert_score(query.colbert, passage.colbert),
        weights,
    )


@dataclass
class _Parsed:
    group: int
    index: int
    summary: str
    document: str


class Scorer:
    """Loads M_G, M_D (one tokenizer) and the BGE-M3 encoder once; scores groups of responses."""

    def __init__(self, settings: RewardSettings):
        from transformers import AutoTokenizer

        from shared.tiny_models import native_window, resolve_models

        started = time.perf_counter()
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.models = resolve_models(settings, preset=settings.model_preset)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.memory_cap = apply_memory_cap(settings.gpu_memory_fraction, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.models.tokenizer))
        self.general = CausalScorer(self.models.general, self.device, self.dtype)
        self.domain = CausalScorer(self.models.domain, self.device, self.dtype)
        self.encoder = BgeM3Encoder(self.models.embedding, self.device, self.dtype, settings.encoder_max_length)
        self.window = settings.ppl_window or native_window(self.models.general)
        # 3/4 window: every scored token past the first window keeps >= window/4 tokens of context,
        # and a document just past the window costs 1/3 more compute, not double
        self.stride = settings.ppl_stride or max(self.window * 3 // 4, 1)
        M.sliding_windows(self.window, self.window, self.stride)  # validates window / stride
        self.prefix_id = self._prefix_token()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_id
        self.slots = threading.BoundedSemaphore(settings.max_concurrency)  # HTTP and worker share the models
        self._stats_lock = threading.Lock()
        self.stats = ComputeStats()  # totals since start
        log.info(
            "event=models_loaded device=%s dtype=%s window=%d stride=%d general=%s domain=%s embedding=%s seconds=%.1f",
            self.device, str(self.dtype).removeprefix("torch."), self.window, self.stride,
            self.models.general, self.models.domain, self.models.embedding, time.perf_counter() - started,
        )  # fmt: skip

    def _prefix_token(self) -> int:
        """Context token before a document, so its first token is scored too (as lm-eval does)."""
        tok = self.tokenizer
        if tok.bos_token_id is not None:
            return tok.bos_token_id
        doc_sep = tok.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(doc_sep, int) and doc_sep != tok.unk_token_id:
            return doc_sep
        if tok.eos_token_id is None:
            raise ValueError("the policy tokenizer has neither a BOS, <|endoftext|> nor an EOS token")
        return tok.eos_token_id

    def perplexities(self, token_lists: Sequence[list[int]], stats: ComputeStats) -> tuple[list[float], list[float]]:
        """(PPL_G, PPL_D) per document, from one set of sliding windows (eq. 3)."""
        segments: list[tuple[list[int], int]] = []
        owner: list[int] = []
        for d, tokens in enumerate(token_lists):
            ids = [self.prefix_id, *tokens]
            for w in M.sliding_windows(len(ids), self.window, self.stride):
                segments.append((ids[w.begin : w.end], w.target_start - w.begin))
                owner.append(d)
        s = self.settings
        results = []
        for model in (self.general, self.domain):
            sums = model.nll_sums(segments, self.pad_id, s.max_batch_tokens, s.logits_chunk, stats)
            totals = [0.0] * len(token_lists)
            for d, value in zip(owner, sums):
                totals[d] += value
            results.append([M.perplexity(t, len(tokens)) for t, tokens in zip(totals, token_lists)])
        return results[0], results[1]

    def score(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[Metrics | None]]:
        """Metrics per response (None = unparsed) for (query, responses) groups."""
        return self.score_with_stats(groups)[0]

    def score_with_stats(self, groups: Sequence[tuple[str, Sequence[str]]]) -> tuple[list[list[Metrics | None]], ComputeStats]:
        with self.slots:
            started = time.perf_counter()
            stats = ComputeStats()
            result = self._score(groups, stats)
            stats.seconds = time.perf_counter() - started
        with self._stats_lock:
            self.stats.add(stats)
        return result, stats

    def _score(self, groups: Sequence[tuple[str, Sequence[str]]], stats: ComputeStats) -> list[list[Metrics | None]]:
        parsed: list[_Parsed] = []
        for g, (_, responses) in enumerate(groups):
            for i, text in enumerate(responses):
                part = extract_structured(text)
                if part is not None:
                    parsed.append(_Parsed(g, i, part.summary, part.answer))
        out: list[list[Metrics | None]] = [[None] * len(responses) for _, responses in groups]
        if not parsed:
            return out
        documents = list(dict.fromkeys(p.document for p in parsed))
        tokens = self.tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        if not all(tokens):  # a document the tokenizer maps to nothing has no L, E or perplexity: unparsed
            empty = {d for d, t in zip(documents, tokens) if not t}
            parsed = [p for p in parsed if p.document not in empty]
            documents, tokens = [d for d in documents if d not in empty], [t for t in tokens if t]
            if not parsed:
                return out
        doc_index = {d: i for i, d in enumerate(documents)}
        ppl_g, ppl_d = self.perplexities(tokens, stats)
        texts = list(dict.fromkeys([groups[p.group][0] for p in parsed] + [p.summary for p in parsed] + documents))
        encoded = dict(zip(texts, self.encoder.encode(texts, self.settings.max_batch_tokens, stats)))
        n = self.settings.ngram_n
        for p in parsed:
            d = doc_index[p.document]
            query = encoded[groups[p.group][0]]
            out[p.group][p.index] = Metrics(
                length=float(len(tokens[d])),  # eq. 1
                diversity=M.diversity(tokens[d], n),  # eq. 2
                professionalism=ppl_g[d] - ppl_d[d],  # eq. 3
                general_perplexity=ppl_g[d],
                domain_perplexity=ppl_d[d],
                relevance_summary=relevance(query, encoded[p.summary], M.SUMMARY_WEIGHTS),  # eq. 4
                relevance_document=relevance(query, encoded[p.document], M.DOCUMENT_WEIGHTS),
            )
        return out


def score_response(
    groups: Sequence[tuple[str | None, Sequence[Metrics | None]]], *, degenerate_groups: DegenerateGroups = "omega_plus"
) -> ScoreResponse:
    """Calibrates a dataset of scored groups (eq. 5-9) into the API's response shape."""
    calibrated = calibrate([metrics for _, metrics in groups], degenerate_groups=degenerate_groups)
    return ScoreResponse(
        groups=[
            GroupResult(
                query=query,
                results=[
                    ResponseResult(index=i, parsed=c.parsed, metrics=m, rank_sum=c.rank_sum, z=c.z, weight=c.weight)
                    for i, (m, c) in enumerate(zip(metrics, cal))
                ],
            )
            for (query, metrics), cal in zip(groups, calibrated)
        ]
    )
