"""NPID: Non-Parametric Instance Discrimination (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"), with a bounded memory bank for an unbounded stream.

Every instance is its own class. Instead of a weight vector per class, a memory bank holds one
L2-normalised embedding per instance from earlier visits; an image's embedding is trained to be closer
to its own bank entry than to other instances' entries, under a softmax with temperature. The full
softmax over all instances is approximated, as in the paper, by sampling a few thousand bank entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.distributed import gather_from_all
from streamssl.models.losses import info_nce
from streamssl.models.method import Method, embedding_std


class NPID(Method):
    """NPID on one device, with a direct-mapped memory bank.

    Hyper-parameters (keyword-only, defaults in brackets):
        dim: width of the projected, L2-normalised embedding [128, the paper's].
        bank_size: slots in the memory bank [131072 (64 MiB at dim 128): hashed ids collide, and a record
            hits only if no other record shares its slot, so a set of N records cycled through the bank
            hits at about exp(-N / bank_size): ~0.63 for Fashion-MNIST's 60k, ~0.40 with 65536 slots].
        negatives: bank entries drawn uniformly per step, shared by the batch, as the softmax's negatives
            [4096, the paper's m].
        temperature: tau of the non-parametric softmax [0.07, the paper's].
        momentum: bank entry <- normalize(m · entry + (1 - m) · new embedding) on a revisit [0.5, the
            paper's].

    The bank of a stream cannot hold every instance, so it is a direct-mapped table: the record with id
    `i` lives in slot `i mod bank_size`, and `bank_ids` (the tag) records which id each slot holds
    (-1: none yet). When a batch arrives, a record whose slot holds its own id is a *hit*: the slot's
    entry is its positive, it contributes to the loss, and the entry is then moved towards its new
    embedding with the momentum. Any other record is a *miss* (never seen, or evicted by another id with
    the same slot): it is left out of the loss and its embedding takes over the slot, tag included.
    Ids are hashes of record keys, so distinct records can share a slot even when bank_size exceeds the
    number of records; they then evict each other. Two rows of one batch with the same slot (the same
    record twice, or two colliding ids): the loss sees both against the bank as it was before the batch,
    and the last of them in the batch decides what is written.

    Loss: for each hit embedding f with positive v and the sampled entries n_1..n_m, the cross-entropy
    of [f·v, f·n_1, ..., f·n_m] / tau with target 0 (a sampled softmax, the same form as `info_nce`),
    averaged over the hits. A batch without a hit gives a zero loss still connected to the graph. The
    sampled entries may include unfilled slots (random unit vectors) and the hits' own slots.

    State (buffers, so a checkpoint of `state_dict()` resumes exactly): bank [bank_size, dim], initially
    random unit vectors as in the paper, and bank_ids [bank_size].

    Logs: `embedding_std` (collapse signal), `bank_hit_ratio` (share of this batch that were hits),
    `bank_fill` (share of slots holding an instance, after this batch's writes).
    """

    name = "npid"
    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        dim: int = 128,
        bank_size: int = 131072,
        negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if bank_size < 1 or negatives < 1:
            raise ValueError("bank_size and negatives must be at least 1")
        self.negatives = negatives
        self.temperature = temperature
        self.momentum = momentum
        self.head = nn.Linear(feature_dim, dim)
        self.register_buffer("bank", F.normalize(torch.randn(bank_size, dim), dim=1))
        self.register_buffer("bank_ids", torch.full((bank_size,), -1, dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if ids is None:
            raise ValueError("NPID needs the record ids: its memory bank is indexed by them")
        embeddings = F.normalize(self.head(self.backbone(views[0])).float(), dim=1)  # f = normalize(W·backbone(x))
        ids = ids.to(self.bank_ids.device)
        slots = ids % len(self.bank)
        hits = self.bank_ids[slots] == ids
        # Indexing copies: the bank is overwritten in place below while autograd still needs these rows.
        positives = self.bank[slots]
        sampled = self.bank[torch.randint(len(self.bank), (self.negatives,)).to(self.bank.device)]
        # Without a hit there is nothing to discriminate yet: a zero the trainer can still backward.
        loss = (info_nce(embeddings[hits], positives[hits], sampled, self.temperature) if hits.any()
                else 0 * embeddings.sum())
        # With several workers every bank takes the global batch, so the banks stay identical; hit or miss is
        # judged against the bank as it was before this batch, the same on every worker.
        all_embeddings, all_ids = gather_from_all(embeddings.detach()), gather_from_all(ids)
        all_slots = all_ids % len(self.bank)
        self._update_bank(all_embeddings, all_ids, all_slots, self.bank_ids[all_slots] == all_ids)
        return loss, self._logs(embeddings, hits)

    @torch.no_grad()
    def _update_bank(self, embeddings: Tensor, ids: Tensor, slots: Tensor, hits: Tensor) -> None:
        """Hits: entry <- normalize(m·entry + (1-m)·f); misses: entry <- f and the slot's tag <- id."""
        blended = F.normalize(self.momentum * self.bank[slots] + (1 - self.momentum) * embeddings, dim=1)
        new_entries = torch.where(hits[:, None], blended, embeddings)
        # Rows sharing a slot all write the value of the last of them: deterministic where index_copy_
        # with repeated indices is not (CUDA), and no data-dependent shapes, so no host sync.
        row = torch.arange(len(slots), device=slots.device)
        same_slot = slots[:, None] == slots[None, :]
        last_row = torch.where(same_slot, row[None, :], -1).amax(dim=1)
        self.bank.index_copy_(0, slots, new_entries[last_row])
        self.bank_ids.index_copy_(0, slots, ids[last_row])

    @torch.no_grad()
    def _logs(self, embeddings: Tensor, hits: Tensor) -> dict[str, Tensor]:
        return {
            "embedding_std": embedding_std(embeddings),
            "bank_hit_ratio": hits.float().mean(),
            "bank_fill": (self.bank_ids >= 0).float().mean(),
        }
