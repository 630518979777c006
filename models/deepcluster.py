"""DeepCluster (Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual Features"), made
online for an unbounded stream.

The paper alternates two steps each epoch: k-means on the features of the whole dataset gives every
image a pseudo-label, then the network is trained to classify the images into those clusters, with a
classifier head re-initialised after every clustering (cluster indices are arbitrary from one run to
the next). A stream has no dataset to re-extract and no epochs, so here the clustering runs on a rolling
buffer of recent features every `recluster_every` steps, and each batch is labelled by its nearest
current centroid. Empty clusters are re-seeded and samples weighted by inverse cluster size as in the
paper (see models/kmeans.py). Not carried over: the paper's Sobel input filter and PCA-whitening of the
features before k-means (the buffer holds the L2-normalised backbone features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.distributed import gather_from_all
from streamssl.models.kmeans import inverse_size_weights, kmeans, nearest_centroid, normalized_mutual_info
from streamssl.models.method import Method, embedding_std


class DeepCluster(Method):
    """Online DeepCluster: k-means pseudo-labels on a rolling feature buffer, a classifier trained on them.

    Hyper-parameters (keyword-only, defaults in brackets):
        num_clusters: K of k-means and outputs of the classifier [100: the paper over-clusters, 10×
            Fashion-MNIST's 10 classes].
        buffer_size: how many recent view-1 features k-means clusters; at least 4·K [8192].
        recluster_every: steps between two clusterings [200; 200 steps of batch 256 is 51k samples, close
            to one pass over Fashion-MNIST, the paper's one clustering per epoch].
        kmeans_iterations: Lloyd iterations per clustering [20, as the paper's faiss runs].

    Schedule: the first clustering runs after the step that fills the buffer (the paper clusters the
    whole dataset; a full buffer is the closest a stream gets), later ones `recluster_every` steps after
    the previous one; both are checked in `on_step_end`. Each one runs k-means from scratch (a random
    sample of the buffer as initial centroids, as the paper does every epoch) and re-initialises the
    classifier in place (weights ~ N(0, 0.01), bias 0, as the paper's top layer). The method cannot reach
    the optimizer, so the classifier's optimizer state (momentum) carries over a re-initialisation;
    it decays within a few steps.

    Loss: each image's pseudo-label is the centroid nearest to the L2-normalised, detached backbone
    feature of its first view; the classifier on both views' backbone features is trained with
    cross-entropy against it, each sample weighted by `inverse_size_weights` of its cluster in the last
    clustering. Until the first clustering the loss is a zero still connected to the graph.

    State (buffers, so a checkpoint of `state_dict()` resumes exactly):
        feature_buffer [buffer_size, feature_dim], buffer_ids [buffer_size] (record ids, -1 for none):
            a ring written at `features_seen % buffer_size`.
        features_seen: features written to the ring so far.
        centroids [K, feature_dim], cluster_sizes [K], cluster_weights [K]: from the last clustering.
        steps_done, clusterings, last_clustering_step: the schedule.
        nmi, empty_reassigned: logs of the last clustering.

    Logs: `embedding_std` (of the view-1 backbone features), `clustered` (0 until the first clustering,
    then 1), `nmi` (between the buffer's assignments to the previous clustering's centroids and to the
    new ones; a stable clustering scores near 1; 0 until the second clustering), `cluster_size_max_share`
    and `cluster_size_min_share` (of the buffer, last clustering), `empty_reassigned` (empty clusters
    re-seeded in the last clustering), `pseudo_label_accuracy_of_head` (classifier argmax vs pseudo-label).
    """

    name = "deepcluster"
    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        num_clusters: int = 100,
        buffer_size: int = 8192,
        recluster_every: int = 200,
        kmeans_iterations: int = 20,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be at least 2, got {num_clusters}")
        if buffer_size < 4 * num_clusters:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least 4 * num_clusters ({4 * num_clusters})")
        if recluster_every < 1 or kmeans_iterations < 1:
            raise ValueError("recluster_every and kmeans_iterations must be at least 1")
        self.num_clusters = num_clusters
        self.recluster_every = recluster_every
        self.kmeans_iterations = kmeans_iterations
        self.classifier = nn.Linear(feature_dim, num_clusters)

        self.register_buffer("feature_buffer", torch.zeros(buffer_size, feature_dim))
        self.register_buffer("buffer_ids", torch.full((buffer_size,), -1, dtype=torch.long))
        self.register_buffer("features_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters, feature_dim))
        self.register_buffer("cluster_sizes", torch.zeros(num_clusters, dtype=torch.long))
        self.register_buffer("cluster_weights", torch.ones(num_clusters))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_clustering_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("nmi", torch.zeros(()))
        self.register_buffer("empty_reassigned", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views[:2]
        batch_size = len(x1)
        features = self.backbone(torch.cat([x1, x2])).float()  # one pass over both views
        view1 = F.normalize(features[:batch_size].detach(), dim=1)
        logits = self.classifier(features).float()
        if self.clusterings > 0:
            pseudo_labels = nearest_centroid(view1, self.centroids).repeat(2)  # both views share view 1's label
            per_sample = F.cross_entropy(logits, pseudo_labels, reduction="none")
            loss = (self.cluster_weights[pseudo_labels] * per_sample).mean()
            head_accuracy = (logits.detach().argmax(dim=1) == pseudo_labels).float().mean()
        else:
            loss = 0 * logits.sum()  # nothing to classify yet; a zero the trainer can still backward
            head_accuracy = torch.zeros((), device=logits.device)
        # With several workers every buffer takes the global batch: identical buffers give identical clusterings.
        self._remember(gather_from_all(view1), None if ids is None else gather_from_all(ids.to(view1.device)))
        return loss, self._logs(features[:batch_size], head_accuracy)

    def on_step_end(self, step: int) -> None:
        self.steps_done.add_(1)
        if self._clustering_due():
            self._recluster()

    def _clustering_due(self) -> bool:
        if self.clusterings == 0:
            return bool(self.features_seen >= len(self.feature_buffer))
        return bool(self.steps_done - self.last_clustering_step >= self.recluster_every)

    @torch.no_grad()
    def _remember(self, features: Tensor, ids: Tensor | None) -> None:
        """Writes `features` (and their record ids, -1 without) over the oldest entries of the ring."""
        if ids is None:
            ids = torch.full((len(features),), -1, dtype=torch.long, device=features.device)
        buffer_size = len(self.feature_buffer)
        # A batch larger than the ring would overwrite its own first rows: only its last rows survive.
        kept = slice(max(len(features) - buffer_size, 0), None)
        first_slot = self.features_seen + kept.start
        slots = (first_slot + torch.arange(len(features) - kept.start, device=features.device)) % buffer_size
        self.feature_buffer.index_copy_(0, slots, features[kept])
        self.buffer_ids.index_copy_(0, slots, ids[kept].to(self.buffer_ids.device))
        self.features_seen.add_(len(features))

    @torch.no_grad()
    def _recluster(self) -> None:
        """k-means on the buffer from scratch; new centroids, cluster weights and a fresh classifier."""
        features = self.feature_buffer
        result = kmeans(features, self.num_clusters, self.kmeans_iterations)
        if self.clusterings > 0:
            previous = nearest_centroid(features, self.centroids)
            self.nmi.copy_(normalized_mutual_info(previous, result.assignments))
        self.centroids.copy_(result.centroids)
        self.cluster_sizes.copy_(torch.bincount(result.assignments, minlength=self.num_clusters))
        self.cluster_weights.copy_(inverse_size_weights(result.assignments, self.num_clusters))
        self.empty_reassigned.fill_(result.reassigned)
        # Cluster indices mean nothing across clusterings, so the old classifier is useless (paper, §3.2).
        self.classifier.weight.normal_(0, 0.01)
        self.classifier.bias.zero_()
        self.last_clustering_step.copy_(self.steps_done)
        self.clusterings.add_(1)

    @torch.no_grad()
    def _logs(self, view1_features: Tensor, head_accuracy: Tensor) -> dict[str, Tensor]:
        shares = self.cluster_sizes.float() / self.cluster_sizes.sum().clamp(min=1)
        return {
            "embedding_std": embedding_std(view1_features),
            "clustered": (self.clusterings > 0).float(),
            "nmi": self.nmi.clone(),
            "cluster_size_max_share": shares.max(),
            "cluster_size_min_share": shares.min(),
            "empty_reassigned": self.empty_reassigned.float(),
            "pseudo_label_accuracy_of_head": head_accuracy,
        }
