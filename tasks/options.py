"""Typed task options (the `options:` section of a job), one dataclass per lab.

Kept free of torch imports so that `labs plan` can check them in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FineTuneOptions:
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing)."""


@dataclass
class SimpleModelOptions:
    num_labels: int = 4
    """Number of classes; labels must be 0..num_labels-1 after data.label_offset."""
    label_names: list[str] = field(default_factory=lambda: ["World", "Sports", "Business", "Sci/Tech"])
    """Class names, in label order: per-class accuracy is logged as acc_<name> (e.g. acc_sci_tech)."""
    max_length: int = 128
    """Tokens per text (longer texts are truncated; batches are padded to their longest)."""


@dataclass
class TransferOptions:
    num_labels: int = 2
    """Number of classes (IMDB: 0 = negative, 1 = positive)."""
    label_names: list[str] = field(default_factory=lambda: ["negative", "positive"])
    """Class names, in label order, for the per-class accuracy."""
    max_length: int = 256
    """Tokens per review (truncated; batches are padded to their longest)."""
    finetune: str = "all"
    """What trains: head (classifier + pooler only) | last_k (head + the last `last_k` encoder layers)
    | all | lora (PEFT LoRA adapters on `lora_target_modules`, plus the head)."""
    last_k: int = 2
    """Encoder layers unfrozen by finetune=last_k."""
    lora_r: int = 8
    """LoRA rank (finetune=lora)."""
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    """Module names LoRA wraps (BERT: query, key, value, dense)."""
    merge: bool = False
    """finetune=lora: also write the merged full weights (hf/); the adapter goes to hf/adapter."""


@dataclass
class TinyLlamaOptions:
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Projections LoRA wraps (Llama attention and MLP)."""
    merge: bool = False
    """Also write the merged full weights in HF format to hf/ (the adapter always goes to hf/adapter)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing)."""


OPTIONS: dict[str, type] = {
    "fine_tune": FineTuneOptions,
    "simple_model": SimpleModelOptions,
    "transfer": TransferOptions,
    "tinyllama": TinyLlamaOptions,
}
