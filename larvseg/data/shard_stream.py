"""Which shards each rank and DataLoader worker streams, and from where after a resume.

Streamed shards (URLs, ``pipe:`` commands, or ``stream: true``) cannot be read at random, so a streamed
source gives up the folder sources' global per-step sample list. Instead, with R ranks and W workers
per rank there are S = R * W *streams*; stream ``g = rank * W + (step mod W)`` feeds the steps
``t = step mod W`` of its rank:

- epoch e of stream g reads the shards ``order_e[g::S]``, where ``order_e`` is a permutation of all
  shards seeded by (seed, source, e): within an epoch every shard is read by exactly one stream, so
  ranks and workers read disjoint shards; every stream moves to its next epoch on its own;
- samples come in the order stored in the shard (``larvseg data shard`` writes them in a seeded random
  order, so a shard mixes classes);
- the k-th step of a stream takes its next ``c`` samples (c = this rank's share of the source's
  per-step count, exactly as for folder sources), augmented with the seed of their position in the
  global batch (seed, source, step, position), as for folder sources.

Position p of a stream is a function of (shard list, seed, R, W) only, so a run resumed at step T skips
exactly the samples the streams consumed before T (whole shards by their counts in index.json, then
the remaining samples of one shard read and dropped) and continues with the samples an uninterrupted
run would have used: resume is exact for a fixed shard list, world size and worker count. With another
world size or worker count the streams are re-cut: training continues at the right step with the same
per-step mixing, but not with the same images as the interrupted run (some samples of the current
epochs are seen again or skipped). Random-access shards (local files, the default) have none of these
limits: they behave exactly like folders for any world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from larvseg.data import shards as wds


class StreamPlan:
    """Shard assignment of the S = ranks x workers streams of one source."""

    def __init__(self, urls: list[str], counts: np.ndarray, seed: int, source_index: int, streams: int) -> None:
        self.urls, self.counts = urls, np.asarray(counts, dtype=np.int64)
        self.seed, self.source_index, self.streams = seed, source_index, streams
        if len(urls) < streams:
            raise wds.ShardError(
                urls[0] if urls else "shards",
                f"{len(urls)} shards cannot feed {streams} streams (ranks x data.num_workers): each "
                "stream needs its own shards; write smaller shards or use fewer workers",
            )
        if (self.counts <= 0).any():
            raise wds.ShardError(urls[int(np.argmin(self.counts))], "an empty shard cannot be streamed")

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.source_index, epoch, 0x5A4D]))
        return rng.permutation(len(self.urls))

    def shards_of(self, stream: int, epoch: int) -> np.ndarray:
        """Shard numbers stream ``stream`` reads in ``epoch``, in order."""
        return self.order(epoch)[stream :: self.streams]

    def locate(self, stream: int, position: int) -> tuple[int, int, int]:
        """(epoch, index in the epoch's shard list, sample within that shard) of a stream position."""
        epoch = 0
        while True:
            shards = self.shards_of(stream, epoch)
            ends = np.cumsum(self.counts[shards])
            if position < ends[-1]:
                i = int(np.searchsorted(ends, position, side="right"))
                return epoch, i, int(position - (ends[i - 1] if i else 0))
            position -= int(ends[-1])
            epoch += 1

    def samples(self, stream: int, position: int = 0) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(url, key, members) of stream ``stream`` from ``position`` on, forever."""
        epoch, first, within = self.locate(stream, position)
        while True:
            for shard in self.shards_of(stream, epoch)[first:]:
                url, n = self.urls[shard], 0
                with wds.open_url(url) as f:
                    for key, members in wds.iter_tar_samples(f, url):
                        n += 1
                        if n > within:
                            yield url, key, members
                expected = int(self.counts[shard])
                if n != expected:
                    raise wds.ShardError(
                        url,
                        f"holds {n} samples but its index says {expected}: the shards changed "
                        "after index.json was written",
                    )
                within = 0
            epoch, first = epoch + 1, 0
