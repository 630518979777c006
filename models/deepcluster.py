"""DeepCluster (Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual Features"), with the
projection head, cosine classifier and per-image label memory of DeepCluster-v2 (Caron et al. 2020,
"Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", Sec. 4 and appendix), made
online for a stream.

The paper alternates k-means on the features of the whole data set, which gives every image a pseudo-label
(`_recluster`), with training to classify the images into those clusters (`forward`). A stream has neither
a data set nor epochs: models/cluster_memory.py holds what stands in for them. Empty clusters are re-seeded
and samples weighted by inverse cluster size as in the paper (models/kmeans.py). Not carried over: the
paper's Sobel input filter and PCA-whitening before k-means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.cluster_memory import memorize_labels, recall_labels, remember, ring_contents
from streamssl.models.distributed import gather_from_all
from streamssl.models.kmeans import inverse_size_weights, kmeans, nearest_centroid, normalized_mutual_info
from streamssl.models.losses import nt_xent
from streamssl.models.method import Method, embedding_std, mlp_head


class DeepCluster(Method):
    """Online DeepCluster(-v2): k-means pseudo-labels fixed per record id, a cosine classifier trained on them.

    Hyper-parameters (keyword-only, defaults in brackets):
        num_clusters: K of k-means and outputs of the classifier [100: the paper over-clusters, 10×
            Fashion-MNIST's 10 classes].
        dim: width of the L2-normalised projection that is clustered and classified [128, DeepCluster-v2's].
        buffer_size: how many recent view-1 projections (and their ids) k-means clusters; at least 4·K
            [65536: holds all of Fashion-MNIST's 60k images, so that after one pass every record the stream
            brings back has the fixed label of the last clustering, as every image has in the paper; 32 MB].
        temperature: T of the cosine classifier's softmax, and of the warm-up's NT-Xent [0.1, DeepCluster-v2's].
        first_clustering_share: share of the run's horizon trained before the first clustering [0.2].
        recluster_share: share of the horizon between two clusterings [0.2: a 274-step run clusters after
            steps 55, 110, 165 and 220, a 1200-step run after 240, 480, 720 and 960; none once the horizon
            is reached, where new labels would train nothing].
        first_clustering_step, recluster_every: the same two in steps, for an unbounded run (no horizon)
            [200, 200; 200 steps of batch 256 are 51k samples, close to one pass over Fashion-MNIST, the
            paper's one clustering per epoch].
        kmeans_iterations: Lloyd iterations per clustering [20, as the paper's faiss runs].

    Schedule (checked in `on_step_end`, on `steps_done`): the first clustering once `first_clustering_share`
    of the horizon is done, later ones each `recluster_share` of the horizon after the previous one (for an
    unbounded run: after `first_clustering_step`, then every `recluster_every` steps); never before the
    ring holds 4·K projections, nor once the horizon is reached. The horizon is read at every check, so
    a horizon the trainer re-estimates moves the schedule with it.

    Warm-up, until the first clustering (not in the paper): the paper's first clustering is of random
    features too, but it reclusters every epoch for hundreds of epochs; a run of a few hundred steps gets
    a few clusterings, and the labels of the first would stand for a fifth of it. Until then every image
    is its own cluster: the head learns to pick each image's other view among the batch (in-batch
    instance discrimination, `nt_xent`), so the first clustering sees trained features.
    `first_clustering_share=0` clusters as soon as the ring holds 4·K projections, as the paper does.

    Loss, after the first clustering: the pseudo-label of record i is the label its id got in the last
    clustering (the newest of its features in the ring then), or, for an id that was not in it (a new
    record, or no ids at all), the centroid nearest to its detached view-1 projection. The logits of both
    views are cos(z, w_c) / T over the classifier rows w_c; the loss is their cross-entropy against the
    record's label, each sample weighted by `inverse_size_weights` of its cluster in the last clustering.

    Logs: `embedding_std` (of the view-1 backbone features), `clustered` (0 during the warm-up, then 1),
    `fixed_label_share` (share of the batch labelled from the last clustering rather than by its nearest
    centroid), `nmi` (between the ring's assignments to the previous clustering's centroids and to the new
    ones; a stable clustering scores near 1; 0 until the second clustering), `cluster_size_max_share` and
    `cluster_size_min_share` (of the ring, last clustering), `empty_reassigned` (empty clusters re-seeded
    in the last clustering), `pseudo_label_accuracy_of_head` (classifier argmax vs pseudo-label).
    """

    # State: buffers (and parameters), so a checkpoint of `state_dict()` resumes exactly. Registered in __init__;
    # declared here so that they type as Tensor, not Tensor | Module.
    feature_buffer: Tensor  # [buffer_size, dim] the ring, written at features_seen % buffer_size by taken steps
    buffer_ids: Tensor  # [buffer_size] the record id of each ring row, -1 for none
    features_seen: Tensor  # projections written to the ring so far
    centroids: Tensor  # [K, dim], from the last clustering
    cluster_sizes: Tensor  # [K], of the ring in the last clustering
    cluster_weights: Tensor  # [K] inverse_size_weights of the last clustering
    clustered_ids: Tensor  # [buffer_size] the label memory: ids of the last clustering, sorted (-1: none)
    clustered_labels: Tensor  # [buffer_size] the label each of them got
    steps_done: Tensor  # the schedule: steps done, clusterings done, step of the last one
    clusterings: Tensor
    last_clustering_step: Tensor
    nmi: Tensor  # logs of the last clustering
    empty_reassigned: Tensor

    name = "deepcluster"
    num_views = 2

    def __init__(
        self, backbone: nn.Module, feature_dim: int, *, num_clusters: int = 100, dim: int = 128,
        buffer_size: int = 65536, temperature: float = 0.1,
        first_clustering_share: float = 0.2, recluster_share: float = 0.2,
        first_clustering_step: int = 200, recluster_every: int = 200, kmeans_iterations: int = 20,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be at least 2, got {num_clusters}")
        if buffer_size < 4 * num_clusters:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least 4 * num_clusters ({4 * num_clusters})")
        if not 0 <= first_clustering_share < 1 or not 0 < recluster_share <= 1:
            raise ValueError("first_clustering_share must be in [0, 1) and recluster_share in (0, 1], got "
                             f"{first_clustering_share} and {recluster_share}")
        if first_clustering_step < 0 or recluster_every < 1 or kmeans_iterations < 1:
            raise ValueError("first_clustering_step must be at least 0, recluster_every and kmeans_iterations at least 1")
        self.num_clusters, self.temperature, self.kmeans_iterations = num_clusters, temperature, kmeans_iterations
        self.first_clustering_share, self.recluster_share = first_clustering_share, recluster_share
        self.first_clustering_step, self.recluster_every = first_clustering_step, recluster_every
        # DeepCluster-v2's projection head; the published backbone features stay one layer away from the labels.
        self.head = mlp_head(feature_dim, feature_dim, dim)
        # Rows are normalised at every use (a cosine classifier); set to the centroids at every clustering.
        self.classifier = nn.Linear(dim, num_clusters, bias=False)

        self.register_buffer("feature_buffer", torch.zeros(buffer_size, dim))
        self.register_buffer("buffer_ids", torch.full((buffer_size,), -1, dtype=torch.long))
        self.register_buffer("features_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))
        self.register_buffer("cluster_sizes", torch.zeros(num_clusters, dtype=torch.long))
        self.register_buffer("cluster_weights", torch.ones(num_clusters))
        self.register_buffer("clustered_ids", torch.full((buffer_size,), -1, dtype=torch.long))
        self.register_buffer("clustered_labels", torch.zeros(buffer_size, dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_clustering_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("nmi", torch.zeros(()))
        self.register_buffer("empty_reassigned", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views[:2]
        batch_size = len(x1)
        features = self.backbone(torch.cat([x1, x2]))  # one pass over both views
        z = F.normalize(self.head(features).float(), dim=1)
        z1 = z[:batch_size]
        if self.clusterings > 0:
            labels, fixed = self.pseudo_labels(z1.detach(), ids)
            targets = labels.repeat(2)  # both views share the record's label
            with torch.autocast(z.device.type, enabled=False):  # float32: bf16 cosines / T would be too coarse
                logits = z.float() @ F.normalize(self.classifier.weight.float(), dim=1).T / self.temperature  # cos/T
            per_sample = F.cross_entropy(logits, targets, reduction="none")
            loss = (self.cluster_weights[targets] * per_sample).mean()
            head_accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
            fixed_share = fixed.float().mean()
        else:
            # Warm-up: every image its own cluster. The unused classifier joins the graph with a zero, so
            # that every parameter gets a gradient (DDP expects one for each).
            loss = nt_xent(z1, z[batch_size:], self.temperature) + 0 * self.classifier.weight.sum()
            head_accuracy = fixed_share = torch.zeros((), device=z.device)
        # With several workers every ring takes the global batch: identical rings give identical clusterings.
        ring_features = gather_from_all(z1.detach())
        ring_ids = None if ids is None else gather_from_all(ids.to(z.device))
        self.stage(lambda: remember(self.feature_buffer, self.buffer_ids, self.features_seen, ring_features, ring_ids))
        return loss, self._logs(features[:batch_size], head_accuracy, fixed_share)

    @torch.no_grad()
    def pseudo_labels(self, z1: Tensor, ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """[B] labels for detached view-1 projections `z1`, and [B] bool: whether the label came from the
        last clustering's memory (the record's id was in it) rather than from the nearest centroid."""
        return recall_labels(self.clustered_ids, self.clustered_labels, ids, nearest_centroid(z1, self.centroids))

    def on_step_end(self, step: int) -> None:
        self.steps_done.add_(1)
        if self._clustering_due():
            self._recluster()

    def _clustering_due(self) -> bool:
        if min(int(self.features_seen), len(self.feature_buffer)) < 4 * self.num_clusters:
            return False
        if self.progress(self.steps_done) == 1:  # labels made at the end of the horizon would train nothing
            return False
        if self.clusterings == 0:
            return self.reached(self.steps_done, self.first_clustering_share, self.first_clustering_step)
        since = self.steps_done - self.last_clustering_step
        return self.reached(since, self.recluster_share, self.recluster_every)

    @torch.no_grad()
    def _recluster(self) -> None:
        """k-means from scratch on the filled part of the ring (a random sample of it as initial centroids, as
        the paper does every epoch); new centroids, weights, label memory and classifier."""
        features, ids = ring_contents(self.feature_buffer, self.buffer_ids, self.features_seen)
        result = kmeans(features, self.num_clusters, self.kmeans_iterations)
        if self.clusterings > 0:
            previous = nearest_centroid(features, self.centroids)
            self.nmi.copy_(normalized_mutual_info(previous, result.assignments))
        self.centroids.copy_(result.centroids)
        self.cluster_sizes.copy_(torch.bincount(result.assignments, minlength=self.num_clusters))
        self.cluster_weights.copy_(inverse_size_weights(result.assignments, self.num_clusters))
        self.empty_reassigned.fill_(result.reassigned)
        memorize_labels(self.clustered_ids, self.clustered_labels, ids, result.assignments)
        # Cluster indices mean nothing across clusterings, so the old classifier is useless (paper, §3.2);
        # DeepCluster-v2 starts the new one at the centroids (cluster c's logit starts as the cosine to centroid
        # c), so its first steps already follow the labels; its optimizer state (momentum) belonged to the
        # previous clustering's clusters, so the trainer drops it.
        self.classifier.weight.copy_(F.normalize(result.centroids, dim=1))
        self.reset_optimizer_state(self.classifier.weight)
        self.last_clustering_step.copy_(self.steps_done)
        self.clusterings.add_(1)

    @torch.no_grad()
    def _logs(self, view1_features: Tensor, head_accuracy: Tensor, fixed_share: Tensor) -> dict[str, Tensor]:
        shares = self.cluster_sizes.float() / self.cluster_sizes.sum().clamp(min=1)
        return {
            "embedding_std": embedding_std(view1_features),
            "clustered": (self.clusterings > 0).float(),
            "fixed_label_share": fixed_share,
            "nmi": self.nmi.clone(),
            "cluster_size_max_share": shares.max(),
            "cluster_size_min_share": shares.min(),
            "empty_reassigned": self.empty_reassigned.float(),
            "pseudo_label_accuracy_of_head": head_accuracy,
        }
