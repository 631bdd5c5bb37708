"""A stream's rows made by a pool of Ray Data actors, in the order ``rows.StreamPlan`` fixes.

The Train worker builds its own streams from the shard set once it knows where it starts
(its checkpoint's data position), so a resumed or restarted worker continues at the exact
row it stopped at. The work list is ranges of row positions (``SEGMENT_ROWS`` each); an
actor turns a range into augmented rows with ``rows.AugmentedRows`` (the code the
in-process stream runs), and ``preserve_order`` makes Ray Data hand the ranges back in
order whichever actor finished first. Nothing in a row depends on which actor made it.

A stream runs as a series of Ray Data executions of ``WINDOW_ROWS`` positions each, so the
work list stays small for a 180k-step run; each execution starts its actors again (a few
seconds on a 2-core machine), once every few thousand rows. A stream's first
``head_rows`` rows (``train.stream_head_rows``) can be made in this process, by the same
``AugmentedRows``, while the first execution starts its actors: a run's first step does
not wait for Ray (4-8 s a stream on 2 cores), and the rows are the ones an actor would
have made.

Resources, sized for the 2-core machine: a Tune trial (0.01 CPU) and its Train worker
(1 CPU) leave 0.99 logical CPU, and Ray places an actor only when its whole request fits.
The actors ask ``DATA_ACTOR_CPUS = 0.25`` each: the labeled and the unlabeled pool's first
actors take 0.5 together and each pool can grow to ``train.data_actors`` while room remains
(the CPU presets keep one: a second is a process more for rows one actor makes 20x faster
than the step takes them). These are logical shares: augmenting is cheap next to a
training step (hundreds of images/s against ~10 for the slim detector).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from softteacher.config import AugmentConfig
from softteacher.data.rows import AugmentedRows, StreamPlan
from softteacher.data.shards import ShardSet

DATA_ACTOR_CPUS = 0.25
WINDOW_ROWS = 8192
SEGMENT_ROWS = 16
# Blocks of ``SEGMENT_ROWS`` rows a stream holds ready ahead of the trainer.
PREFETCH_BLOCKS = 4
_END = object()


class AugmentActor:
    """The Data actor's UDF: ``{start, stop}`` position ranges to augmented rows."""

    def __init__(self, shards: ShardSet, plan: StreamPlan, cfg: AugmentConfig) -> None:
        self._rows = AugmentedRows(shards, plan, cfg)

    def __call__(self, ranges: pa.Table) -> pa.Table:
        starts, stops = ranges.column("start").to_pylist(), ranges.column("stop").to_pylist()
        return pa.concat_tables(
            [self._rows.rows(a, b) for a, b in zip(starts, stops, strict=True)]
        )


class RayRowStream:
    """A ``RowStream`` of positions ``[start, stop)`` that Ray Data actors make, all but its
    first ``head_rows``, which this process makes while the actors start (0: every row from
    the actors, as benchmarks and tests of the actors want).

    ``stop`` bounds the work (the rows the run still needs), so no actor augments rows that
    nobody will take. A background thread starts the stream at construction and keeps
    ``PREFETCH_BLOCKS`` blocks ready: the actors start while the model is built, and the
    unlabeled stream is warm when burn-in ends instead of starting then.
    """

    def __init__(
        self,
        shards: ShardSet,
        plan: StreamPlan,
        cfg: AugmentConfig,
        *,
        start: int = 0,
        stop: int,
        concurrency: tuple[int, int] = (1, 2),
        num_cpus: float = DATA_ACTOR_CPUS,
        window_rows: int = WINDOW_ROWS,
        segment_rows: int = SEGMENT_ROWS,
        head_rows: int = 0,
    ) -> None:
        low, high = concurrency
        if not 1 <= low <= high:
            raise ValueError(f"concurrency must be (min, max), 1 <= min <= max; got {concurrency}")
        if head_rows < 0:
            raise ValueError(f"head_rows must be 0 or more; got {head_rows}")
        self.position = start
        self._stop = stop
        self._args = (shards, plan, cfg)
        self._concurrency = concurrency
        self._num_cpus = num_cpus
        self._window = window_rows
        self._segment = segment_rows
        self._pending: pa.Table | None = None
        self._closed = False
        head_stop = min(start + head_rows, stop)
        self._from_actors = _Prefetched(self._windows(head_stop))
        self._blocks = _Prefetched(self._head_then_actors(start, head_stop))

    def take(self, n: int) -> pa.Table:
        if self._closed:
            raise RuntimeError(f"the {self._args[1].stream} stream was closed")
        parts, have = [], 0
        while have < n:
            if self._pending is None:
                self._pending = next(self._blocks, None)
                if self._pending is None:
                    raise RuntimeError(
                        f"the {self._args[1].stream} stream ended at row {self.position + have}"
                        f" (stop={self._stop}): the run asked for more rows than it planned"
                    )
            part = self._pending.slice(0, n - have)
            rest = self._pending.num_rows - part.num_rows
            self._pending = self._pending.slice(part.num_rows) if rest else None
            parts.append(part)
            have += part.num_rows
        self.position += n
        return pa.concat_tables(parts)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the stream: its threads end and its Ray Data execution shuts down with its
        actors, when the block each thread waits for arrives. A run that ends early (a
        failed step) so frees the actors' CPUs for its retry in the same process.
        ``timeout``: seconds to wait for that (None: return at once); whether it ended."""
        self._closed = True
        self._blocks.close()
        self._from_actors.close()
        if timeout is None:
            return False
        deadline = time.monotonic() + timeout
        return all(
            part.join(max(0.0, deadline - time.monotonic()))
            for part in (self._blocks, self._from_actors)
        )

    def _head_then_actors(self, start: int, head_stop: int) -> Iterator[pa.Table]:
        """The head's blocks, made here while the actors' first execution starts, then
        the actors'."""
        if start < head_stop:
            rows = AugmentedRows(*self._args)
            for segment_start in range(start, head_stop, self._segment):
                yield rows.rows(segment_start, min(segment_start + self._segment, head_stop))
        yield from self._from_actors

    def _windows(self, start: int) -> Iterator[pa.Table]:
        for window_start in range(start, self._stop, self._window):
            if self._closed:  # no new execution, and its actors, for a closed stream
                return
            window_stop = min(window_start + self._window, self._stop)
            dataset = self._dataset(window_start, window_stop)
            yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")

    def _dataset(self, start: int, stop: int) -> ray.data.Dataset:
        context = DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        ranges = [
            {"start": a, "stop": min(a + self._segment, stop)}
            for a in range(start, stop, self._segment)
        ]
        low, high = self._concurrency
        return ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
            AugmentActor,
            fn_constructor_args=self._args,
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=self._num_cpus,
        )


class _Prefetched:
    """``blocks`` iterated from now on by a thread of its own, ``PREFETCH_BLOCKS`` ahead of
    the taker; an error there is raised where the blocks are taken (and again at each later
    take: the stream is over).

    ``close`` ends the iteration: the thread takes no block after the one it is waiting for
    and closes ``blocks`` itself (a generator is closed by the thread that runs it), which
    for Ray Data ends the execution and its actors; a taker waiting for a block gets the end
    instead.
    """

    def __init__(self, blocks: Iterator[pa.Table]) -> None:
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BLOCKS)
        self._closed = threading.Event()
        self._over: BaseException | None = None  # StopIteration or the producer's error
        self._thread = threading.Thread(target=self._produce, args=(blocks,), daemon=True)
        self._thread.start()

    def __iter__(self) -> _Prefetched:
        return self

    def __next__(self) -> pa.Table:
        if self._over is not None:
            raise self._over
        block = self._ready.get()
        if block is _END:
            self._over = StopIteration()
            raise self._over
        if isinstance(block, BaseException):
            self._over = block
            raise block
        return block

    def close(self) -> None:
        self._closed.set()
        self._drain()
        self._end_for_a_waiting_taker()

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _produce(self, blocks: Iterator[pa.Table]) -> None:
        try:
            while not self._closed.is_set():
                block = next(blocks, _END)
                self._ready.put(block)  # after a close the drained queue has room
                if block is _END:
                    return
        except BaseException as error:  # handed to the taker's thread
            if not self._closed.is_set():
                self._ready.put(error)
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()
            if self._closed.is_set():
                self._drain()  # the block put while closing: never taken
                self._end_for_a_waiting_taker()

    def _drain(self) -> None:
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return

    def _end_for_a_waiting_taker(self) -> None:
        try:
            self._ready.put_nowait(_END)
        except queue.Full:  # a block is there for the taker; the end follows from its producer
            pass
