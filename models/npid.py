"""NPID: Non-Parametric Instance Discrimination (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"), with a bounded memory bank for an unbounded stream.

Every instance is its own class. Instead of a weight vector per class, a memory bank holds one
L2-normalised embedding per instance from earlier visits; an image's embedding is trained to be closer
to its own bank entry than to other instances' entries, under a softmax with temperature. The full
softmax over all instances is approximated, as in the paper, by sampling a few thousand bank entries.
The bank's bookkeeping (which slot holds a record, sampling, writing a batch) is in models/memory_bank.py.

On a stream the paper's positive fails: an instance comes back rarely (never, in one pass), so its entry is an
embedding by a much earlier encoder. Measured (150k samples, 2.5 passes over Fashion-MNIST): the first pass is all
misses and trains only the uniformity half of the objective, and at the revisits the loss rose above ln(m + 1),
the entries being further from their records than random negatives; the encoder ended 12 points below the
untrained one. So by default (`positive="view"`) the positive is what the entry stands for, an embedding of the
same instance under another augmentation, taken now: a second view, embedded without gradient. The bank keeps its
role as the source of negatives, written as in the paper. `positive="bank"` is the paper's.

That alone still fell below the untrained encoder (150k samples: 68–74%, embedding std down to 0.004): the online
encoder moves too fast for its own bank, so the negatives are inconsistent with each other and with the query, as
MoCo measured for a key encoder without momentum. So the second view and the bank writes come from a momentum copy
of the encoder (`key_momentum`, MoCo's), which moved it to 79.6% at 150k samples.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.distributed import gather_from_all
from streamssl.models.losses import info_nce
from streamssl.models.memory_bank import lookup, sample_filled_slots, write_bank
from streamssl.models.method import Method, ViewSpec, embedding_std, momentum_update


class NPID(Method):
    """NPID on one device, with a set-associative memory bank.

    Hyper-parameters (keyword-only, defaults in brackets):
        dim: width of the projected, L2-normalised embedding [128, the paper's].
        bank_size: slots in the memory bank, a multiple of `ways` [131072 (64 MiB at dim 128): with 8 ways
            a set of 60k records (Fashion-MNIST) written once keeps ~99.5% of them; only sets that more
            than 8 of them hash to lose records].
        ways: slots per set of the bank [8].
        negatives: m, bank entries drawn per step, uniformly with replacement among the written slots and
            shared by the batch, as the softmax's negatives [4096, the paper's].
        temperature: tau of the non-parametric softmax [0.1, as the authors' CIFAR code; the paper's
            ImageNet runs use 0.07].
        momentum: bank entry <- normalize(m · entry + (1 - m) · new embedding) on a revisit [0.5, the
            paper's].
        positive: "view": the embedding of a second augmented view, without gradient (the module docstring
            says why); "bank": the paper's, the record's bank entry on a hit (see Loss) ["view"].
        key_momentum: with `positive="view"`, the second view's embedding and every bank write come from a key
            encoder that follows this one by key <- m · key + (1 - m) · online after each step, as MoCo's;
            0: from the online encoder itself [0.99, MoCo's].

    The bank of a stream cannot hold every instance, so it is a cache: `bank_size / ways` sets of `ways`
    slots, the record with id `i` may live in any slot of set `i mod num_sets`, and `bank_ids` (the tag)
    says which id each slot holds (-1: none yet). A record whose set holds a slot tagged with its id is a
    *hit*: that entry is its positive, and after the step it moves towards the new embedding with the
    momentum. Any other record is a *miss* (never seen, or evicted): after the step its embedding takes
    the set's empty slot if there is one, else the slot of the set written least recently
    (`bank_written`, the `bank_clock` of that write), tag included. A direct-mapped bank (1 way) would
    let two records with the same slot evict each other on every visit, forever; with 8 ways, records
    are lost only where more than 8 live records share a set.

    One batch (with several workers: the global batch) is judged against the bank as it was before the
    batch, and then written in one go:
        - the same id in several rows: the last of them decides what is written (one write per record);
        - slots that this batch hits keep their record: the batch's new records only take the set's other
          slots, empty ones first, then the least recently written; two new records of one set each get
          a slot of their own;
        - more new records in a set than such slots: the last of them in the batch get the slots (the
          most recent ones are the ones worth keeping, as for any LRU cache), the others are not stored
          and miss again next time.

    Loss: for each embedding f with positive v and the sampled entries n_1..n_m, the cross-entropy of
    [f·v, f·n_1, ..., f·n_m] / tau with target 0 (`info_nce`), averaged over the whole batch. With
    `positive="view"`, v is the second view's embedding for every record. With "bank", the paper's: a miss
    has no entry yet; its positive is its own embedding, detached: the entry its slot is about to hold,
    as the paper's v_i <- f_i would write it. Its positive logit is then a constant (f·f = 1), so its
    only gradient pushes f away from the sampled entries (the uniformity half of the NCE objective)
    instead of the miss giving no gradient at all (which made a whole first pass over a data set
    train nothing). Negatives are drawn only from written slots, never from empty ones, but may include
    a batch member's own entry (as in the paper, where one of m draws among all instances rarely is).
    Before anything is written (the first step of a run) there is no entry to draw: each record's
    negatives are then the other records' positives in its batch.

    Bank writes and the key encoder's momentum update happen in `commit_step()` (staged by `forward`), so a
    step with a non-finite loss never touches them; with several workers every worker writes the whole
    global batch, so the banks stay identical. No host sync: hit tests, slot allocation and sampling are all tensor ops.

    State (buffers, so a checkpoint of `state_dict()` resumes exactly): bank [bank_size, dim] float32
    entries (zero until written; an unwritten slot is never read), bank_ids [bank_size] tags,
    bank_written [bank_size] `bank_clock` of each slot's last write (-1: never), bank_clock (writes
    committed so far); key_backbone, key_head, the key encoder (parameters without gradient). The sampled
    negatives come from torch's default (CPU) generator, which the trainer checkpoints.

    Logs: `embedding_std` (collapse signal), `bank_hit_ratio` (share of this batch that were hits),
    `bank_fill` (share of slots holding an instance, as this batch found the bank).
    """

    # The State buffers above, registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    bank: Tensor
    bank_ids: Tensor
    bank_written: Tensor
    bank_clock: Tensor

    name = "npid"
    num_views = 1  # the paper's; `views()` asks for a second with positive="view"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        dim: int = 128,
        bank_size: int = 131072,
        ways: int = 8,
        negatives: int = 4096,
        temperature: float = 0.1,
        momentum: float = 0.5,
        positive: Literal["view", "bank"] = "view",
        key_momentum: float = 0.99,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if bank_size < 1 or ways < 1 or negatives < 1:
            raise ValueError("bank_size, ways and negatives must be at least 1")
        if bank_size % ways:
            raise ValueError(f"bank_size ({bank_size}) must be a multiple of ways ({ways})")
        self.ways = ways
        self.negatives = negatives
        self.temperature = temperature
        self.momentum = momentum
        self.positive = positive
        self.head = nn.Linear(feature_dim, dim)
        self.key_momentum = key_momentum
        self.keyed = positive == "view" and key_momentum > 0
        if self.keyed:
            self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        # Slot s belongs to set s // ways: the slots of a set are contiguous rows.
        self.register_buffer("bank", torch.zeros(bank_size, dim))
        self.register_buffer("bank_ids", torch.full((bank_size,), -1, dtype=torch.long))
        self.register_buffer("bank_written", torch.full((bank_size,), -1, dtype=torch.long))
        self.register_buffer("bank_clock", torch.zeros((), dtype=torch.long))

    def views(self) -> ViewSpec:
        return replace(super().views(), full=2 if self.positive == "view" else 1)

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if ids is None:
            raise ValueError("NPID needs the record ids: its memory bank is indexed by them")
        embeddings = self._embed(views[0])  # f = normalize(W·backbone(x))
        ids = ids.to(self.bank_ids.device)
        _, hits, slots = lookup(self.bank_ids, ids, self.ways)
        filled = self.bank_ids >= 0
        if self.positive == "view":
            with torch.no_grad():
                positives = self._embed(views[1], keys=self.keyed)
        else:  # a hit's positive is its entry v_i; a miss's the entry it is about to write, its own f (detached)
            positives = torch.where(hits[:, None], self.bank[slots], embeddings.detach())
        loss = info_nce(embeddings, positives, self.bank[sample_filled_slots(filled, self.negatives)], self.temperature)
        # Nothing written yet (the run's first step): the batch's other records are the negatives. A `where`,
        # not an `if`: choosing on the device needs no host sync.
        # (with "bank" every record is then a miss, so its positive is its own detached embedding)
        loss = torch.where(filled.any(), loss, _other_records_loss(embeddings, positives, self.temperature))
        # Gathered now (every worker reaches this point together), written only once the step is taken.
        written = positives if self.keyed else embeddings.detach()  # the key encoder's, consistent with each other
        all_embeddings, all_ids = gather_from_all(written), gather_from_all(ids)
        if self.keyed:
            self.stage(self._momentum_update_keys)
        self.stage(lambda: self._write(all_embeddings, all_ids))
        return loss, self._logs(embeddings, hits, filled)

    def _embed(self, images: Tensor, keys: bool = False) -> Tensor:
        backbone, head = (self.key_backbone, self.key_head) if keys else (self.backbone, self.head)
        return F.normalize(head(backbone(images)).float(), dim=1)  # float32: autocast may give bf16

    @torch.no_grad()
    def _momentum_update_keys(self) -> None:
        momentum_update(self.key_backbone, self.backbone, self.key_momentum)
        momentum_update(self.key_head, self.head, self.key_momentum)

    @torch.no_grad()
    def _write(self, embeddings: Tensor, ids: Tensor) -> None:
        """One batch into the bank, after the step is taken (`write_bank` has the rules)."""
        write_bank(self.bank, self.bank_ids, self.bank_written, self.bank_clock, embeddings, ids, self.ways, self.momentum)

    @torch.no_grad()
    def _logs(self, embeddings: Tensor, hits: Tensor, filled: Tensor) -> dict[str, Tensor]:
        return {
            "embedding_std": embedding_std(embeddings),
            "bank_hit_ratio": hits.float().mean(),
            "bank_fill": filled.float().mean(),
        }


def _other_records_loss(embeddings: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """NPID's loss with each record's positive on the diagonal and the batch's other positives as negatives."""
    # Row i: [f_i·v_j]_j, the diagonal is the positive; float32 as in `info_nce` (bf16 autocast).
    logits = (embeddings @ positives.T).float() / temperature
    return F.cross_entropy(logits, torch.arange(len(embeddings), device=embeddings.device))
