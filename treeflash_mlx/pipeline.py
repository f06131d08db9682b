"""A target whose layers mlx-lm's ``pipeline()`` split over the ranks of ``mlx.launch`` (docs/distributed.md).

mlx-lm gives each rank of a pipeline of P ranks a run of consecutive layers: rank P - 1 the first ones, rank 0 the
last ones (the other layers are None on that rank). A pass flows from rank P - 1 down to rank 0: each rank takes
the hidden states from the rank above, runs its layers and hands them to the rank below. Rank 0 then holds the
last layer's output, and each rank the outputs of the captured layers it ran. One ``all_sum`` of rank 0's output
and each rank's captures (zeros in the others' places, so every sum is exact) gives every rank the logits' input
and every feature the drafter reads: each rank can then draft and take the same round.

Each pass must be evaluated before the next one is built, as the round loop does (the prefill's chunks and each
verification are): a rank's receives carry no order of their own, so those of two pending passes could be
matched the wrong way round.
"""

from __future__ import annotations

import mlx.core as mx


class Stage:
    """Which layers this process runs, and the hand-overs around them (nothing to do for a whole model)."""

    def __init__(self, family):
        inner = family.text  # the text model: embed_tokens, layers, norm
        self.size = getattr(inner, "pipeline_size", 1)
        self.rank = getattr(inner, "pipeline_rank", 0)
        self.first = inner.start_idx if self.size > 1 else 0  # the global index of this rank's first layer
        self.layers = family.layers  # this rank's
        self.num_layers = family.args.num_hidden_layers if self.size > 1 else len(self.layers)

    def receive(self, h: mx.array) -> mx.array:
        """The hidden states entering this rank's first layer (``h``: the embeddings, for the first rank)."""
        return mx.distributed.recv_like(h, self.rank + 1) if self.rank < self.size - 1 else h

    def gather(self, h: mx.array, features: dict, capture, cache: list) -> tuple[mx.array, dict]:
        """The last layer's output and every captured layer's, on every rank (``features``: this rank's).

        The hand-over to the rank below is tied into this rank's cache as well: the rank below needs it for its
        own cache, which is evaluated even when the output is not (a prefill whose logits nobody reads)."""
        if self.size == 1:
            return h, features
        if self.rank > 0:
            sent = mx.distributed.send(h, self.rank - 1)
            last = cache[-1]
            if isinstance(getattr(last, "keys", None), mx.array):
                last.keys = mx.depends(last.keys, sent)
            elif hasattr(last, "cache") and last[0] is not None:  # a recurrent layer's state (a hybrid target)
                last[0] = mx.depends(last[0], sent)
            h = mx.depends(mx.zeros_like(h), sent)  # rank 0 holds the output
        parts = [h] + [features.get(i, mx.zeros_like(h)) for i in capture]
        total = mx.distributed.all_sum(mx.concatenate(parts, axis=0))
        return total[:1], {i: total[1 + j : 2 + j] for j, i in enumerate(capture)}
