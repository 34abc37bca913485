"""Fine-tuning: a trainable Hugging Face backbone with a fusion head on selected layers.

The backbone's hidden states of the selected layers are mean-pooled over the
attention mask and fed to a :class:`~loes.transfer.FusionHead`; backbone and
head are trained together with AdamW (separate learning rates) and a cosine
schedule, optionally with :class:`~loes.transfer.GeoReg` on the fused
features. The epoch with the best validation score is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from loes._deps import require
from loes._exceptions import LOESError
from loes._linalg import masked_mean
from loes._progress import ProgressSetting, progress
from loes._rng import seed_of
from loes._validation import normalize_task
from loes.transfer._fusion import BestEpoch, FusionHead, cosine_schedule, warn_without_lead
from loes.transfer._georeg import GeoReg
from loes.transfer._probes import encode_labels, task_score

__all__ = ["FineTunedModel", "finetune"]

logger = logging.getLogger(__name__)


class FineTunedModel(nn.Module):
    """A backbone plus a fusion head over mean-pooled hidden states of ``layers``.

    ``layers`` count transformer blocks from 0 (``hidden_states[i + 1]``), as
    in the selector's results.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        head: FusionHead,
        layers: Sequence[int],
        task: str,
        classes: list | None = None,
        max_length: int = 128,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.layers = [int(i) for i in layers]
        self.task = task
        self.classes = classes
        self.max_length = max_length
        self.y_mean = None
        self.y_std = None

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.backbone.parameters()).device
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(device) for k, v in enc.items()}

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Fused features (batch, width) of a batch of texts."""
        enc = self._encode(texts)
        out = self.backbone(**enc, output_hidden_states=True)
        states = out.hidden_states
        if max(self.layers) + 1 >= len(states):
            raise LOESError(
                f"layer {max(self.layers)} does not exist: the backbone has "
                f"{len(states) - 1} layers"
            )
        mask = enc.get(
            "attention_mask", torch.ones(enc["input_ids"].shape, device=states[0].device)
        )
        pooled = [masked_mean(states[i + 1], mask).float() for i in self.layers]
        return self.head.features(pooled)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Outputs (batch, n_outputs)."""
        return self.head.out(self.head.dropout(self.features(texts)))

    @torch.no_grad()
    def decision_function(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Logits or predicted values for ``texts`` (eval mode, batched)."""
        self.eval()
        outs = [self(texts[i : i + batch_size]).cpu() for i in range(0, len(texts), batch_size)]
        out = torch.cat(outs)
        if self.task == "regression":
            out = out * self.y_std + self.y_mean
        return out

    def predict(self, texts: Sequence[str]):
        """Class labels (classification) or predicted values (regression)."""
        out = self.decision_function(list(texts))
        if self.task == "classification":
            return np.asarray(self.classes)[out.argmax(1).numpy()]
        return out.squeeze(1).numpy() if out.shape[1] == 1 else out.numpy()

    def score(self, texts: Sequence[str], targets: Any) -> float:
        """Accuracy (classification) or R² (regression): higher is better."""
        out = self.decision_function(list(texts))
        if self.task == "classification":
            ids, _ = encode_labels(targets, self.classes)
            return task_score(out.argmax(1), ids, "classification")
        y = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(out.shape[0], -1)
        return task_score(out, y, "regression")


def finetune(
    model: Any,
    texts: Sequence[str],
    targets: Any,
    layers: Sequence[int],
    *,
    val_texts: Sequence[str],
    val_targets: Any,
    tokenizer: Any = None,
    task: str = "classification",
    fusion: str = "concat",
    hidden: int = 256,
    dropout: float = 0.2,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 2e-5,
    head_lr: float = 1e-3,
    weight_decay: float = 1e-2,
    georeg: Any = None,
    max_length: int = 128,
    freeze_backbone: bool = False,
    random_state: int | None = 0,
    show_progress: ProgressSetting = "auto",
) -> FineTunedModel:
    """Fine-tune a Hugging Face text encoder with a fusion head on ``layers``.

    Parameters
    ----------
    model : str or transformers.PreTrainedModel
        A local model folder or a loaded model (its ``forward`` must accept
        ``output_hidden_states``).
    texts : sequence of str, length n_train
    targets : array of shape (n_train,) labels, or (n_train,) / (n_train, m) numbers
    layers : sequence of int
        Selected layers (0 = first transformer block), e.g. ``result.selected_layers``.
    val_texts, val_targets
        Validation split; the best epoch on it is kept.
    tokenizer : optional
        Defaults to ``AutoTokenizer.from_pretrained(model)`` for a folder.
    task, fusion, hidden, dropout
        As in :class:`~loes.transfer.FusionProbe`.
    epochs, batch_size, lr, head_lr, weight_decay
        AdamW with learning rate ``lr`` for the backbone and ``head_lr`` for
        the head, cosine schedule over all steps.
    georeg : float or GeoReg, optional
        GeoReg weight (or module) on the fused features; off by default.
    freeze_backbone : bool
        Train only the head (the backbone still runs every step).
    random_state : int, optional
        Seeds the head's initialisation, dropout and shuffling; the global RNG
        is restored afterwards.

    Returns
    -------
    FineTunedModel
        In eval mode; ``history_`` holds per-epoch losses and validation scores,
        ``best_val_score_`` the kept epoch's and ``baseline_val_score_`` that of a
        constant predictor. Warns (:class:`~loes.LOESWarning`) when the kept
        epoch does not beat the constant by more than two standard errors, as
        :class:`~loes.transfer.FusionProbe` does.
    """
    task = normalize_task(task)
    if task == "label_free":
        raise LOESError("fine-tuning needs targets: task must be 'classification' or 'regression'")
    if isinstance(model, str):
        transformers = require("transformers", extra="hf")
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        model = transformers.AutoModel.from_pretrained(model)
    if tokenizer is None:
        raise LOESError("pass tokenizer= when model is a loaded model object")
    texts, val_texts = list(texts), list(val_texts)
    if len(texts) != len(targets) or len(val_texts) != len(val_targets):
        raise LOESError(
            f"texts and targets must have equal lengths; got {len(texts)} texts and "
            f"{len(targets)} targets (validation: {len(val_texts)} and {len(val_targets)})"
        )
    if not layers:
        raise LOESError("layers is empty: pass the selected layer indices")
    classes = None
    if task == "classification":
        y, classes = encode_labels(targets)
        y_va, _ = encode_labels(val_targets, classes)
        n_out = len(classes)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        y = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(len(texts), -1)
        y_va = torch.as_tensor(np.asarray(val_targets, dtype=np.float32)).reshape(
            len(val_texts), -1
        )
        n_out = y.shape[1]
        loss_fn = nn.MSELoss()
    dim = int(getattr(model.config, "hidden_size", 0) or model.config.to_dict().get("d_model", 0))
    seed = seed_of(random_state)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FusionHead([dim] * len(layers), n_out, hidden=hidden, fusion=fusion, dropout=dropout)
        wrapped = FineTunedModel(
            model, tokenizer, head.to(device), layers, task, classes, max_length
        )
        if task == "regression":
            wrapped.y_mean, wrapped.y_std = y.mean(0), y.std(0).clamp(min=1e-8)
            y_train = (y - wrapped.y_mean) / wrapped.y_std
        else:
            y_train = y
        for p in model.parameters():
            p.requires_grad_(not freeze_backbone)
        groups = [{"params": head.parameters(), "lr": head_lr}]
        if not freeze_backbone:
            groups.append({"params": model.parameters(), "lr": lr})
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
        n = len(texts)
        steps = epochs * max(1, math.ceil(n / batch_size))
        sched = cosine_schedule(opt, steps, warmup=max(1, steps // 10))
        reg = georeg
        if reg is not None and not isinstance(reg, GeoReg):
            reg = GeoReg(weight=float(reg), random_state=seed) if float(reg) > 0 else None
        best, history = BestEpoch(), []
        for epoch in range(epochs):
            wrapped.train()
            order = torch.randperm(n, generator=gen).tolist()
            total = 0.0
            batches = range(0, n, batch_size)
            for start in progress(
                batches,
                show_progress,
                desc=f"fine-tune epoch {epoch + 1}/{epochs}",
                total=len(batches),
                unit="batch",
            ):
                idx = order[start : start + batch_size]
                feats = wrapped.features([texts[i] for i in idx])
                out = head.out(head.dropout(feats))
                target = y_train[idx].to(device)
                loss = loss_fn(out, target)
                full = (
                    loss
                    if reg is None
                    else loss + reg(feats, target if task == "classification" else None)
                )
                opt.zero_grad()
                full.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            score = wrapped.score(
                val_texts, val_targets if task == "classification" else y_va.numpy()
            )
            history.append({"epoch": epoch, "train_loss": total / n, "val_score": score})
            logger.info(
                "fine-tune epoch %d: loss %.4f, validation %.4f", epoch + 1, total / n, score
            )
            best.update(score, epoch, wrapped)
        best.restore(wrapped)
    wrapped.history_ = history
    wrapped.best_val_score_ = best.score
    wrapped.baseline_val_score_ = warn_without_lead(
        wrapped.decision_function(val_texts),
        y_va,
        task,
        f"finetune(layers={list(layers)}, fusion={fusion!r}, epochs={epochs})",
        best_score=best.score,
        epoch=best.epoch,
        epochs_run=len(history),
        hint="Try more epochs or training data, another learning rate, or other layers.",
    )
    return wrapped
