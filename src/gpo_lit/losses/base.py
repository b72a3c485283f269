"""The interface between the model and its loss (DESIGN.md: one loss = one class + one config).

Each training step the model builds a :class:`PairEmbeddings` (the local batch's embeddings, ids
and, when mixing is on, how each image was mixed) and a :class:`StepInfo`, calls
:meth:`RetrievalLoss.training_loss` and logs what comes back. Three attributes tell the model what
a loss needs, so that a new loss never edits ``model.py``:

- ``uses_uncertainty``: the model builds a log σ² head per modality and fills ``img_logvar`` /
  ``cap_logvar`` (PCME++);
- ``mixing``: a batch augmentation applied to the raw images before the visual encoder (PCME++'s
  Mixup / CutMix); the model passes each image's mixing weight and partner id on;
- :meth:`RetrievalLoss.retrieval_vectors`: the vectors whose inner product is the test
  similarity (the dot product of the l2-normalised means unless a loss says otherwise), so the
  exact inner-product ranker evaluates every loss.

A loss is a ``_target_`` node in ``conf/loss/<name>.yaml``; learnable loss scalars (τ, a, b) are
ordinary parameters under ``loss_fn.`` (trained without weight decay: ``optim.no_weight_decay``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import Tensor, nn

from gpo_lit.dist import gather_no_grad, gather_with_grad, world_size
from gpo_lit.errors import GpoLitError

Side = Literal["img", "cap"]


@dataclass
class PairEmbeddings:
    """One batch of B matching pairs as the loss sees it: row i of ``img`` matches row i of ``cap``.

    Attributes:
        img, cap: ``[B, d]`` embeddings (means), l2-normalised by the model.
        img_ids: ``[B]`` image identity of each pair (two captions of one image share it).
        img_logvar, cap_logvar: ``[B, d]`` log σ² (only for losses with ``uses_uncertainty``).
        mix_lam: ``[B]`` weight of each image's own content after mixing (1 = not mixed).
        mix_ids: ``[B]`` image id of the partner mixed into each image (with weight 1 − λ).
    """

    img: Tensor
    cap: Tensor
    img_ids: Tensor
    img_logvar: Tensor | None = None
    cap_logvar: Tensor | None = None
    mix_lam: Tensor | None = None
    mix_ids: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.img.shape[0]
        if self.img.dim() != 2 or self.img.shape != self.cap.shape:
            raise ValueError(
                f"PairEmbeddings: expected img and cap of equal shape [B, d], got "
                f"{tuple(self.img.shape)} and {tuple(self.cap.shape)}"
            )
        for name in ("img_logvar", "cap_logvar"):
            t = getattr(self, name)
            if t is not None and t.shape != self.img.shape:
                raise ValueError(
                    f"PairEmbeddings: expected {name} of shape {tuple(self.img.shape)}"
                )
        for name in ("img_ids", "mix_lam", "mix_ids"):
            t = getattr(self, name)
            if t is not None and t.shape != (b,):
                raise ValueError(f"PairEmbeddings: expected {name} of shape [{b}]")
        if (self.mix_lam is None) != (self.mix_ids is None):
            raise ValueError("PairEmbeddings: mix_lam and mix_ids come together")

    @property
    def batch_size(self) -> int:
        return int(self.img.shape[0])

    def gathered(self) -> PairEmbeddings:
        """Every rank's pairs in rank order (a no-op in one process): embeddings with gradients
        (see :func:`gpo_lit.dist.gather_with_grad`), ids and mixing weights without."""
        if world_size() == 1:
            return self

        def grad(t: Tensor | None) -> Tensor | None:
            return None if t is None else gather_with_grad(t)

        def plain(t: Tensor | None) -> Tensor | None:
            return None if t is None else gather_no_grad(t.to(self.img.device))

        return replace(
            self,
            img=gather_with_grad(self.img),
            cap=gather_with_grad(self.cap),
            img_ids=gather_no_grad(self.img_ids.to(self.img.device)),
            img_logvar=grad(self.img_logvar),
            cap_logvar=grad(self.cap_logvar),
            mix_lam=plain(self.mix_lam),
            mix_ids=plain(self.mix_ids),
        )


@dataclass
class StepInfo:
    """Where training is: for warm-ups and ramps (0-based epoch and batch)."""

    epoch: int = 0
    batch_idx: int = 0
    batches_per_epoch: int | float = 0
    global_step: int = 0


@dataclass
class LossOutput:
    """The loss value and what the model logs next to it (``train/<key>``).

    Every loss logs ``negative_pool``: the negatives per query it used (global when gathering).
    """

    value: Tensor
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class RetrievalLoss(nn.Module):
    """Base class of every training loss (see the module docstring for the contract).

    Subclasses implement :meth:`training_loss`; they may override ``uses_uncertainty``,
    ``mixing`` and :meth:`retrieval_vectors`.

    Args:
        gather: under DDP, gather embeddings (with gradients) and ids from every rank so negatives
            come from the *global* batch; False: each rank's local batch only.
    """

    uses_uncertainty: bool = False

    def __init__(self, gather: bool = False) -> None:
        super().__init__()
        self.gather = bool(gather)
        # an instance attribute: a class-level default would shadow the registered sub-module
        self.mixing: nn.Module | None = None

    def training_loss(self, batch: PairEmbeddings, step: StepInfo) -> LossOutput:
        raise NotImplementedError  # pragma: no cover - interface

    def negative_pool(self, local_batch: int) -> int:
        """Negatives per query: the global batch minus one when gathering, else the local one."""
        return local_batch * (world_size() if self.gather else 1) - 1

    def retrieval_vectors(self, mean: Tensor, logvar: Tensor | None, side: Side) -> Tensor:
        """``[N, d']`` vectors whose inner products (image · caption) are the test similarity.

        Default: the l2-normalised mean itself (similarity = dot product).
        """
        return mean


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_LEGACY_TARGET = "gpo_lit.losses.TripletLoss"


def check_loss_node(node: dict[str, Any]) -> type[RetrievalLoss]:
    """The loss class a config node names, after checking its keys (cheap: nothing is built).

    Entry points call it before any long work; a node without ``_target_`` is the triplet loss's
    keyword arguments (the layout of checkpoints written before losses were config nodes).
    """
    from hydra.utils import get_class

    target = node.get("_target_", _LEGACY_TARGET)
    try:
        cls = get_class(target)
    except Exception as err:  # noqa: BLE001 - any unimportable target gets the same answer
        raise GpoLitError(
            f"loss._target_: expected an importable RetrievalLoss class, found {target!r} "
            f"({type(err).__name__})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, RetrievalLoss)):
        raise GpoLitError(
            f"loss._target_: expected a gpo_lit.losses.RetrievalLoss subclass, found {target!r}"
        )
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = [n for n in params if n != "self"]
        for key in sorted(set(node) - _HYDRA_KEYS - set(options)):
            raise GpoLitError(
                f"loss.{key}: expected an option of {target} ({', '.join(options)}), found "
                f"{key}={node[key]!r} (a setting of another loss, e.g. from the experiment: "
                f"drop it with ~loss.{key})"
            )
    return cls


def instantiate_loss(node: dict[str, Any]) -> RetrievalLoss:
    """Build the loss a config node names (checked by :func:`check_loss_node` first)."""
    from hydra.utils import instantiate

    check_loss_node(node)
    return instantiate({"_target_": _LEGACY_TARGET, **node}, _convert_="all")


def match_targets(batch: PairEmbeddings) -> Tensor:
    """``[B, B]`` float targets: ``T[i, j]`` = how much image i matches caption j.

    Pairs sharing an image id match (1). A mixed image i (weight ``λ_i`` of its own content, the
    rest from the image with id ``mix_ids[i]``) matches caption j with
    ``λ_i·[id_j = id_i] + (1 − λ_i)·[id_j = mix_id_i]``.
    """
    ids = batch.img_ids.to(batch.img.device)
    same = (ids[:, None] == ids[None, :]).to(batch.img.dtype)
    if batch.mix_lam is None or batch.mix_ids is None:
        return same
    lam = batch.mix_lam.to(batch.img)[:, None]
    partner = (batch.mix_ids.to(ids.device)[:, None] == ids[None, :]).to(batch.img.dtype)
    return lam * same + (1 - lam) * partner


def local_rows(batch_size: int, global_size: int) -> slice:
    """This rank's rows of a gathered batch (rank-ordered, equal local batches)."""
    if global_size == batch_size:
        return slice(0, batch_size)
    import torch.distributed as dist

    start = dist.get_rank() * batch_size
    return slice(start, start + batch_size)
