"""Typed task options (the `options:` section of a job), one dataclass per lab, with their ranges.

Kept free of torch imports so that `labs plan` can check them in well under a second. A field's
range sits next to it (`checked(rule, default)`, see launcher/config/schema.py); `check_options` adds what
needs the model's shape (sequence lengths against its positions, LoRA targets, encoder layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.common.errors import LabsError
from launcher.config.job import Job
from launcher.config.schema import FieldError, Rule, at_least, build_section, checked, non_empty, one_of
from tasks import smollm2
from tasks.presets import PRESETS

LORA_RANK = at_least(1, "the rank of each adapter's matrices")
LORA_ALPHA = at_least(1, "the update is scaled by alpha / r; 0 would train nothing")
LORA_DROPOUT = Rule(lambda v: 0 <= v < 1, "it must be in [0, 1) (the dropout probability on the adapters' input)")
LORA_TARGETS = Rule(lambda v: bool(v) and all(isinstance(x, str) and x.strip() for x in v),
                    "list one module name or more, e.g. [q_proj, v_proj]")
NUM_LABELS = at_least(2, "classes; one class would make the head a regression")
MAX_LENGTH = at_least(3, "tokens per text, with the tokenizer's [CLS] and [SEP]")
FINETUNE_MODES = ("head", "last_k", "all", "lora")


def _one_name_per_class(num_labels: int, label_names: list[str]) -> None:
    if label_names and len(label_names) != num_labels:
        raise FieldError("label_names", label_names, f"give one name per class ({num_labels}, options.num_labels), "
                                                     f"or [] to number them")


@dataclass
class FineTuneOptions:
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing)."""


@dataclass
class SimpleModelOptions:
    num_labels: int = checked(NUM_LABELS, 4)
    """Number of classes; labels must be 0..num_labels-1 after data.label_offset."""
    label_names: list[str] = checked(non_empty("a class name", each=True),
                                     factory=lambda: ["World", "Sports", "Business", "Sci/Tech"])
    """Class names, in label order: per-class accuracy is logged as acc_<name> (e.g. acc_sci_tech)."""
    max_length: int = checked(MAX_LENGTH, 128)
    """Tokens per text (longer texts are truncated; batches are padded to their longest)."""

    def __post_init__(self) -> None:
        _one_name_per_class(self.num_labels, self.label_names)


@dataclass
class TransferOptions:
    num_labels: int = checked(NUM_LABELS, 2)
    """Number of classes (IMDB: 0 = negative, 1 = positive)."""
    label_names: list[str] = checked(non_empty("a class name", each=True), factory=lambda: ["negative", "positive"])
    """Class names, in label order, for the per-class accuracy."""
    max_length: int = checked(MAX_LENGTH, 256)
    """Tokens per review (truncated; batches are padded to their longest)."""
    finetune: str = checked(one_of(*FINETUNE_MODES), "all")
    """What trains: head (classifier + pooler only) | last_k (head + the last `last_k` encoder layers)
    | all | lora (PEFT LoRA adapters on `lora_target_modules`, plus the head)."""
    last_k: int = checked(at_least(1, "encoder layers unfrozen; finetune=head trains none"), 2)
    """Encoder layers unfrozen by finetune=last_k."""
    lora_r: int = checked(LORA_RANK, 8)
    """LoRA rank (finetune=lora)."""
    lora_alpha: int = checked(LORA_ALPHA, 16)
    lora_dropout: float = checked(LORA_DROPOUT, 0.1)
    lora_target_modules: list[str] = checked(LORA_TARGETS, factory=lambda: ["query", "key", "value", "dense"])
    """Module names LoRA wraps (BERT: query, key, value, dense)."""
    merge: bool = False
    """finetune=lora: also write the merged full weights (hf/); the adapter goes to hf/adapter."""

    def __post_init__(self) -> None:
        _one_name_per_class(self.num_labels, self.label_names)


@dataclass
class TinyLlamaOptions:
    lora_r: int = checked(LORA_RANK, 8)
    """LoRA rank."""
    lora_alpha: int = checked(LORA_ALPHA, 16)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = checked(LORA_DROPOUT, 0.05)
    lora_target_modules: list[str] = checked(LORA_TARGETS, factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Projections LoRA wraps (Llama attention and MLP)."""
    merge: bool = False
    """Also write the merged full weights in HF format to hf/ (the adapter always goes to hf/adapter)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing)."""


LORA_DEFAULT = TinyLlamaOptions().lora_target_modules

OPTIONS: dict[str, type] = {
    "fine_tune": FineTuneOptions,
    "simple_model": SimpleModelOptions,
    "transfer": TransferOptions,
    "tinyllama": TinyLlamaOptions,
}
CAUSAL_LM_TASKS = ("fine_tune", "tinyllama")
CLASSIFIER_TASKS = ("simple_model", "transfer")
# Module names PEFT's LoRA can wrap (Linear, Embedding, GPT-2's Conv1D), per model type
LORA_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"),
    "gpt2": ("c_attn", "c_proj", "c_fc", "wte", "lm_head"),
    "bert": ("query", "key", "value", "dense", "word_embeddings"),
}
LORA_MODULES["mistral"] = LORA_MODULES["llama"]


def check_options(job: Job, model_cfg: dict[str, Any] | None) -> Any:
    """The job's task options, built and checked (types, ranges), then checked against the model:
    `model_cfg` is the preset's dict or the model folder's config.json (None for a hub id: the ranks
    check what needs the model). Returns the options dataclass instance."""
    options = build_section(OPTIONS[job.task], job.options, job.path, "options.")
    if not isinstance(model_cfg, dict):
        return options
    arch = model_cfg.get("arch") or model_cfg.get("model_type")
    where = f"{job.path}: model.name = {job.model.name!r}"
    _check_arch(job, arch, where)
    if model_cfg.get("weights") == smollm2.PACKAGE and _is_preset(job):
        smollm2.check_available(where)
    positions = model_cfg.get("max_position_embeddings") or model_cfg.get("n_positions")
    if isinstance(positions, int) and not isinstance(positions, bool):
        if job.task in CAUSAL_LM_TASKS and job.data.block_size > positions:
            raise LabsError(f"{job.path}: data.block_size = {job.data.block_size} is more than the {positions} "
                            f"positions of model {job.model.name!r}; set data.block_size <= {positions}")
        length = getattr(options, "max_length", None)
        if length is not None and length > positions:
            raise LabsError(f"{job.path}: options.max_length = {length} is more than the {positions} positions "
                            f"of model {job.model.name!r}; set options.max_length <= {positions}")
    _check_lora(job, options, arch, where)
    layers = model_cfg.get("num_hidden_layers")
    if getattr(options, "finetune", None) == "last_k" and type(layers) is int and options.last_k > layers:
        raise LabsError(f"{where} has {layers} encoder layers; options.last_k = {options.last_k} must be at most "
                        f"{layers} (or use options.finetune: all)")
    return options


def _check_arch(job: Job, arch: Any, where: str) -> None:
    if job.task in CAUSAL_LM_TASKS and arch == "bert":
        raise LabsError(f"{where} is a BERT encoder, which task {job.task!r} (a causal LM) cannot train; use a "
                        f"llama or gpt2 preset (llama-tiny, gpt2-tiny, ...), a folder or a hub id")
    if job.task in CLASSIFIER_TASKS and arch in ("llama", "gpt2", "mistral") and _is_preset(job):
        raise LabsError(f"{where} is a causal-LM preset; task {job.task!r} classifies text with a bert preset "
                        f"(bert-tiny, bert-small, minilm-l6), a folder or a hub id")


def _is_preset(job: Job) -> bool:
    return job.model.name in PRESETS


def _check_lora(job: Job, options: Any, arch: Any, where: str) -> None:
    uses_lora = job.task == "tinyllama" or getattr(options, "finetune", None) == "lora"
    known = LORA_MODULES.get(arch) if isinstance(arch, str) else None
    if not uses_lora or known is None:
        return
    unknown = [t for t in options.lora_target_modules if t not in known]
    if unknown:
        raise LabsError(f"{job.path}: options.lora_target_modules has {unknown}, which LoRA cannot wrap in "
                        f"{arch} model {job.model.name!r}; choose from {', '.join(known)}")
