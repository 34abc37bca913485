"""The fusion head of the LOES paper and its training loop.

Per selected layer: LayerNorm(D_l) → Linear(D_l, hidden) → GELU; the branches
are combined by concatenation, mean, sum or learnable softmax weights; then
LayerNorm → Dropout → Linear to the outputs. With ``hidden=None`` the branches
are only layer-normalised, which with ``fusion="weighted"`` is the "learnable
layer weights" baseline (a softmax-weighted mix of layers, then a linear head).

Training (:class:`FusionProbe`) uses AdamW with a cosine learning-rate
schedule, stops early when the validation score has not improved for
``patience`` epochs, keeps the epoch with the best validation score (never the
test split), warns when that score does not beat a constant predictor, and is
deterministic given ``random_state``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from loes._exceptions import LOESError, LOESWarning
from loes._progress import ProgressSetting, progress
from loes._rng import seed_of
from loes._validation import normalize_task
from loes.stats import LayerMoments
from loes.store import FeatureStore
from loes.transfer._georeg import GeoReg
from loes.transfer._probes import _holdout_split, encode_labels, take_layers, task_score

__all__ = ["FUSIONS", "FusionHead", "FusionProbe", "lead_over_constant", "warn_without_lead"]

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "mean", "sum", "weighted")

#: Most validation rows held out of a feature store when ``fit`` gets no validation store.
STORE_MAX_VAL_ROWS = 20_000


class FusionHead(nn.Module):
    """Fuse the features of several layers and predict.

    Parameters
    ----------
    dims : sequence of int
        Width of each input layer.
    n_outputs : int
        Classes (classification) or target columns (regression).
    hidden : int or None
        Width of each branch's projection (256 in the paper). ``None``: no
        projection (all ``dims`` must be equal; fusion must not be concat).
    fusion : {"concat", "mean", "sum", "weighted"}
        How branches are combined; ``"weighted"`` learns softmax weights.
    dropout : float
        Dropout before the output layer (0.2 in the paper).

    Examples
    --------
    >>> import torch
    >>> head = FusionHead([16, 16, 32], n_outputs=3, hidden=8, fusion="weighted")
    >>> head([torch.zeros(5, 16), torch.zeros(5, 16), torch.zeros(5, 32)]).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        dims: Sequence[int],
        n_outputs: int,
        *,
        hidden: int | None = 256,
        fusion: str = "concat",
        dropout: float = 0.2,
    ):
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims:
            raise LOESError("FusionHead needs at least one input layer")
        if fusion not in FUSIONS:
            raise LOESError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        if hidden is None:
            if len(set(dims)) != 1:
                raise LOESError(f"hidden=None needs layers of equal width; got {dims}")
            if fusion == "concat" and len(dims) > 1:
                width = sum(dims)
            else:
                width = dims[0]
        else:
            width = hidden * len(dims) if fusion == "concat" else hidden
        self.fusion = fusion
        self.branches = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU())
            if hidden is not None
            else nn.Sequential(nn.LayerNorm(d))
            for d in dims
        )
        self.layer_logits = nn.Parameter(torch.zeros(len(dims))) if fusion == "weighted" else None
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, n_outputs)

    def layer_weights(self) -> torch.Tensor | None:
        """The softmax layer weights (``fusion="weighted"``), else None."""
        return None if self.layer_logits is None else torch.softmax(self.layer_logits, 0)

    def features(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused features before the output layer: (batch, width)."""
        if len(layers) != len(self.branches):
            raise LOESError(f"expected {len(self.branches)} layers; got {len(layers)}")
        parts = [branch(x) for branch, x in zip(self.branches, layers)]
        if self.fusion == "concat":
            fused = torch.cat(parts, dim=1)
        elif self.fusion == "weighted":
            w = torch.softmax(self.layer_logits, 0)
            fused = sum(wi * p for wi, p in zip(w, parts))
        else:
            fused = torch.stack(parts, 0).sum(0)
            if self.fusion == "mean":
                fused = fused / len(parts)
        return self.norm(fused)

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """Outputs (batch, n_outputs) from a list of (batch, dim_l) tensors."""
        return self.out(self.dropout(self.features(layers)))


class BestEpoch:
    """Keeps a copy of a module's weights at its best validation score so far.

    Higher is better (accuracy or R², :func:`~loes.transfer.task_score`).
    """

    def __init__(self):
        self.score: float | None = None
        self.epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: float, epoch: int, module: nn.Module) -> None:
        """Record ``module``'s weights if ``score`` beats the best so far."""
        if self.score is None or score > self.score:
            self.score, self.epoch = score, epoch
            self.state = copy.deepcopy(module.state_dict())

    def restore(self, module: nn.Module) -> None:
        """Load the best weights back into ``module`` and put it in eval mode."""
        module.load_state_dict(self.state)
        module.eval()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 0):
    """Linear warm-up then cosine decay to 0 over ``total_steps`` optimizer steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress_ = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lead_over_constant(out: torch.Tensor, y: torch.Tensor, task: str) -> tuple[float, float, float]:
    """``(constant's score, lead over it, standard error of the lead)`` of outputs ``out``.

    The lead is the mean of per-sample differences ``d``: correct(model) −
    correct(majority class), or ``(‖y − ȳ‖² − ‖y − ŷ‖²) / mean ‖y − ȳ‖²`` whose
    mean is the model's R²; its standard error is ``std(d) / √n``.
    """
    if task == "classification":
        majority = int(torch.bincount(y[y >= 0]).argmax())
        const = (y == majority).double()
        d = (out.argmax(1) == y).double() - const
        constant = float(const.mean())
    else:
        yy = y.double().reshape(y.shape[0], -1)
        sst = ((yy - yy.mean(0, keepdim=True)) ** 2).sum(1)
        sse = ((out.double().reshape(yy.shape) - yy) ** 2).sum(1)
        d = (sst - sse) / sst.mean().clamp(min=1e-300)
        constant = 0.0
    n = d.numel()
    se = float(d.std()) / math.sqrt(n) if n > 1 else 0.0
    return constant, float(d.mean()), se


def warn_without_lead(
    out: torch.Tensor,
    y: torch.Tensor,
    task: str,
    what: str,
    *,
    best_score: float,
    epoch: int,
    epochs_run: int,
    hint: str,
) -> float:
    """Warn (:class:`LOESWarning`) when the best epoch's validation outputs ``out`` do not beat
    a constant predictor by more than two standard errors; returns the constant's score.

    The best epoch is itself chosen on validation, so a smaller lead is noise.
    """
    constant, gain, se = lead_over_constant(out, y, task)
    if not gain > 2 * se:
        name = "the majority class" if task == "classification" else "the mean (R² 0)"
        warnings.warn(
            f"{what} does not beat a constant predictor on validation: best validation score "
            f"{best_score:.4f} (epoch {epoch + 1} of {epochs_run}) vs {constant:.4f} for always "
            f"predicting {name}, a lead of {gain:+.4f}, within two standard errors "
            f"({2 * se:.4f}); its predictions carry no clear signal here. {hint}",
            LOESWarning,
            stacklevel=3,
        )
    return constant


class FusionProbe:
    """Train a :class:`FusionHead` on cached embeddings of selected layers.

    Parameters
    ----------
    layers : sequence of int, optional
        Layer indices to fuse (all when None).
    task : {"classification", "regression"}
    hidden, fusion, dropout
        As in :class:`FusionHead`.
    epochs : int
        Most training epochs (the cosine schedule spans them); the epoch with
        the best validation score is kept.
    patience : int or None
        Stop when the validation score has not improved for this many epochs
        (default 5); None trains all ``epochs``.
    batch_size : int
    lr, weight_decay : float
        AdamW settings; the learning rate follows a cosine schedule.
    georeg : float or GeoReg, optional
        Weight of a :class:`GeoReg` term on the fused features (0/None: off),
        or a configured GeoReg module.
    val_fraction : float
        Share of the training data held out when ``fit`` gets no validation split.
    random_state : None, int, numpy or torch generator
        Seeds initialisation, shuffling and dropout (a private generator;
        :func:`loes._rng.seed_of`: None means fresh randomness).
    show_progress : bool or str

    Attributes
    ----------
    head_ : FusionHead
        The trained head (best validation epoch).
    history_ : list of dict
        Per epoch run: ``train_loss`` (task loss), ``reg_loss`` and ``val_score``.
    best_epoch_ : int
    best_val_score_ : float
    baseline_val_score_ : float
        Validation score of the best constant predictor: the majority class's
        share of the validation split (classification) or 0, the R² of its
        mean (regression). ``fit`` warns (:class:`LOESWarning`) when the
        head's best epoch does not beat it by more than two standard errors
        (paired over validation samples): the best epoch is itself chosen on
        validation, so a smaller lead is noise.
    stopped_early_ : bool
        True when training stopped before ``epochs`` for lack of progress.
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        *,
        task: str = "classification",
        hidden: int | None = 256,
        fusion: str = "concat",
        dropout: float = 0.2,
        epochs: int = 30,
        patience: int | None = 5,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        georeg: Any = None,
        val_fraction: float = 0.2,
        random_state: int | None = 0,
        show_progress: ProgressSetting = False,
    ):
        self.layers = layers
        self.task = task
        self.hidden = hidden
        self.fusion = fusion
        self.dropout = dropout
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.georeg = georeg
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.show_progress = show_progress

    def _prepare(self, embeddings: Any) -> list[torch.Tensor]:
        # after a store fit, in-memory inputs hold just the fitted layers, in order
        layers = None if hasattr(self, "store_layers_") else self.layers
        return [x.float() for x in take_layers(embeddings, layers)]

    def _targets(self, targets: Any, n: int, fit: bool) -> torch.Tensor:
        if self.task_ == "classification":
            ids, classes = encode_labels(targets, None if fit else self.classes_)
            if fit:
                self.classes_ = classes
            return ids
        arr = np.asarray(
            targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets,
            dtype=np.float32,
        ).reshape(n, -1)
        y = torch.from_numpy(arr)
        if fit:
            self.y_mean_, self.y_std_ = y.mean(0), y.std(0).clamp(min=1e-8)
        return y

    def fit(
        self,
        embeddings: Any,
        targets: Any = None,
        val_embeddings: Any = None,
        val_targets: Any = None,
    ):
        """Train on (embeddings, targets); keep the best epoch on the validation split.

        Parameters
        ----------
        embeddings : array of shape (n_train, n_layers, dim), list of layers, or FeatureStore
            A :class:`~loes.store.FeatureStore` (:func:`loes.store.load_features`)
            trains on rows larger than memory: one pass gives the per-feature
            mean and standard deviation (:class:`loes.stats.LayerMoments`), then
            each epoch reads the shards in a new random order with rows shuffled
            within each shard. ``layers`` are the model's layer indices as stored
            (default: all stored), the targets the store's own; validation is
            ``val_embeddings`` (another store) or a seeded sample of
            ``val_fraction`` of the rows (at most :data:`STORE_MAX_VAL_ROWS`),
            held in memory.
        targets : array of shape (n_train,) or (n_train, m) (None for a store)
        val_embeddings, val_targets : optional
            Validation split (else ``val_fraction`` of the training data).

        Returns
        -------
        self
        """
        self.task_ = normalize_task(self.task)
        if self.task_ == "label_free":
            raise LOESError("a probe needs targets: task must be 'classification' or 'regression'")
        if self.patience is not None and (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or self.patience < 1
        ):
            raise LOESError(
                f"patience must be a positive integer (epochs without improvement) or None; "
                f"got {self.patience!r}"
            )
        seed = seed_of(self.random_state)
        gen = torch.Generator().manual_seed(seed)
        if isinstance(embeddings, FeatureStore):
            widths, n, xs_va, y_va, batches = self._store_data(embeddings, val_embeddings, seed)
        else:
            if targets is None:
                raise LOESError("fit needs targets (one per row), or a feature store that has them")
            self.__dict__.pop("store_layers_", None)
            widths, n, xs_va, y_va, batches = self._memory_data(
                embeddings, targets, val_embeddings, val_targets, gen
            )
        if self.task_ == "classification":
            if len(self.classes_) < 2:
                raise LOESError("classification needs at least 2 classes in the training split")
            n_out = len(self.classes_)
            loss_fn = nn.CrossEntropyLoss()
        else:
            n_out = y_va.shape[1]
            loss_fn = nn.MSELoss()

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initialisation and dropout, restored on exit
            head = FusionHead(
                widths,
                n_out,
                hidden=self.hidden,
                fusion=self.fusion,
                dropout=self.dropout,
            )
            reg = self.georeg
            if reg is not None and not isinstance(reg, GeoReg):
                reg = GeoReg(weight=float(reg), random_state=seed) if float(reg) > 0 else None
            steps_per_epoch = max(1, math.ceil(n / self.batch_size))
            opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = cosine_schedule(
                opt, self.epochs * steps_per_epoch, warmup=min(steps_per_epoch, 10)
            )
            best = BestEpoch()
            self.history_: list[dict[str, float]] = []
            for epoch in progress(
                range(self.epochs),
                self.show_progress,
                desc="fusion head",
                total=self.epochs,
                unit="epoch",
            ):
                head.train()
                tot_task, tot_reg = 0.0, 0.0
                for batch, y_batch in batches(epoch):
                    feats = head.features(batch)
                    out = head.out(head.dropout(feats))
                    loss = loss_fn(out, y_batch)
                    total = loss
                    if reg is not None:
                        r = reg(feats, y_batch if self.task_ == "classification" else None)
                        total = total + r
                        tot_reg += float(r.detach()) * len(y_batch)
                    opt.zero_grad()
                    total.backward()
                    opt.step()
                    sched.step()
                    tot_task += float(loss.detach()) * len(y_batch)
                score = self._evaluate(head, xs_va, y_va)
                self.history_.append(
                    {
                        "epoch": epoch,
                        "train_loss": tot_task / n,
                        "reg_loss": tot_reg / n,
                        "val_score": score,
                    }
                )
                best.update(score, epoch, head)
                if self.patience is not None and epoch - best.epoch >= self.patience:
                    break
        best.restore(head)
        self.head_ = head
        self.best_val_score_, self.best_epoch_ = best.score, best.epoch
        self.stopped_early_ = len(self.history_) < self.epochs
        self.baseline_val_score_ = warn_without_lead(
            self._raw(head, xs_va),
            y_va,
            self.task_,
            f"FusionProbe(layers={self.layers}, fusion={self.fusion!r}, hidden={self.hidden}, "
            f"georeg={self.georeg!r})",
            best_score=self.best_val_score_,
            epoch=self.best_epoch_,
            epochs_run=len(self.history_),
            hint="Try a LinearProbe, more training data, or other layers.",
        )
        return self

    def _memory_data(self, embeddings, targets, val_embeddings, val_targets, gen):
        """Standardise in-memory rows: ``(widths, n_train, xs_va, y_va, batches)``."""
        layers = self._prepare(embeddings)
        n = layers[0].shape[0]
        y = self._targets(targets, n, fit=True)
        if val_embeddings is None:
            strat = y if self.task_ == "classification" else None
            tr, va = _holdout_split(n, self.val_fraction, self.random_state, strat)
            va_layers, y_va = [x[va] for x in layers], y[va]
            layers, y = [x[tr] for x in layers], y[tr]
        else:
            va_layers = self._prepare(val_embeddings)
            y_va = self._targets(val_targets, va_layers[0].shape[0], fit=False)
            if self.task_ == "regression":
                self.y_mean_, self.y_std_ = y.mean(0), y.std(0).clamp(min=1e-8)
        n = layers[0].shape[0]
        self.means_ = [x.mean(0, keepdim=True) for x in layers]
        self.stds_ = [x.std(0, keepdim=True).clamp(min=1e-6) for x in layers]
        xs = self._scale(layers)
        y_train = y if self.task_ == "classification" else (y - self.y_mean_) / self.y_std_

        def batches(epoch: int):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                if idx.numel() < 2 and n >= 2:
                    continue  # LayerNorm/GeoReg need a batch; skip a final singleton
                yield [x[idx] for x in xs], y_train[idx]

        return [x.shape[1] for x in xs], n, self._scale(va_layers), y_va, batches

    def _store_data(self, store: FeatureStore, val: Any, seed: int):
        """Stream a feature store: ``(widths, n_train, xs_va, y_va, batches)``.

        One pass gives the training rows' per-feature mean and standard deviation
        (:class:`loes.stats.LayerMoments`) and collects the validation rows:
        ``val`` (another store, read into memory), or a seeded sample of
        ``val_fraction`` of the rows, at most :data:`STORE_MAX_VAL_ROWS`. Each
        epoch then reads the shards in a new random order, rows shuffled within
        each shard (:meth:`FeatureStore.batches`).
        """
        if val is not None and not isinstance(val, FeatureStore):
            raise LOESError("with a feature store, val_embeddings must be a feature store too")
        layers = list(self.layers) if self.layers is not None else store.layers
        self.store_layers_ = layers
        targets = store.targets
        if targets is None:
            raise LOESError(f"the feature store {store.path} has no targets to train a head on")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(store), dtype=bool)
        if val is None:
            n_val = min(max(1, round(self.val_fraction * len(store))), STORE_MAX_VAL_ROWS)
            held[rng.choice(len(store), size=n_val, replace=False)] = True
        y_all = self._targets(targets[~held], int((~held).sum()), fit=True)
        moments = LayerMoments()
        va_parts: list[list[torch.Tensor]] = []
        va_y: list[Any] = []
        for x, y, idx in store.batches(layers=layers, with_indices=True):
            parts = list(x.unbind(1)) if torch.is_tensor(x) else list(x)
            keep = torch.from_numpy(~held[idx])
            if keep.any():
                moments.update([p[keep] for p in parts])
            if val is None and not keep.all():
                va_parts.append([p[~keep] for p in parts])
                va_y.append(y[~keep.numpy()])
        if val is not None:
            for x, y in val.batches(layers=layers):
                va_parts.append(list(x.unbind(1)) if torch.is_tensor(x) else list(x))
                va_y.append(y)
        n = moments.n
        self.means_ = [torch.from_numpy(m.mean).float().reshape(1, -1) for m in moments]
        self.stds_ = [
            torch.from_numpy(np.sqrt(np.diag(m.m2) / max(n - 1, 1)))
            .float()
            .reshape(1, -1)
            .clamp(min=1e-6)
            for m in moments
        ]
        va_layers = [torch.cat([b[j] for b in va_parts]) for j in range(len(layers))]
        y_va = self._targets(np.concatenate(va_y), va_layers[0].shape[0], fit=False)
        if self.task_ == "regression":
            self.y_mean_, self.y_std_ = y_all.mean(0), y_all.std(0).clamp(min=1e-8)

        def batches(epoch: int):
            for x, y, idx in store.batches(
                self.batch_size,
                layers=layers,
                shuffle=True,
                random_state=seed + epoch,
                with_indices=True,
            ):
                keep = torch.from_numpy(~held[idx])
                if int(keep.sum()) < 2:
                    continue  # LayerNorm/GeoReg need a batch
                parts = list(x.unbind(1)) if torch.is_tensor(x) else list(x)
                yb = self._targets(y[keep.numpy()], int(keep.sum()), fit=False)
                if self.task_ == "regression":
                    yb = (yb - self.y_mean_) / self.y_std_
                yield self._scale([p[keep] for p in parts]), yb

        return list(moments.widths), n, self._scale(va_layers), y_va, batches

    def _scale(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(x - m) / s for x, m, s in zip(layers, self.means_, self.stds_)]

    def _raw(self, head: FusionHead, xs: list[torch.Tensor]) -> torch.Tensor:
        head.eval()
        with torch.no_grad():
            out = head(xs)
        if self.task_ == "regression":
            out = out * self.y_std_ + self.y_mean_
        return out

    def _evaluate(self, head: FusionHead, xs: list[torch.Tensor], y: torch.Tensor) -> float:
        out = self._raw(head, xs)
        if self.task_ == "classification":
            return task_score(out.argmax(1), y, "classification")
        return task_score(out, y, "regression")

    def decision_function(self, embeddings: Any) -> torch.Tensor:
        """Raw outputs (n_samples, n_outputs): logits or predicted values."""
        if not hasattr(self, "head_"):
            raise LOESError("this probe is not fitted yet: call fit(embeddings, targets) first")
        if isinstance(embeddings, FeatureStore):
            layers = getattr(self, "store_layers_", self.layers)
            return torch.cat(
                [self.decision_function(x) for x, _ in embeddings.batches(layers=layers)]
            )
        return self._raw(self.head_, self._scale(self._prepare(embeddings)))

    def predict(self, embeddings: Any):
        """Class labels (classification) or predicted values (regression)."""
        out = self.decision_function(embeddings)
        if self.task_ == "classification":
            return np.asarray(self.classes_)[out.argmax(1).numpy()]
        return out.squeeze(1).numpy() if out.shape[1] == 1 else out.numpy()

    def score(self, embeddings: Any, targets: Any = None) -> float:
        """Accuracy (classification) or R² (regression): higher is better.

        ``targets`` may be omitted for a feature store (its own targets are used).
        """
        if isinstance(embeddings, FeatureStore) and targets is None:
            targets = embeddings.targets
        if targets is None:
            raise LOESError("score needs targets (or a feature store that has them)")
        out = self.decision_function(embeddings)
        y = self._targets(targets, out.shape[0], fit=False)
        if self.task_ == "classification":
            return task_score(out.argmax(1), y, "classification")
        return task_score(out, y, "regression")
