"""Embedding: a BERT-like encoder (all-MiniLM-L6-v2 by default), mean pooling over real tokens,
L2-normalised, so that an inner product is a cosine."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from tasks.api import LabsError
from tasks.classifier import minilm_path
from tasks.rag.progress import bar


class Embedder:
    """Sentence embeddings: a BERT-like encoder, mean pooling over real tokens, L2-normalised."""

    def __init__(self, name: str | None = None, max_length: int = 512):
        self.default = name is None
        if name is None:
            name = str(minilm_path())
        self.name = name
        self.label = "all-MiniLM-L6-v2" if self.default else name
        try:
            self.tok = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).eval()
        except Exception as e:
            raise LabsError(f"could not load embedder {name!r} ({type(e).__name__}); give a local folder "
                            f"with --embedder or leave it out for all-MiniLM-L6-v2") from None
        self.torch, self.max_length = torch, max_length

    def encode(self, texts: list[str], batch_size: int = 64, desc: str | None = None) -> np.ndarray:
        """Unit vectors [len(texts), dim]; with `desc`, a progress bar of that name (rank 0, terminal)."""
        torch, out = self.torch, []
        order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
        progress = bar(len(texts), desc, "text") if desc else None
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = [texts[j] for j in order[i:i + batch_size]]
                enc = self.tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
                if progress is not None:
                    progress.update(len(chunk))
        if progress is not None:
            progress.close()
        vecs = np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)
        result = np.empty_like(vecs)
        result[order] = vecs
        return result.astype(np.float32)
