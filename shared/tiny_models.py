"""Local model sets built from the project's own text: no model hub needed.

A model set holds everything the services load:

- ``tokenizer/``: byte-level BPE trained with ``tokenizers`` on ``data/`` and
  the prompts (Chinese and English), ChatML template, the six structure tags
  of paper 3.1 as single (non-special) tokens;
- ``general/``: a small Qwen2 causal LM, the general model M_G and also the
  starting policy, briefly pretrained on the general corpus + SFT text;
- ``domain/``: M_D, made as the paper makes it: M_G continually pretrained on
  the domain corpus (used for P = PPL_G - PPL_D, paper 3.3);
- ``embedding/``: an XLM-RoBERTa encoder in BGE-M3 layout (``colbert_linear.pt``,
  ``sparse_linear.pt``) that FlagEmbedding's ``BGEM3FlagModel`` loads.

Builds are seeded and deterministic, written to a temporary folder and renamed
into place, and cached under ``grace_home()/models`` keyed by a fingerprint of
this code, the data files and the library versions. YaRN is never baked into a
saved config: services apply it at serve time with ``yarn_rope_parameters``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import prompts
from shared.jsonl import read_jsonl
from shared.settings import grace_home

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from shared.settings import ServiceSettings

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MARKER = "model_set.json"
SEED = 20240601
SPARSE_BIAS = 0.5

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
STRUCTURE_TAGS = ("<summary>", "</summary>", "<outline>", "</outline>", "<answer>", "</answer>")
# XLM-R order: <s>=0, <pad>=1, </s>=2, <unk>=3 (RoBERTa position ids are offset by the pad id).
ENCODER_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")

# Qwen-style ChatML; no default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Preset:
    vocab_size: int  # target; BPE stops earlier when the project's text has no more frequent pairs
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    intermediate: int
    window: int  # native context window of the Qwen2 models
    encoder_hidden: int
    encoder_layers: int
    encoder_heads: int
    encoder_intermediate: int
    encoder_positions: int  # BGE-M3: 8192 tokens + 2 (RoBERTa position offset)
    seq_len: int  # pretraining block length
    batch: int
    general_steps: int
    domain_steps: int
    general_lr: float
    domain_lr: float
    # Torch threads while training (None = torch's default). Fixed threads keep builds
    # bitwise reproducible; one thread is also fastest for the tiny model on shared CPUs.
    threads: int | None


PRESETS: dict[str, Preset] = {
    # head_dim 32: the minimum vLLM's CPU attention accepts.
    "tiny": Preset(
        vocab_size=4000, hidden=128, heads=4, kv_heads=2, layers=2, intermediate=256, window=2048,
        encoder_hidden=128, encoder_layers=2, encoder_heads=4, encoder_intermediate=256, encoder_positions=8194,
        seq_len=256, batch=8, general_steps=40, domain_steps=20, general_lr=6e-3, domain_lr=2e-3, threads=1,
    ),
    "small": Preset(
        vocab_size=16000, hidden=512, heads=8, kv_heads=4, layers=8, intermediate=1408, window=2048,
        encoder_hidden=256, encoder_layers=4, encoder_heads=4, encoder_intermediate=1024, encoder_positions=8194,
        seq_len=256, batch=4, general_steps=30, domain_steps=15, general_lr=2e-3, domain_lr=1e-3, threads=None,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ModelSet:
    root: Path
    tokenizer: Path
    policy: Path
    general: Path
    domain: Path
    embedding: Path

    @classmethod
    def at(cls, root: Path) -> ModelSet:
        """The standard layout of a built set; the general model is also the starting policy."""
        return cls(root=root, tokenizer=root / "tokenizer", policy=root / "general", general=root / "general",
                   domain=root / "domain", embedding=root / "embedding")  # fmt: skip

    def as_dict(self) -> dict[str, str]:
        """Model name -> path (the root is not a model and is left out)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "root"}


# --- text sources -------------------------------------------------------------


def data_files(data_dir: Path = DATA_DIR) -> list[Path]:
    """The data files a build reads, in a fixed order (absent ones are skipped)."""
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix in (".jsonl", ".txt"))


def _paragraphs(path: Path) -> list[str]:
    """A corpus file as documents: one paragraph per line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompt_texts() -> list[str]:
    return [value for name, value in sorted(vars(prompts).items()) if name.isupper() and isinstance(value, str)]


def tokenizer_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """Every text of the project: prompts, queries and responses, corpora."""
    texts = _prompt_texts()
    for path in data_files(data_dir):
        if path.suffix == ".jsonl":
            texts += [row[key] for row in read_jsonl(path) for key in ("query", "response") if isinstance(row.get(key), str)]
        else:
            texts += _paragraphs(path)
    return texts


def general_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """M_G pretraining text: the general corpus + SFT examples rendered in ChatML
    under the 3.1 system prompt (so the starting policy has seen the tag format)."""
    texts: list[str] = []
    if (data_dir / "general_corpus.txt").exists():
        texts += _paragraphs(data_dir / "general_corpus.txt")
    if (data_dir / "sft.jsonl").exists():
        for row in read_jsonl(data_dir / "sft.jsonl"):
            messages = prompts.chat_messages(row["query"]) + [{"role": "assistant", "content": row["response"]}]
            texts.append(_render_chat(messages))
    return texts or _prompt_texts()


def domain_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """M_D continual-pretraining text: the domain corpus (fallback: the seed queries)."""
    if (data_dir / "domain_corpus.txt").exists():
        return _paragraphs(data_dir / "domain_corpus.txt")
    if (data_dir / "seed_queries.jsonl").exists():
        return [row["query"] for row in read_jsonl(data_dir / "seed_queries.jsonl")]
    return _prompt_texts()


def _render_chat(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# --- fingerprint, cache, lock ---------------------------------------------------


def fingerprint(preset: str = "tiny", data_dir: Path = DATA_DIR) -> str:
    """sha256 of the build code, the preset, the data files read and the library versions."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(json.dumps({"preset": preset, **asdict(PRESETS[preset])}, sort_keys=True).encode())
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    for path in data_files(data_dir):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(out_dir: Path, fp: str) -> bool:
    try:
        return json.loads((out_dir / MARKER).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def build_model_set(out_dir: str | Path, preset: str = "tiny", force: bool = False) -> ModelSet:
    """Builds the set into ``out_dir`` unless a complete build with the same fingerprint is there.

    Built in a temporary sibling folder and renamed into place under a file
    lock, so concurrent or crashed builds never leave a half set.
    """
    out_dir = Path(out_dir).resolve()
    fp = fingerprint(preset)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not force and _is_complete(out_dir, fp):
            return ModelSet.at(out_dir)
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the set is shared read-only
        try:
            manifest = _build(tmp, preset)
            (tmp / MARKER).write_text(json.dumps({"fingerprint": fp, **manifest}, indent=2))
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                out_dir.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ModelSet.at(out_dir)


def ensure_model_set(preset: str = "tiny") -> ModelSet:
    """The cached set for ``preset`` under ``grace_home()/models``, built once across processes."""
    fp = fingerprint(preset)
    return build_model_set(grace_home() / "models" / f"{preset}-{fp[:12]}", preset=preset)


def resolve_models(settings: ServiceSettings, preset: str = "tiny") -> ModelSet:
    """The configured model paths; unset ones fall back to the local ``preset`` set.

    ``general_model`` (a base model) defaults to the local set's base model, or
    to ``policy_model`` with a warning when that is set; the tokenizer is the
    policy's (model folders carry their tokenizer). ``root`` is the local set's
    root when anything fell back to it, else the policy path.
    """
    policy = settings.policy_model
    configured = {
        "policy": policy,
        "general": settings.general_model_path(),
        "domain": settings.domain_model,
        "embedding": settings.embedding_model,
    }
    missing = sorted(name for name, value in configured.items() if not value)
    if not missing:
        return ModelSet(root=Path(policy), tokenizer=Path(policy), **{k: Path(v) for k, v in configured.items()})
    local = ensure_model_set(preset)
    if len(missing) < len(configured):
        # P = PPL_G - PPL_D needs one tokenizer for both models: mixing sets is the user's call.
        log.warning("event=models_mixed fallback=%s preset=%s", ",".join(missing), preset)
    paths = {name: Path(value) if value else getattr(local, name) for name, value in configured.items()}
    return ModelSet(root=local.root, tokenizer=Path(policy) if policy else local.tokenizer, **paths)


# --- helpers other services use ---------------------------------------------------


def _model_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    from transformers import AutoConfig  # hub name or cache: let transformers resolve it

    return AutoConfig.from_pretrained(str(model_dir)).to_dict()


def _rope_theta(config: dict[str, Any]) -> float:
    for source in (config.get("rope_parameters"), config.get("rope_scaling"), config):
        if isinstance(source, dict) and source.get("rope_theta"):
            return float(source["rope_theta"])
    return 10000.0


def native_window(model_dir: str | Path) -> int:
    """The model's trained context length (before any YaRN scaling)."""
    config = _model_config(model_dir)
    for source in (config.get("rope_parameters"), config.get("rope_scaling")):
        if isinstance(source, dict) and source.get("original_max_position_embeddings"):
            return int(source["original_max_position_embeddings"])
    return int(config["max_position_embeddings"])


def yarn_rope_parameters(model_dir: str | Path, factor: float = 4.0, native: int | None = None) -> dict[str, Any]:
    """``shared.rope.yarn_parameters`` for the model in ``model_dir`` (its native window unless ``native``)."""
    from shared.rope import yarn_parameters

    return yarn_parameters(factor, native or native_window(model_dir), _rope_theta(_model_config(model_dir)))


def weights_checksum(model_dir: str | Path) -> str:
    """sha256 over every safetensors tensor (name, dtype, shape, bytes) in a fixed order."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in sorted(fh.keys()):
                tensor = fh.get_tensor(name).contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the build -------------------------------------------------------------------


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build(out: Path, preset_name: str) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    with _torch_threads(preset.threads):
        return _build_models(out, preset_name, preset)


def _build_models(out: Path, preset_name: str, preset: Preset) -> dict[str, Any]:
    started = time.perf_counter()
    texts = tokenizer_texts()

    policy_tok = _train_bpe(texts, preset.vocab_size, CHAT_SPECIAL_TOKENS)
    policy_tok.add_tokens(_added_tags())
    hf_policy_tok = _policy_tokenizer(policy_tok, preset)
    hf_policy_tok.save_pretrained(out / "tokenizer")
    log.info("event=tokenizer_built vocab=%d texts=%d", len(hf_policy_tok), len(texts))

    general = _qwen2(preset, hf_policy_tok)
    general_blocks = _blocks(hf_policy_tok, general_texts(), preset.seq_len)
    general_losses = _pretrain(general, general_blocks, preset.general_steps, preset.batch, preset.general_lr, SEED)
    _save_causal_lm(general, hf_policy_tok, out / "general")
    log.info(
        "event=general_trained steps=%d loss_first=%.3f loss_last=%.3f",
        len(general_losses),
        general_losses[0],
        general_losses[-1],
    )

    domain_blocks = _blocks(hf_policy_tok, domain_texts(), preset.seq_len)
    domain_losses = _pretrain(general, domain_blocks, preset.domain_steps, preset.batch, preset.domain_lr, SEED + 1)
    _save_causal_lm(general, hf_policy_tok, out / "domain")
    log.info(
        "event=domain_trained steps=%d loss_first=%.3f loss_last=%.3f", len(domain_losses), domain_losses[0], domain_losses[-1]
    )

    encoder_params = _build_encoder(texts, preset, out / "embedding")
    seconds = time.perf_counter() - started
    log.info("event=model_set_built preset=%s seconds=%.1f", preset_name, seconds)
    return {
        "preset": preset_name,
        "build_seconds": round(seconds, 2),
        "parameters": {"general": general.num_parameters(), "domain": general.num_parameters(), "embedding": encoder_params},
        "losses": {"general": [general_losses[0], general_losses[-1]], "domain": [domain_losses[0], domain_losses[-1]]},
        "layout": {name: str(Path(path).relative_to(out)) for name, path in ModelSet.at(out).as_dict().items()},
    }


def _added_tags() -> list[Any]:
    from tokenizers import AddedToken

    # Not special: they must survive decode(skip_special_tokens=True).
    return [AddedToken(tag, special=False, normalized=False) for tag in STRUCTURE_TAGS]


def _train_bpe(texts: list[str], vocab_size: int, special_tokens: tuple[str, ...]) -> Tokenizer:
    """Byte-level BPE with exactly Qwen2's normalizer and pre-tokenizer.

    transformers rebuilds a qwen2 model folder's tokenizer as ``Qwen2Tokenizer``
    (NFC + Qwen's split regex + byte level) from the saved vocab and merges, so
    training with the same pipeline keeps raw ``tokenizers``, transformers and
    vLLM on identical ids. Every byte is in the alphabet: no text is unknown.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _policy_tokenizer(tokenizer: Tokenizer, preset: Preset) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=preset.window * 4,  # servable length under 4x YaRN
        clean_up_tokenization_spaces=False,
    )


def _qwen2(preset: Preset, tokenizer: Any) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    return Qwen2ForCausalLM(config).float()


def _blocks(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined by <|endoftext|> and cut into equal blocks (the last partial one is dropped)."""
    import torch

    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += encoded + [separator]
    usable = max(len(ids) // seq_len, 1) * seq_len
    ids = (ids * math.ceil(usable / len(ids)))[:usable]  # a corpus shorter than one block is repeated
    return torch.tensor(ids, dtype=torch.long).view(-1, seq_len)


def _pretrain(model: Any, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """A few seeded AdamW steps, linear warm-up then cosine decay; returns the loss per step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(steps // 10, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        index, order = order[:batch], order[batch:]
        loss = model(input_ids=blocks[index], labels=blocks[index]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


def _save_causal_lm(model: Any, tokenizer: Any, path: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)  # vLLM loads the tokenizer from the model folder


def _build_encoder(texts: list[str], preset: Preset, path: Path) -> int:
    """A seeded random XLM-RoBERTa in BGE-M3 layout; returns its parameter count (heads included)."""
    import torch
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    tokenizer = _train_bpe(texts, preset.vocab_size, ENCODER_SPECIAL_TOKENS)
    tokenizer.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))],
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=preset.encoder_positions - 2,
        clean_up_tokenization_spaces=False,
    )
    config = XLMRobertaConfig(
        vocab_size=len(hf_tokenizer),
        hidden_size=preset.encoder_hidden,
        num_hidden_layers=preset.encoder_layers,
        num_attention_heads=preset.encoder_heads,
        intermediate_size=preset.encoder_intermediate,
        max_position_embeddings=preset.encoder_positions,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=hf_tokenizer.pad_token_id,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(SEED + 2)
    model = XLMRobertaModel(config).float().eval()
    hidden = preset.encoder_hidden
    colbert_linear = torch.nn.Linear(hidden, hidden)
    sparse_linear = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        # relu(sparse_linear(h)) is a token's lexical weight: a positive bias gives most
        # tokens a weight, as in a trained BGE-M3, so lexical matching is not all zeros.
        sparse_linear.bias.fill_(SPARSE_BIAS)
    model.save_pretrained(path, safe_serialization=True)
    hf_tokenizer.save_pretrained(path)
    # File names and keys FlagEmbedding's EncoderOnlyEmbedderM3Runner.get_model loads.
    torch.save(colbert_linear.state_dict(), path / "colbert_linear.pt")
    torch.save(sparse_linear.state_dict(), path / "sparse_linear.pt")
    heads = sum(p.numel() for p in (*colbert_linear.parameters(), *sparse_linear.parameters()))
    return model.num_parameters() + heads
