r"""The error feedback: update quantized weights without a master copy.

:func:`error_feedback` turns a :class:`~eco_optax.rules.MomentumRule` into an
``optax.GradientTransformation`` that steps quantized weights directly. Per
quantized leaf, in FP32::

    target = Q(w) - eta * (d + lambda * Q(w))          (the optimizer's step)
    w'     = Q(target)                                 (stored weights, RTN or SR)
    e      = target - Q(w')                            (quantization error)
    m      = m~ + alpha * P(e),   alpha = ((1 - eta*lambda) / eta) * (1 - 1/beta)

where ``d = P^-1(m~)`` is the rule's direction (``P(e) = e`` for SGDM,
``D * e`` with ``D = (1 - beta1^t)(sqrt(v_hat) + eps)`` for Adam).

Derivation (paper, Algorithms 2-3). Ask the stored weights to trail the master
weights by exactly the current error, ``w_t = w_t^MW - e_t``, and the momentum to
carry the matching debt, ``m_t = m_t^MW + delta_t``. The next step gives
``w~ = w^MW_{t+1} - (1 - eta*lambda) e_t - eta * beta * P^-1(delta_t)`` (to first
order when ``P`` depends on ``m``), which is the master-weight iterate exactly
when ``delta_t = -(1 - eta*lambda) P(e_t) / (eta*beta)``. Keeping that invariant
across the momentum decay ``m <- beta*m + ...`` needs the injection
``delta_{t+1} - beta*delta_t``; with consecutive errors aligned, ``e_t ~ e_{t+1}``
(the paper's Figure 3), it is ``alpha * P(e)`` above, and it costs no memory. For SGDM (``D = 1``, no decay) the virtual iterate
``z = w - eta*beta/(1-beta) * m`` then follows ``z <- z - eta*grad`` exactly: the
master-weight path.

The same transformation provides the paper's baselines through ``mode``:

* ``"eco"``: the rule above.
* ``"eco_exact"``: the paper's exact rule, ``m = m~ - ((1 - eta*lambda)/eta) *
  P(e_{t+1}/beta - e_t)``, with the previous error ``e_t`` kept in the state at two
  bytes per parameter (bfloat16, in the weights' code units). Under round-to-nearest
  the errors of a weight that does not move for several steps drift
  (``e_{t+1} - e_t`` is the step that vanished), and the memory-free rule then
  lets the stored weights trail the master path by about ``beta/(1-beta)`` half
  grid steps; the exact rule keeps them within half a step (``tests/test_transform.py``).
* ``"naive"``: ``w' = Q(target)``, the error is dropped (``w/o MW``; with
  ``rounding="stochastic"``, the ``w/o MW + SR`` baseline).
* ``"master_weights"``: an FP32 master copy ``w_MW`` lives in the state, steps as
  in full precision, and ``w' = Q(w_MW)`` every step (``w/ MW``).

Leaves that are not quantized follow the plain optimizer in every mode. The
returned update of a quantized leaf is ``Q(w') - Q(w)`` in FP32; apply it with
:func:`eco_optax.apply_updates`, which reproduces ``w'`` exactly.

Guards. ``eta = 0`` (warm-up from zero, annealing to zero) makes the update zero
and ``alpha`` undefined: no error is injected on such steps. Non-finite
gradient entries leave their stored weights unchanged (the momentum takes the NaN
as in optax: wrap the optimizer in :func:`optax.apply_if_finite` to skip such
steps). ``beta`` must be in ``(0, 1)`` for ``"eco"``: without momentum there is
nowhere to store the debt.

Moment storage. ``moment_formats`` keeps chosen moments in low precision between
steps (:mod:`eco_optax.moments`): each update decodes them to FP32, runs the rule,
injects the error into ``mu``, and encodes the result. Stochastic rounding of the
moments draws from ``fold_in(state.key, 2^32 - 1)``, then one key per field
(``fold_in`` by its index) and per leaf (``split``). The weights use
``split(state.key, n + 1)`` (the next state key and one per quantized leaf), which
is ``fold_in(state.key, i)`` for ``i <= n``: the two never meet, and the weights'
random numbers do not depend on how the moments are stored. With FP32 moments
nothing is encoded at all.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from eco_optax import moments as mom
from eco_optax import quantize as qz
from eco_optax import rules
from eco_optax import tree as qtree

Mode = Literal["eco", "eco_exact", "master_weights", "naive"]
MODES = ("eco", "eco_exact", "master_weights", "naive")
_ECO_MODES = ("eco", "eco_exact")


class ErrorFeedbackState(NamedTuple):
  """State of :func:`error_feedback`.

  Attributes:
    count: steps taken (int32).
    moments: the rule's moments (``mu`` receives the injected error), each field in
      its storage format (``moment_formats``; FP32 arrays by default).
    master: FP32 master weights in ``"master_weights"`` mode, else ``None``.
    key: PRNG key for stochastic rounding (advanced every step).
    previous_error: in ``"eco_exact"`` mode, the last quantization error of each
      quantized leaf in its code units (:func:`eco_optax.quantize.encode_residual`,
      bfloat16: 2 bytes per parameter), else ``None``.
  """
  count: jax.Array
  moments: Any
  master: Optional[Any]
  key: jax.Array
  previous_error: Optional[Any] = None


def _split_key(key: jax.Array, n: int) -> tuple[jax.Array, list[jax.Array]]:
  keys = jax.random.split(key, n + 1)
  return keys[0], list(keys[1:])


# fold_in(state.key, _MOMENT_STREAM) seeds the moments' rounding; the weights use
# fold_in(state.key, i) = split(state.key, n + 1)[i] for i <= n (module docstring).
_MOMENT_STREAM = 2**32 - 1


def _moment_formats(rule: rules.MomentumRule,
                    specs: Optional[Mapping[str, mom.Spec]]) -> dict[str, mom.MomentFormat]:
  """``{field: format}`` for the fields of ``rule``'s moments not stored in FP32."""
  fields = rule.init({})._fields      # the rule's moments NamedTuple, of no params
  unknown = sorted(set(specs or {}) - set(fields))
  if unknown:
    raise ValueError(f"moment_formats: unknown moment fields {unknown}; this rule's "
                     f"moments are {list(fields)}")
  formats = {name: mom.as_format(spec, nonnegative=name in rule.nonnegative, name=name)
             for name, spec in (specs or {}).items()}
  return {name: fmt for name, fmt in formats.items() if fmt is not None}


def _encode_moments(formats: dict[str, mom.MomentFormat], moments: Any,
                    key: jax.Array) -> Any:
  """``moments`` (FP32) with the fields of ``formats`` encoded; keys as the module docstring."""
  if not formats:
    return moments
  key = jax.random.fold_in(key, _MOMENT_STREAM)
  return moments._replace(**{
      name: mom.encode_tree(fmt, getattr(moments, name),
                            jax.random.fold_in(key, moments._fields.index(name)))
      for name, fmt in formats.items()})


def _decode_moments(formats: dict[str, mom.MomentFormat], moments: Any) -> Any:
  return moments._replace(**{name: mom.decode_tree(fmt, getattr(moments, name))
                             for name, fmt in formats.items()})


def _per_leaf(value: Any, tree: Any) -> Any:
  """``value(tree)`` for a callable (a tree of per-leaf floats), else ``value`` at every leaf."""
  return value(tree) if callable(value) else jax.tree.map(lambda _: value, tree)


def error_feedback(
    rule: rules.MomentumRule,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Union[float, Callable[[Any], Any]] = 0.0,
    mode: Mode = "eco",
    rounding: qz.Rounding = "nearest",
    seed: int = 0,
    weight_decay_mask: Any = None,
    *,
    moment_formats: Optional[Mapping[str, mom.Spec]] = None,
) -> optax.GradientTransformation:
  r"""Steps quantized weights with ``rule``, paying rounding errors back via momentum.

  Args:
    rule: the optimizer's momentum rule, e.g. :func:`eco_optax.rules.adam_rule`.
    learning_rate: ``eta``: a float or an optax schedule of the step count.
    weight_decay: ``lambda`` of decoupled weight decay ``w <- (1 - eta*lambda) w``;
      or a callable of the dequantized params returning per-leaf floats.
    mode: ``"eco"``, ``"eco_exact"``, ``"naive"`` or ``"master_weights"``
      (module docstring).
    rounding: ``"nearest"`` (round half to even) or ``"stochastic"`` (unbiased).
    seed: seed of the PRNG key kept in the state for stochastic rounding.
    weight_decay_mask: optional tree of Python booleans with the structure of the
      dequantized params, or a callable of the dequantized params returning one,
      as ``mask`` in :func:`optax.adamw`: decay only where True.
    moment_formats: storage of the moments between steps, by field of the rule's
      moments (``"mu"``; ``"nu"`` for Adam and Muon): ``None``/``jnp.float32``
      (FP32, default), ``jnp.bfloat16``, ``jnp.float16`` or a format of
      :mod:`eco_optax.moments` such as ``blockwise_8bit()``.

  Returns:
    An ``optax.GradientTransformation``; ``update(grads, state, params)`` needs the
    quantized ``params`` and returns updates for :func:`eco_optax.apply_updates`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, eco_optax as eco
    >>> from eco_optax import rules, transform
    >>> q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
    >>> tx = transform.error_feedback(rules.sgdm_rule(0.9), learning_rate=0.1)
    >>> state = tx.init(q)
    >>> grads = {"w": jnp.full((4, 4), 0.01)}
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
    >>> q = eco.apply_updates(q, updates)

    Adam with bfloat16 first and 8-bit second moments:

    >>> tx = transform.error_feedback(
    ...     rules.adam_rule(), learning_rate=1e-3,
    ...     moment_formats={"mu": jnp.bfloat16, "nu": eco.moments.blockwise_8bit()})
    >>> state = tx.init(q)
    >>> state.moments.mu["w"].dtype, state.moments.nu["w"].codes.dtype
    (dtype(bfloat16), dtype('uint8'))
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if rounding not in qz.ROUNDINGS:
    raise ValueError(f"rounding must be one of {qz.ROUNDINGS}, got {rounding!r}")

  def check_betas(betas):
    if mode in _ECO_MODES and not all(0.0 < b < 1.0 for b in betas):
      raise ValueError(
          f"mode={mode!r} needs a momentum (beta / b1) in (0, 1), got {sorted(set(betas))}: "
          "the error is paid back through the momentum, alpha = (1/eta)(1 - 1/beta). "
          "Use mode='naive' or 'master_weights' for momentum-free training.")

  if not callable(rule.beta):
    check_betas([rule.beta])
  formats = _moment_formats(rule, moment_formats)
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    dense = qtree.dequantize_params(params)
    check_betas(jax.tree.leaves(_per_leaf(rule.beta, dense)))
    master = None
    if mode == "master_weights":  # FP32 copies of the quantized leaves only
      master = jax.tree.map(lambda p: qz.dequantize(p) if qtree.is_quantized(p) else None,
                            params, is_leaf=qtree.is_quantized)
    previous_error = None
    if mode == "eco_exact":  # e_0 = 0: the initial rounding error is dropped
      previous_error = jax.tree.map(
          lambda p: jnp.zeros(p.shape, jnp.bfloat16)
          if qtree.is_quantized(p) and not p.fmt.lossless else None,
          params, is_leaf=qtree.is_quantized)
    key = jax.random.key(seed)
    return ErrorFeedbackState(
        count=jnp.zeros([], jnp.int32),
        moments=_encode_moments(formats, rule.init(dense), key),   # zeros: exact
        master=master,
        key=key,
        previous_error=previous_error,
    )

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("eco_optax optimizers need params: tx.update(grads, state, params)")
    qtree.check_updates_match(params, updates, "grads")
    count = optax.safe_increment(state.count)
    eta = jnp.asarray(schedule(state.count), jnp.float32)
    moments, direction, precond = rule.step(
        updates, _decode_moments(formats, state.moments), count)

    stored = qtree.dequantize_params(params)
    p_leaves, treedef = jax.tree.flatten(params, is_leaf=qtree.is_quantized)
    if state.master is None:
      base = stored
    else:  # the master copy where there is one, the stored plain leaves elsewhere
      base = treedef.unflatten([
          w if m is None else m for w, m in
          zip(treedef.flatten_up_to(stored), treedef.flatten_up_to(state.master))])
    if weight_decay_mask is None:
      mask = jax.tree.map(lambda _: True, stored)
    elif callable(weight_decay_mask):
      mask = weight_decay_mask(stored)
    else:
      mask = weight_decay_mask
    decay = jax.tree.map(lambda m, lam: lam if m else 0.0, mask,
                         _per_leaf(weight_decay, stored))
    # The FP32 step of the optimizer, as optax computes it: -eta * (d + lambda * w).
    steps = jax.tree.map(lambda d, w, lam: -eta * (d + lam * w), direction, base, decay)

    n_quantized = sum(map(qtree.is_quantized, p_leaves))
    key, leaf_keys = _split_key(state.key, n_quantized)
    leaf_keys = iter(leaf_keys)

    safe_eta = jnp.where(eta > 0, eta, 1.0)

    def leaf_update(p, w, base_w, step, mu, pre, lam, beta, prev):
      """Returns (update, new mu, new master, error to keep) for one leaf."""
      target = base_w + step
      if not qtree.is_quantized(p):
        return step, mu, None, None
      if p.fmt.lossless:
        return step, mu, target, None
      leaf_key = next(leaf_keys)
      new, new_w = qz.requantize_with_value(p, target, rounding, leaf_key, stored=w)
      error = jnp.where((eta > 0) & jnp.isfinite(target), target - new_w, 0.0)
      # (1 - eta*lambda) / eta, zero on eta = 0 steps: no debt can be expressed.
      coef = jnp.where(eta > 0, (1 - eta * lam) / safe_eta, 0.0)
      if mode == "eco":       # e_t ~ e_{t+1}: alpha * P(e)
        mu = mu + coef * (1 - 1 / beta) * rule.precondition(pre, error)
      elif mode == "eco_exact":  # delta_{t+1} - beta * delta_t with the stored e_t
        # Use the error as it will be stored (bfloat16), so that the debt added now and
        # the debt paid at the next step cancel exactly.
        stored_error = qz.encode_residual(error, new, jax.random.fold_in(leaf_key, 1))
        debt = qz.decode_residual(stored_error, new) / beta - qz.decode_residual(prev, p)
        mu = mu - coef * rule.precondition(pre, debt)
        prev = stored_error
      return new_w - w, mu, target, prev

    per_leaf = [treedef.flatten_up_to(t) for t in
                (stored, base, steps, moments.mu, precond, decay,
                 _per_leaf(rule.beta, stored))]
    previous = (treedef.flatten_up_to(state.previous_error)
                if state.previous_error is not None else [None] * len(p_leaves))
    out = [leaf_update(p, *rest) for p, *rest in zip(p_leaves, *per_leaf, previous)]
    new_updates, new_mu, new_master, new_error = (treedef.unflatten(x) for x in zip(*out))
    moments = _encode_moments(formats, moments._replace(mu=new_mu), state.key)
    return new_updates, ErrorFeedbackState(
        count, moments, new_master if mode == "master_weights" else None, key,
        new_error if mode == "eco_exact" else None)

  return optax.GradientTransformation(init, update)
