"""Flax NNX models whose weights are stored quantized.

An NNX ``Variable`` can hold any pytree, so a model can keep its selected
``nnx.Param`` values as :class:`~eco_optax.QuantizedArray` (codes + scales)
and nothing else: no FP32 copy of those weights stays resident. Four pieces make
that trainable with the usual NNX idioms:

* :func:`quantize_model` replaces the chosen parameters in place;
* :func:`dequantized` gives a plain model (same graph, ``Q(w)`` as float arrays)
  for the forward pass, evaluation or export;
* :func:`value_and_grad` / :func:`grad` differentiate a loss of the model with
  respect to the dequantized weights (:func:`eco_optax.value_and_grad` on the
  model's state), writing any other state the loss changes (batch statistics,
  RNG counters) back into the quantized model;
* :class:`Optimizer` is :class:`flax.nnx.Optimizer` with
  :func:`eco_optax.apply_updates` in place of ``optax.apply_updates``, which
  cannot add FP32 updates to float8/int4 leaves.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import eco_optax as eco
  >>> from eco_optax import nnx as eco_nnx
  >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  >>> eco_nnx.quantize_model(model, eco.fp8_e4m3())
  >>> optimizer = eco_nnx.Optimizer(model, eco.adamw(1e-2), wrt=nnx.Param)
  >>> x, y = jnp.ones((2, 8)), jnp.zeros((2, 4))
  >>> @nnx.jit
  ... def train_step(model, optimizer):
  ...   loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
  ...   loss, grads = eco_nnx.value_and_grad(loss_fn)(model)
  ...   optimizer.update(model, grads)
  ...   return loss
  >>> loss = train_step(model, optimizer)
  >>> model.kernel.get_value().values.dtype
  dtype(float8_e4m3fn)
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import filterlib, graph

from eco_optax import tree as qtree

M = TypeVar("M", bound=nnx.Module)


def quantize_model(model: nnx.Module, fmt_or_policy: qtree.FormatOrPolicy,
                   wrt: Any = nnx.Param) -> None:
  """Stores the ``wrt`` variables of ``model`` quantized, in place.

  Args:
    model: an NNX module with float parameters.
    fmt_or_policy: a format (:func:`eco_optax.default_policy`: leaves with ``ndim >= 2``
      but biases and norm gains) or a policy
      ``(path, leaf) -> QuantFormat | None``, as :func:`eco_optax.quantize_params`;
      paths are the key paths of ``nnx.to_pure_dict(nnx.state(model, wrt))``, e.g.
      ``(DictKey('layers'), DictKey(0), DictKey('kernel'))``: test names with
      ``path[-1].key == "kernel"``.
    wrt: NNX filter of the variables to consider (default ``nnx.Param``).

  Example:
    >>> from flax import nnx
    >>> import eco_optax as eco
    >>> from eco_optax import nnx as eco_nnx
    >>> model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    >>> eco_nnx.quantize_model(model, eco.int4())
    >>> model.kernel.get_value().values.dtype, model.bias.get_value().dtype
    (dtype(int4), dtype('float32'))
  """
  pure = nnx.to_pure_dict(nnx.state(model, wrt))
  nnx.update(model, qtree.quantize_params(pure, fmt_or_policy))


def dequantized(model: M, dtype=jnp.float32) -> M:
  """A new model with the same graph and ``Q(w)`` in ``dtype`` for every quantized weight.

  ``model`` itself is not modified; plain variables are shared by value. Works
  inside ``jit`` (the copy is what the loss should see) and outside it (for
  evaluation or export with ``nnx.state(...)``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import eco_optax as eco
    >>> from eco_optax import nnx as eco_nnx
    >>> model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    >>> eco_nnx.quantize_model(model, eco.fp8_e4m3())
    >>> eco_nnx.dequantized(model)(jnp.ones((1, 4))).shape
    (1, 8)
  """
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, qtree.dequantize_params(state, dtype))


def value_and_grad(fun: Callable[..., Any], *, wrt: Any = nnx.Param,
                   has_aux: bool = False, recompute: bool | None = None,
                   dtype: Any = jnp.float32) -> Callable[..., tuple[Any, nnx.State]]:
  """``nnx.value_and_grad`` of ``fun(model, *args)`` w.r.t. the dequantized weights.

  The returned function takes the quantized model first. ``fun`` sees
  :func:`dequantized` ``(model, dtype)``; gradients are an ``nnx.State`` of float arrays
  for the ``wrt`` variables, the structure :meth:`Optimizer.update` expects.
  Variables outside ``wrt`` that ``fun`` modifies are written back to ``model``;
  quantized weights outside ``wrt`` (frozen) enter ``fun`` dequantized and stay stored
  as they are. Graph nodes among the other arguments (an ``nnx.Rngs`` for dropout,
  another module) are not differentiated, and what ``fun`` changes in them is written
  back, as with ``nnx.value_and_grad``.
  Built on :func:`eco_optax.value_and_grad`: each weight is dequantized where the model
  reads it, its products in slices in the backward pass.

  Args:
    fun: ``fun(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
    wrt: NNX filter of the differentiated variables, as in ``nnx.value_and_grad``.
    has_aux: as in ``jax.value_and_grad``.
    recompute: as in :func:`eco_optax.value_and_grad`.
    dtype: the dtype ``fun`` sees the quantized weights in, and of their gradients
      (``jnp.bfloat16`` for a model built with ``param_dtype=jnp.bfloat16``).

  Returns:
    ``f(model, *args, **kwargs) -> (value, grads)``.
  """
  differentiated = filterlib.to_predicate(wrt)

  def wrapper(model, *args, **kwargs):
    # The model and the graph nodes among the arguments, split together as one tuple
    # (a variable they share stays one variable); only the model's ``wrt`` variables
    # are differentiated.
    at = [i for i, a in enumerate(args) if graph.is_graph_node(a)]
    named = [k for k, v in kwargs.items() if graph.is_graph_node(v)]
    nodes = (model, *(args[i] for i in at), *(kwargs[k] for k in named))
    in_diff = lambda path, x: path[0] == 0 and differentiated(path[1:], x)
    graphdef, diff, rest = nnx.split(nodes, in_diff, ...)
    # As plain arrays: the nodes built inside the transformation own their variables.
    rest = nnx.to_pure_dict(rest)

    def loss(dense, rest):
      # Quantized weights outside ``wrt`` (frozen ones) enter the forward dequantized.
      inner = nnx.merge(graphdef, dense, qtree.dequantize_params(rest, dtype))
      inner_args, inner_kwargs = list(args), dict(kwargs)
      for i, node in zip(at, inner[1:]):
        inner_args[i] = node
      for k, node in zip(named, inner[1 + len(at):]):
        inner_kwargs[k] = node
      out = fun(inner[0], *inner_args, **inner_kwargs)
      value, aux = out if has_aux else (out, None)
      return value, (aux, nnx.to_pure_dict(nnx.state(inner, nnx.Not(in_diff))))

    (value, (aux, changed)), grads = qtree.value_and_grad(
        loss, has_aux=True, recompute=recompute, dtype=dtype)(diff, rest)
    # ... and stay stored as they were: only the other variables are written back.
    nnx.update(nodes, jax.tree.map(lambda r, c: r if qtree.is_quantized(r) else c,
                                   rest, changed, is_leaf=qtree.is_quantized))
    return ((value, aux) if has_aux else value), grads[0]

  return wrapper


def grad(fun: Callable[..., Any], *, wrt: Any = nnx.Param, has_aux: bool = False,
         recompute: bool | None = None, dtype: Any = jnp.float32) -> Callable[..., Any]:
  """Like :func:`value_and_grad` but returns only the gradients (and aux)."""
  vg = value_and_grad(fun, wrt=wrt, has_aux=has_aux, recompute=recompute, dtype=dtype)

  def wrapper(model, *args, **kwargs):
    value, grads = vg(model, *args, **kwargs)
    return (grads, value[1]) if has_aux else grads

  return wrapper


def _with_weight_metadata(opt_state: Any, params: nnx.State) -> Any:
  """``opt_state`` with each array shaped as a weight, under that weight's path (a
  moment, a master copy, 8-bit moment codes), as a :class:`flax.nnx.Variable` holding
  the weight's metadata (its sharding annotations, set to apply lazily): as for the
  state of an optax optimizer, :func:`flax.nnx.get_partition_spec` then shards it as
  the weight."""
  weights = {tuple(path): var for path, var in nnx.to_flat_state(params)}

  def wrap(path, leaf):
    keys = tuple(qtree.path_entry_key(k) for k in path)
    for end in range(len(keys), 0, -1):
      for start in range(end):
        var = weights.get(keys[start:end])
        if var is not None and jnp.shape(leaf) == jnp.shape(var.get_value()):
          return nnx.Variable(leaf, **{**var.get_metadata(), "eager_sharding": False})
    return leaf

  return jax.tree_util.tree_map_with_path(wrap, opt_state)


class Optimizer(nnx.Optimizer):
  """:class:`flax.nnx.Optimizer` for models with quantized weights.

  Same interface and attributes (``step``, ``tx``, ``opt_state``, ``wrt``).
  The optimizer state is initialized from the *pure* quantized state of the
  model (plain dicts with :class:`~eco_optax.QuantizedArray` leaves), and
  :meth:`update` applies the updates with :func:`eco_optax.apply_updates`, which
  re-stores each quantized weight exactly as the eco_optax optimizer computed it.
  Plain optax transformations still work for models without quantized leaves.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               wrt: Any):
    """Builds the state of ``tx`` for the ``wrt`` variables of ``model``.

    Args:
      model: an NNX module, usually after :func:`quantize_model`.
      tx: an eco_optax optimizer (optionally chained with optax transforms).
      wrt: NNX filter of the trained variables; must match the gradients'.
    """
    self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
    self.tx = tx
    params = nnx.state(model, wrt)
    self.opt_state = nnx.data(nnx.training.optimizer.to_opt_state(
        _with_weight_metadata(tx.init(nnx.to_pure_dict(params)), params)))
    self.wrt = wrt

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> optax.Updates:
    """Steps ``model``'s ``wrt`` variables with ``grads`` (from :func:`value_and_grad`).

    Returns:
      The updates that were applied, as a pure dict of the ``wrt`` variables: an
      :class:`eco_optax.tree.NewCodes` (new codes, flags, scales) at each quantized leaf,
      the difference optax would add at each plain one.
    """
    params = nnx.to_pure_dict(nnx.state(model, self.wrt))
    grads = nnx.to_pure_dict(nnx.state(grads, self.wrt))
    updates, opt_state = self.tx.update(grads, nnx.as_pure(self.opt_state),
                                        params, **nnx.as_pure(kwargs))
    nnx.update(model, qtree.apply_updates(params, updates))
    nnx.update(self.opt_state, nnx.state(opt_state))
    self.step[...] += 1
    return updates
