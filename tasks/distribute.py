"""Multi-worker training: the cluster of `train.distribute: multi_worker`, its strategy and
who does what in it.

TensorFlow's `MultiWorkerMirroredStrategy` runs one copy of the training step per worker
process and all-reduces the gradients between them every step (collective ops over gRPC).
The cluster is TensorFlow's own `TF_CONFIG` variable when it is set (what Kubernetes
operators, Vertex AI and SageMaker set for you); otherwise it is built from
`train.workers` (host:port of every worker, the first is the chief) and the worker's index
(`esmm train --worker-index N`). Each worker trains on its own shard of the train split by
context (`tasks.inputs.SplitReader.shard_contexts`); the chief alone writes checkpoints, the
saved model and `history.json`. A killed worker is recovered TensorFlow's way: the job's
workers are restarted and every one resumes from the chief's last checkpoint, which is why
the training folder must be storage every worker sees (one machine's disk, NFS, a bucket
mounted with FUSE). See docs/scale.md.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tasks.config import ConfigError, TrainConfig

TF_CONFIG = "TF_CONFIG"


def configure_worker(train_cfg: TrainConfig, worker_index: int | None) -> None:
    """Set `TF_CONFIG` for worker `worker_index` of `train.workers`, unless already set.

    Args:
        train_cfg: the train section (`distribute`, `workers`).
        worker_index: this process's index in `train.workers` (`--worker-index`); None
            leaves the cluster to `TF_CONFIG`.

    Raises:
        ConfigError: a worker index without `train.distribute: multi_worker`, an index out of
            range of `train.workers`, or one that contradicts a `TF_CONFIG` already set.
    """
    if worker_index is None:
        return
    if train_cfg.distribute != "multi_worker":
        raise ConfigError(
            f"--worker-index {worker_index} needs train.distribute: multi_worker "
            f"(it is {train_cfg.distribute!r})"
        )
    if os.environ.get(TF_CONFIG):
        task = _parsed_tf_config()["task"]
        if task.get("index") != worker_index:
            raise ConfigError(
                f"--worker-index {worker_index} contradicts TF_CONFIG's task {task}: set one"
            )
        return
    workers = train_cfg.workers
    if not 0 <= worker_index < len(workers):
        raise ConfigError(
            f"--worker-index {worker_index} is not an index of train.workers ({len(workers)} "
            "listed: host:port of each worker, the chief first)"
        )
    os.environ[TF_CONFIG] = tf_config(workers, worker_index)


def tf_config(workers: list[str], index: int) -> str:
    """The `TF_CONFIG` of worker `index` in a cluster of `workers` (host:port each)."""
    return json.dumps(
        {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}
    )


def _parsed_tf_config() -> dict[str, Any]:
    """`TF_CONFIG`, checked for what a worker needs.

    Raises:
        ConfigError: unset, not JSON, or without a cluster and this process's task.
    """
    raw = os.environ.get(TF_CONFIG, "")
    if not raw:
        raise ConfigError(
            "train.distribute: multi_worker needs a cluster: set TF_CONFIG, or list the "
            "workers in train.workers and start each with `esmm train --worker-index N`"
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not JSON: {err}") from None
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise ConfigError(f"TF_CONFIG needs 'cluster' and 'task' entries, got {raw!r}")
    return config


def multi_worker_strategy() -> Any:
    """`tf.distribute.MultiWorkerMirroredStrategy` over the `TF_CONFIG` cluster.

    It must be created before TensorFlow runs any op in this process, and it waits until
    every worker of the cluster has started.

    Raises:
        ConfigError: `TF_CONFIG` is missing or malformed.
    """
    _parsed_tf_config()
    import tensorflow as tf

    # Ring all-reduce over gRPC: the CPU implementation (NCCL is for GPUs).
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_multi_worker(strategy: Any) -> bool:
    """Whether `strategy` spans several worker processes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:  # one process (MirroredStrategy has no cluster)
        return False
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("worker", [])) + len(spec.get("chief", [])) > 1


def worker_position(strategy: Any) -> tuple[int, int]:
    """(index of this worker, number of workers); (0, 1) for one process."""
    if not is_multi_worker(strategy):
        return 0, 1
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    index = resolver.task_id + (len(spec.get("chief", [])) if resolver.task_type == "worker" else 0)
    return int(index), workers


def is_chief(strategy: Any) -> bool:
    """Whether this process writes the run's files: the `chief` task if the cluster has
    one, else worker 0 (TensorFlow's convention); always true for one process."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    if "chief" in spec:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def shard_train(strategy: Any, reader: Any, batch_size: int) -> int | None:
    """Give this worker its context shard of the train split (multi-worker only).

    Returns:
        Multi-worker, the steps of an epoch: every worker takes as many as the smallest
        shard has batches, one batch of its own shard a step (the others' extra batches, a
        few at most, are left out of the pass). None otherwise.

    Raises:
        ValueError: a shard without a whole batch.
    """
    if not is_multi_worker(strategy):
        return None
    index, count = worker_position(strategy)
    batches = [
        sum(math.ceil(n / batch_size) for n in rows) for rows in reader.shard_group_rows(count)
    ]
    if min(batches) == 0:
        raise ValueError(
            f"{reader.split_dir}: a shard of {count} workers has no batch; lower "
            "train.batch_size or use fewer workers"
        )
    reader.shard_contexts(index, count)
    return min(batches)


def fix_step_logs(model: Any, strategy: Any) -> None:
    """Let Keras 3 `fit` and `evaluate` run under a multi-worker strategy, in place.

    Keras 3.15 reduces each step's logs across workers with `strategy.reduce("MEAN", v,
    axis=0)`, which fails on the scalar a metric returns ("Invalid reduction dimension 0 for
    input with 0 dimensions": tensorflow/tensorflow#72388, Keras 3 only). The metrics'
    variables are already summed across workers when updated, so every worker's value is
    the global one: the steps' scalars are given one axis, which the reduction averages
    away. Nothing changes for one process.
    """
    if not is_multi_worker(strategy):
        return
    import tensorflow as tf

    def with_axis(step):
        def wrapped(data):
            logs = step(data)
            return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}

        return wrapped

    model.train_step = with_axis(model.train_step)
    model.test_step = with_axis(model.test_step)


def barrier(strategy: Any) -> None:
    """Wait until every worker gets here (one all-reduce; nothing for one process).

    The non-chief workers wait at the end of training for the chief to have saved the
    model: a worker that exits first stops its heartbeats, and TensorFlow's coordination
    service then fails the chief ("heartbeat timeout")."""
    if not is_multi_worker(strategy):
        return
    import tensorflow as tf

    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
