"""Distillation training with Flax NNX + optax, on one device and data-parallel over many.

The step distills a student :class:`~jaxdistill.transformer.TransformerLM` (or any NNX module
with ``hidden_states(tokens)`` and ``lm_head``) from a frozen teacher of the same kind:

1. the student's final hidden states come from its own forward pass, so the gradient of the
   fused loss w.r.t. ``student_hidden`` flows back through the whole student;
2. the teacher's hidden states and head are ``stop_gradient``-ed (its forward still runs);
3. :func:`jaxdistill.heads.fused_head_loss` computes the loss and the head gradients without
   materializing the (tokens, V) logits;
4. ``nnx.value_and_grad`` gives the gradients of every student parameter, and an
   ``nnx.Optimizer`` (optax) applies them.

Single device (documented example)::

    import optax
    from flax import nnx
    from jaxdistill.training import DistillConfig, train_step
    from jaxdistill.transformer import TransformerLM

    student = TransformerLM(vocab_size=V, d_model=256, n_layers=4, n_heads=4, d_ff=1024,
                            max_len=L, tie_embeddings=True, rngs=nnx.Rngs(0))
    teacher = ...  # a trained TransformerLM (any d_model), same vocabulary
    optimizer = nnx.Optimizer(student, optax.adamw(3e-4), wrt=nnx.Param)
    config = DistillConfig(beta=0.5, temperature=1.0, hard_weight=0.5)
    step = nnx.jit(train_step, static_argnames="config")
    for batch in batches:  # {"inputs": (B, L) int32, "labels": (B, L) int32, -100 = ignored}
        metrics = step(student, teacher, optimizer, batch, config=config)

Data parallel (batch split over devices, parameters replicated, one gradient all-reduce; the
fused loss runs on each device's own tokens and divides by the *global* valid-token count via
its ``axis_name``, so every variant computes exactly the single-device step on the whole batch):

- :func:`make_pmap_step`: ``jax.pmap`` over a leading device axis;
- :func:`make_shard_map_step`: ``jax.jit`` of ``jax.shard_map`` over a 1-D ``Mesh``;
- :func:`make_sharded_jit_step`: ``jax.jit`` with ``NamedSharding`` (batch sharded, weights
  replicated): the model is partitioned by XLA, and the loss runs per device inside a
  ``shard_map`` (:func:`shard_mapped_head_loss`), so no logits or hidden states are gathered.
  The same step runs unchanged across processes/hosts after ``jax.distributed.initialize()``.

Data and vocabulary parallel, on a 2-D (data, model) mesh (:func:`vocab_mesh`):
:func:`make_vocab_parallel_step` shards the student's and teacher's LM heads (a tied head's
embedding table included) and their optimizer state over V on the model axis, the batch on the
data axis, and replicates the rest; the loss runs per device inside a ``shard_map``
(:func:`vocab_parallel_head_loss`) with ``vocab_axis_name``, so each device holds V/M columns
of each head and of its gradient and only per-row scalars cross the model axis.

All four work on the functional form of the modules: ``graphdef, state = nnx.split((student,
teacher, optimizer))``; each returns ``step(state, batch) -> (state, metrics)``, and
``nnx.update((student, teacher, optimizer), state)`` writes the result back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistill import reference
from jaxdistill.fused import fused_linear_jsd_loss, resolve_implementation
from jaxdistill.heads import LMHead, fused_head_loss

__all__ = [
    "DistillConfig",
    "data_mesh",
    "distillation_loss",
    "functional_loss_and_grads",
    "functional_train_step",
    "loss_and_grads",
    "make_pmap_step",
    "make_shard_map_step",
    "make_sharded_jit_step",
    "make_vocab_parallel_step",
    "replicate",
    "shard_mapped_head_loss",
    "train_step",
    "vocab_mesh",
    "vocab_parallel_head_loss",
    "vocab_parallel_shardings",
]

# A head loss: (student_hidden, student_head, teacher_hidden, teacher_head, labels) -> (loss, metrics).
HeadLoss = Callable[[jax.Array, LMHead, jax.Array, LMHead, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Options of the distillation loss (hashable: pass it as a static argument).

    Attributes:
      beta, temperature, soft_weight, hard_weight, ignore_index, chunk_size, implementation:
        as in :func:`jaxdistill.fused_linear_jsd_loss`.
      reference: use the unfused :func:`jaxdistill.reference.fused_linear_jsd_loss` instead
        (materialized logits; for tests and comparisons). ``chunk_size`` and
        ``implementation`` must then be None.
    """

    beta: float = 0.5
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    chunk_size: int | None = None
    implementation: str | None = None
    reference: bool = False

    def __post_init__(self):
        if self.reference and (self.chunk_size is not None or self.implementation is not None):
            raise ValueError("`chunk_size` and `implementation` do not apply to the reference loss")

    def head_loss(
        self,
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        labels,
        *,
        axis_name=None,
        vocab_axis_name=None,
    ):
        """The loss on two heads; returns ``(loss, metrics)``.

        ``metrics`` has ``soft_loss``, ``hard_loss`` (unweighted, reduced like the loss, no
        gradient) and ``num_valid_tokens``. With ``axis_name`` the loss, soft and hard values
        are this device's shares (their psum over the axis is the global value) and
        ``num_valid_tokens`` is global. With ``vocab_axis_name`` the heads are this device's
        vocabulary shards (see :func:`jaxdistill.fused_linear_jsd_loss`); not for the reference.
        """
        if vocab_axis_name is not None and self.reference:
            raise ValueError("`vocab_axis_name` does not apply to the reference loss (it takes whole heads)")
        kwargs = dict(
            beta=self.beta,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            ignore_index=self.ignore_index,
            axis_name=axis_name,
            return_aux=True,
        )
        if self.reference:
            loss_fn = reference.fused_linear_jsd_loss
        else:
            loss_fn = fused_linear_jsd_loss
            kwargs.update(chunk_size=self.chunk_size, implementation=self.implementation)
            if vocab_axis_name is not None:
                kwargs.update(vocab_axis_name=vocab_axis_name)
        return fused_head_loss(
            student_hidden, student_head, teacher_hidden, teacher_head, labels, loss_fn=loss_fn, **kwargs
        )


def _psum_shares(metrics: dict, axis_name) -> dict:
    """``metrics`` with the per-device shares Σ_local ℓ / N_global of the loss and of its soft
    and hard parts summed over ``axis_name`` (giving the global means); other entries as given."""
    shares = lax.psum({k: metrics[k] for k in ("loss", "soft_loss", "hard_loss")}, axis_name)
    return dict(metrics, **shares)


def distillation_loss(student, teacher, batch, *, config: DistillConfig, axis_name=None, head_loss=None):
    """The distillation loss of ``student`` against the frozen ``teacher`` on one batch.

    Args:
      student: NNX module with ``hidden_states(tokens) -> (B, L, Hs)`` and ``lm_head`` (an
        :class:`~jaxdistill.heads.LMHead`), e.g. a :class:`~jaxdistill.transformer.TransformerLM`.
      teacher: same interface (hidden size Ht, same vocabulary); gets no gradient.
      batch: dict with ``"inputs"`` (B, L) int tokens and ``"labels"`` (B, L) int next-token
        ids (``config.ignore_index`` = not a target).
      config: DistillConfig.
      axis_name: inside ``pmap``/``shard_map``: the data axis (loss = this device's share).
      head_loss: replaces ``config.head_loss`` (e.g. :func:`shard_mapped_head_loss`).

    Returns:
      (loss, metrics): float32 scalar and the dict of :meth:`DistillConfig.head_loss`.
    """
    if head_loss is None:
        head_loss = functools.partial(config.head_loss, axis_name=axis_name)
    student_hidden = student.hidden_states(batch["inputs"])
    teacher_hidden = lax.stop_gradient(teacher.hidden_states(batch["inputs"]))
    teacher_head = jax.tree.map(lax.stop_gradient, teacher.lm_head)
    return head_loss(student_hidden, student.lm_head, teacher_hidden, teacher_head, batch["labels"])


def loss_and_grads(student, teacher, batch, *, config: DistillConfig, axis_name=None, head_loss=None):
    """Metrics and gradients of every student ``nnx.Param`` (the teacher's are not computed).

    With ``axis_name`` (inside ``pmap``/``shard_map(check_vma=False)``) the loss, metrics and
    gradients are ``psum``-ed over the axis, so every device holds the global values.

    Returns:
      (metrics, grads): metrics = {"loss", "soft_loss", "hard_loss", "num_valid_tokens"};
      grads: an ``nnx.State`` shaped like ``nnx.state(student, nnx.Param)``.
    """

    def loss_fn(student):
        return distillation_loss(student, teacher, batch, config=config, axis_name=axis_name, head_loss=head_loss)

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(student)
    metrics = dict(metrics, loss=loss)
    if axis_name is not None:
        metrics, grads = _psum_shares(metrics, axis_name), lax.psum(grads, axis_name)
    return metrics, grads


def train_step(
    student, teacher, optimizer: nnx.Optimizer, batch, *, config: DistillConfig, axis_name=None, head_loss=None
):
    """One optimizer step of ``student`` (updated in place with ``optimizer``); returns the metrics.

    Wrap it with ``nnx.jit(train_step, static_argnames="config")``. Arguments as
    :func:`loss_and_grads`; ``optimizer`` is an ``nnx.Optimizer(student, tx, wrt=nnx.Param)``.
    """
    metrics, grads = loss_and_grads(student, teacher, batch, config=config, axis_name=axis_name, head_loss=head_loss)
    optimizer.update(student, grads)
    return metrics


def functional_train_step(graphdef, state, batch, *, config: DistillConfig, axis_name=None, head_loss=None):
    """:func:`train_step` on the split form ``graphdef, state = nnx.split((student, teacher, optimizer))``.

    Returns:
      (new_state, metrics); a pure function, for ``jit``/``pmap``/``shard_map``.
    """
    student, teacher, optimizer = nnx.merge(graphdef, state)
    metrics = train_step(student, teacher, optimizer, batch, config=config, axis_name=axis_name, head_loss=head_loss)
    return nnx.state((student, teacher, optimizer)), metrics


def functional_loss_and_grads(graphdef, state, batch, *, config: DistillConfig, axis_name=None, head_loss=None):
    """:func:`loss_and_grads` on the split form (the optimizer in ``state``, if any, is unused).

    Returns:
      (metrics, grads), as :func:`loss_and_grads`; e.g. for gradient accumulation.
    """
    student, teacher, *_ = nnx.merge(graphdef, state)
    return loss_and_grads(student, teacher, batch, config=config, axis_name=axis_name, head_loss=head_loss)


def data_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), with an automatic (GSPMD) axis."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (axis_name,))


def replicate(tree, devices=None):
    """One copy of every leaf on each device, stacked on a new leading axis: the input layout of ``pmap``.

    Each device receives its copy straight from the host (no ``num_devices``-fold stack on one
    device). ``devices`` defaults to ``jax.local_devices()``, the devices ``pmap`` maps over.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))

    def copies(x):
        host = np.asarray(x)[None]
        return jax.make_array_from_callback((len(devices), *host.shape[1:]), sharding, lambda _: host)

    return jax.tree.map(copies, tree)


def make_pmap_step(graphdef, *, config: DistillConfig, axis_name: str = "data", step_fn=functional_train_step):
    """Data-parallel step with ``jax.pmap``.

    Args:
      graphdef: from ``graphdef, state = nnx.split((student, teacher, optimizer))``.
      config: DistillConfig. axis_name: the pmap axis name.
      step_fn: :func:`functional_train_step`, or :func:`functional_loss_and_grads` (then the
        step returns ``(metrics, grads)`` instead of ``(state, metrics)``).

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` replicated with a leading device
      axis (:func:`replicate`), every batch leaf (D, B/D, L); metrics are global (identical on
      every device, leading axis D).
    """
    step = functools.partial(step_fn, graphdef, config=config, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name)


def make_shard_map_step(
    graphdef, mesh: Mesh, *, config: DistillConfig, axis_name: str = "data", step_fn=functional_train_step
):
    """Data-parallel step: ``jax.jit(jax.shard_map(...))`` over ``mesh`` (the batch split on ``axis_name``).

    ``check_vma=False``: gradients are summed over the axis explicitly (as in ``pmap``).
    Arguments as :func:`make_pmap_step`.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` replicated, batch leaves (B, L)
      with B divisible by the axis size; metrics replicated and global.
    """
    step = functools.partial(step_fn, graphdef, config=config, axis_name=axis_name)
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped)


def shard_mapped_head_loss(mesh: Mesh, *, config: DistillConfig, axis_name: str = "data") -> HeadLoss:
    """``config.head_loss`` run per device with ``shard_map`` inside a (GSPMD-partitioned) ``jit``.

    Hidden states and labels are split on their leading (batch) axis over ``axis_name``, the
    heads replicated; each device computes the fused loss on its own rows with the global
    valid-token count. Returns the global loss and metrics (replicated); differentiating
    through it gives the global gradients (summed over devices for the replicated heads).
    """

    def per_device(student_hidden, student_head, teacher_hidden, teacher_head, labels):
        loss, metrics = config.head_loss(
            student_hidden, student_head, teacher_hidden, teacher_head, labels, axis_name=axis_name
        )
        metrics = _psum_shares(dict(metrics, loss=loss), axis_name)
        return metrics.pop("loss"), metrics

    batch_spec = P(axis_name)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(batch_spec, P(), batch_spec, P(), batch_spec),
        out_specs=(P(), P()),
        check_vma=False,
    )


def make_sharded_jit_step(
    graphdef,
    mesh: Mesh,
    *,
    config: DistillConfig,
    axis_name: str = "data",
    step_fn=functional_train_step,
    donate: bool = False,
):
    """Data-parallel step: ``jax.jit`` with ``NamedSharding`` (batch sharded on ``axis_name``, state replicated).

    XLA partitions the transformer; the loss runs per device through
    :func:`shard_mapped_head_loss`. Works across processes (multi-host) unchanged: build
    the global batch with ``jax.make_array_from_process_local_data``.

    Args:
      graphdef: from ``nnx.split((student, teacher, optimizer))``. mesh: e.g. :func:`data_mesh`.
      config: DistillConfig. axis_name: the mesh axis the batch is split over.
      step_fn: as in :func:`make_pmap_step`.
      donate: donate the input state's buffers to the output state.

    Returns:
      ``step(state, batch) -> (state, metrics)``; the returned state and metrics are replicated.
      With ``donate``, the input ``state`` must not be used again.
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(axis_name))
    head_loss = shard_mapped_head_loss(mesh, config=config, axis_name=axis_name)
    step = functools.partial(step_fn, graphdef, config=config, head_loss=head_loss)
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else (),
    )


def vocab_mesh(data: int, model: int, devices=None, *, data_axis: str = "data", model_axis: str = "model") -> Mesh:
    """A 2-D (``data``, ``model``) mesh over ``devices`` (default: all devices of all processes).

    The devices are laid out row-major, so each model-axis group is ``model`` consecutive
    devices: keep it within one host (``model`` ≤ the devices per process) and the per-chunk
    all-reduces stay on the host's interconnect.

    Raises:
      ValueError: ``data × model`` is not the number of devices.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    if data * model != devices.size:
        raise ValueError(f"a {data} × {model} mesh needs {data * model} devices, got {devices.size}")
    return Mesh(devices.reshape(data, model), (data_axis, model_axis))


def _check_vocab_divisible(vocab: int, shards: int, model_axis: str, what: str) -> None:
    if vocab % shards:
        raise ValueError(
            f"{what}: the vocabulary ({vocab}) is not a multiple of the {shards} devices of "
            f"`vocab_axis_name` {model_axis!r}: pad both heads to a multiple of {shards} columns "
            "(zero weight columns with a -inf bias take no probability and get no gradient)"
        )


def _head_spec(head: LMHead, model_axis: str) -> LMHead:
    """The ``shard_map`` spec of an LM head sharded over V: the weight's V dimension and the bias."""
    weight = P(model_axis, None) if head.vocab_major else P(None, model_axis)
    return LMHead(weight, None if head.bias is None else P(model_axis), vocab_major=head.vocab_major)


def vocab_parallel_head_loss(
    mesh: Mesh, *, config: DistillConfig, data_axis: str = "data", model_axis: str = "model"
) -> HeadLoss:
    """``config.head_loss`` on a (data, model) mesh: tokens split over ``data_axis``, heads over V on ``model_axis``.

    Takes global arrays (as :func:`shard_mapped_head_loss` does) and runs the fused loss per
    device inside ``jax.shard_map`` with ``axis_name=data_axis`` and
    ``vocab_axis_name=model_axis``: each device sees its rows and its V/M-column shard of
    both heads (weights and biases). Returns the global loss and metrics (replicated);
    differentiating through it gives the global gradients, the heads' sharded over V like the
    heads. The map runs with ``check_vma=True``, except for the Pallas kernel in interpret
    mode (off a GPU), which JAX cannot interpret under ``check_vma=True``; both give the same
    values and gradients.

    Raises:
      ValueError: (at trace time) a head's vocabulary is not a multiple of the model axis size.
    """
    shards = mesh.shape[model_axis]
    interpret_pallas = resolve_implementation(config.implementation) == "pallas" and jax.default_backend() != "gpu"

    def per_device(student_hidden, student_head, teacher_hidden, teacher_head, labels):
        loss, metrics = config.head_loss(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            labels,
            axis_name=data_axis,
            vocab_axis_name=model_axis,
        )
        metrics = _psum_shares(dict(metrics, loss=loss), data_axis)
        return metrics.pop("loss"), metrics

    def head_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels):
        for head, name in ((student_head, "student head"), (teacher_head, "teacher head")):
            _check_vocab_divisible(head.vocab_size, shards, model_axis, name)
        rows = P(data_axis)
        mapped = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(rows, _head_spec(student_head, model_axis), rows, _head_spec(teacher_head, model_axis), rows),
            out_specs=(P(), P()),
            check_vma=not interpret_pallas,
        )
        return mapped(student_hidden, student_head, teacher_hidden, teacher_head, labels)

    return head_loss


def _path_names(path) -> tuple:
    """A pytree key path as plain names: ``[0]['head']['kernel'].value`` → ``(0, 'head', 'kernel')``."""
    names = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def _head_vocab_dims(model) -> dict[tuple, int]:
    """{path in ``nnx.state(model)`` of an LM-head parameter: the index of its V dimension}.

    For a :class:`~jaxdistill.transformer.TransformerLM`-like model: untied, ``head`` (an
    ``nnx.Linear``: kernel (H, V), bias (V,)); tied, the token embedding ``embed`` (V, H) and
    an optional ``head_bias`` (V,).
    """
    if isinstance(getattr(model, "head", None), nnx.Linear):
        dims = {("head", "kernel"): 1}
        if model.head.bias is not None:
            dims[("head", "bias")] = 0
    elif isinstance(getattr(model, "embed", None), nnx.Embed):
        dims = {("embed", "embedding"): 0}
        if hasattr(model, "head_bias"):
            dims[("head_bias",)] = 0
    else:
        raise TypeError(
            f"cannot find the LM head of {type(model).__name__}: expected an nnx.Linear `head` or a tied "
            "nnx.Embed `embed` (as in jaxdistill.transformer.TransformerLM)"
        )
    return dims


def vocab_parallel_shardings(graphdef, state, mesh: Mesh, *, model_axis: str = "model"):
    """Shardings of ``state = nnx.split((student, teacher, optimizer))[1]`` for :func:`make_vocab_parallel_step`.

    The LM-head parameters of the student and teacher (see :func:`_head_vocab_dims`: a tied
    head's embedding table included) and the optimizer's state of the student's (optax
    moments mirror the parameters' paths) are split over V on ``model_axis``; every other
    leaf is replicated.

    Returns:
      A pytree of ``NamedSharding`` shaped like ``state``.

    Raises:
      ValueError: a head's vocabulary is not a multiple of the model axis size.
    """
    student, teacher, _ = nnx.merge(graphdef, state)
    heads = {0: _head_vocab_dims(student), 1: _head_vocab_dims(teacher)}
    shards = mesh.shape[model_axis]

    def spec(path, leaf):
        names = _path_names(path)
        owner, rest = names[0], names[1:]
        if owner in heads:
            dim = heads[owner].get(rest)
        else:  # the optimizer: the student's parameters' moments, under its own prefix
            dim = next((d for k, d in heads[0].items() if rest[-len(k) :] == k), None)
        if dim is None or jnp.ndim(leaf) <= dim:
            return NamedSharding(mesh, P())
        _check_vocab_divisible(jnp.shape(leaf)[dim], shards, model_axis, "/".join(map(str, names)))
        return NamedSharding(mesh, P(*(model_axis if i == dim else None for i in range(jnp.ndim(leaf)))))

    return jax.tree_util.tree_map_with_path(spec, state)


def make_vocab_parallel_step(
    graphdef,
    state,
    mesh: Mesh,
    *,
    config: DistillConfig,
    data_axis: str = "data",
    model_axis: str = "model",
    step_fn=functional_train_step,
    donate: bool = False,
):
    """Data- and vocabulary-parallel step: ``jax.jit`` with ``NamedSharding`` on a 2-D (data, model) mesh.

    The batch is split over ``data_axis``; the student's and teacher's LM heads and the
    student head's optimizer state are split over V on ``model_axis``
    (:func:`vocab_parallel_shardings`); the rest of the state is replicated and XLA partitions
    the transformers. The loss runs per device through :func:`vocab_parallel_head_loss`:
    per chunk it all-reduces only per-row scalars over the model axis, and grad_x once; the
    heads, their gradients and the chunk logits per device are ∝ V/M. Every device computes
    exactly the single-device step on the whole batch. Works across processes (multi-host)
    like :func:`make_sharded_jit_step`: place the state with its shardings (e.g.
    ``jax.make_array_from_callback``) and the batch with ``jax.make_array_from_process_local_data``.

    Args:
      graphdef, state: from ``nnx.split((student, teacher, optimizer))`` (state concrete or
        ``jax.eval_shape``-abstract; only its structure and shapes are read).
      mesh: a mesh with ``data_axis`` and ``model_axis``. config: DistillConfig (not ``reference``).
      step_fn: :func:`functional_train_step` (returns ``(state, metrics)``, the state keeping
        its shardings) or :func:`functional_loss_and_grads` (``(metrics, grads)``).
      donate: donate the input state's buffers to the output state.

    Returns:
      ``step(state, batch) -> (state, metrics)``, ``state`` placed with
      :func:`vocab_parallel_shardings` (``jax.device_put(state, shardings)``), batch leaves
      (B, L) with B divisible by the data axis size; metrics replicated and global.

    Raises:
      ValueError: a head's vocabulary is not a multiple of the model axis size.
    """
    if config.reference:
        raise ValueError("the vocabulary-parallel step needs the fused loss (`config.reference` is set)")
    state_shardings = vocab_parallel_shardings(graphdef, state, mesh, model_axis=model_axis)
    replicated = NamedSharding(mesh, P())
    head_loss = vocab_parallel_head_loss(mesh, config=config, data_axis=data_axis, model_axis=model_axis)
    step = functools.partial(step_fn, graphdef, config=config, head_loss=head_loss)
    out_shardings = (state_shardings, replicated) if step_fn is functional_train_step else None
    return jax.jit(
        step,
        in_shardings=(state_shardings, NamedSharding(mesh, P(data_axis))),
        out_shardings=out_shardings,
        donate_argnums=(0,) if donate else (),
    )
