"""LoRA, Dual-LoRA and LoRA-MoE adapters wrapped around a frozen ``Einsum`` projection (SPEC §3).

Both wrappers share the wrapped layer's scope, so the base ``kernel`` keeps its name and path and
the adapter params sit beside it (``query/kernel``, ``query/lora_a``, ``query/lora_b``).

Dropout on the adapter input is active iff the caller supplies a ``"dropout"`` RNG to ``apply``
(the train step passes ``rngs={"dropout": key}``; evaluation passes none) and the module is not
initialising. Without that RNG the adapters are deterministic.
"""

from __future__ import annotations

import dataclasses
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.einsum import Einsum
from mllm_jax.layers.norms import LayerNorm

ADAPTER_KINDS = ("none", "lora", "dual_lora", "lora_moe")
PROJECTION_NAMES = ("query", "key", "value", "out", "wi_gate", "wi_up", "wi", "wo")
LORA_RANK_AXIS = "lora_rank"
LORA_EXPERT_AXIS = "lora_expert"
# PyTorch's nn.LayerNorm default, as in the released Dual-LoRA code.
DUAL_LORA_NORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Which adapter wraps which projections.

    Attributes:
      kind: "none" (plain projections), "lora", "dual_lora" or "lora_moe" (a mixture of
        LoRA experts with a router per projection: the MoE baseline of the Dual-LoRA paper).
      rank: r, the adapter's inner width (of each expert for LoRA-MoE).
      alpha: the update is scaled by ``scale = alpha / rank``.
      dropout: dropout rate on the adapter input (LoRA, LoRA-MoE) or skill branch (Dual-LoRA).
      targets: projection names to adapt, a subset of ``PROJECTION_NAMES``.
      num_experts: LoRA experts per projection (LoRA-MoE only).
      top_k: experts each token uses (LoRA-MoE only).
    """

    kind: str = "none"
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("query", "value")
    num_experts: int = 4
    top_k: int = 2

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not one of {ADAPTER_KINDS}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"adapter alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in PROJECTION_NAMES]
        if unknown:
            raise ValueError(f"unknown adapter targets {unknown}; allowed: {PROJECTION_NAMES}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter targets repeat a name: {self.targets}")
        if self.kind != "none" and not self.targets:
            raise ValueError(f"adapter kind {self.kind!r} needs at least one target")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"adapter top_k={self.top_k} must be in [1, num_experts={self.num_experts}]"
            )

    @property
    def scale(self) -> float:
        """s = alpha / rank."""
        return self.alpha / self.rank

    def adapts(self, name: str) -> bool:
        """Whether the projection called ``name`` gets an adapter."""
        return self.kind != "none" and name in self.targets


@dataclasses.dataclass(frozen=True)
class LowRankEinsum:
    """A base einsum ``x,W->y`` rewritten as ``x,A->z`` then ``z,B->y`` through a rank letter.

    Attributes:
      down: equation of z = x A, A of shape in_dims + (r,); z ends in the rank axis.
      up: equation of y = z B, B of shape (r,) + out_dims.
      num_in: how many leading kernel dims are contracted with x (the in dims).
    """

    down: str
    up: str
    num_in: int


def low_rank_einsum(equation: str, kernel_ndim: int) -> LowRankEinsum:
    """Splits ``equation`` (``"x_spec,kernel_spec->out_spec"``) around the kernel's in/out dims.

    In letters are the kernel letters contracted with x (in x, not in the output); out letters
    are the kernel letters in the output. The in letters must lead the kernel, as in every
    projection here (``ehd``, ``hde``, ``ef``, ``fe``), so that A B reshapes to the kernel.
    """
    compact = equation.replace(" ", "")
    if "->" not in compact or compact.count(",") != 1:
        raise ValueError(f"adapter einsum needs the form 'x,kernel->out', got {equation!r}")
    operands, out_spec = compact.split("->")
    x_spec, kernel_spec = operands.split(",")
    if (
        "." in kernel_spec
        or len(kernel_spec) != kernel_ndim
        or len(set(kernel_spec)) != kernel_ndim
    ):
        raise ValueError(
            f"kernel operand {kernel_spec!r} of {equation!r} must name each of its "
            f"{kernel_ndim} dims with a distinct letter"
        )
    is_in = [c in x_spec and c not in out_spec for c in kernel_spec]
    is_out = [c in out_spec and c not in x_spec for c in kernel_spec]
    if not all(i != o for i, o in zip(is_in, is_out, strict=True)):
        raise ValueError(
            f"every kernel letter of {equation!r} must be either contracted with x or kept in the "
            "output (batched kernel dims have no low-rank split)"
        )
    num_in = sum(is_in)
    if num_in == 0 or num_in == kernel_ndim or not all(is_in[:num_in]):
        raise ValueError(
            f"kernel {kernel_spec!r} of {equation!r} must have its contracted dims first, "
            "followed by at least one output dim"
        )
    in_letters, out_letters = kernel_spec[:num_in], kernel_spec[num_in:]
    used = set(compact)
    rank = "r" if "r" not in used else next(c for c in string.ascii_letters if c not in used)
    kept = "".join(c for c in x_spec if c not in in_letters)
    return LowRankEinsum(
        down=f"{x_spec},{in_letters}{rank}->{kept}{rank}",
        up=f"{kept}{rank},{rank}{out_letters}->{out_spec}",
        num_in=num_in,
    )


def _kaiming_uniform(num_in: int) -> nn.initializers.Initializer:
    """U(±1/sqrt(d_in)) for a kernel in_dims + (r,), d_in = product of the in dims."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(num_in)), out_axis=-1
    )


class _AdapterBase(nn.Module):
    """Shares the wrapped Einsum's scope and creates the low-rank params beside its kernel."""

    wrapped: Einsum
    rank: int
    alpha: float
    dropout_rate: float = 0.0

    def setup(self):
        nn.share_scope(self, self.wrapped)

    def _down_param(self, name: str, split: LowRankEinsum) -> jnp.ndarray:
        """A-side param of shape in_dims + (r,), kaiming-uniform."""
        base = self.wrapped
        return self.param(
            name,
            nn.with_logical_partitioning(
                _kaiming_uniform(split.num_in),
                base.logical_axes[: split.num_in] + (LORA_RANK_AXIS,),
            ),
            tuple(base.shape[: split.num_in]) + (self.rank,),
            base.param_dtype,
        ).astype(base.dtype)

    def _up_param(self, name: str, split: LowRankEinsum) -> jnp.ndarray:
        """B-side param of shape (r,) + out_dims, zero so the layer starts as the base layer."""
        base = self.wrapped
        return self.param(
            name,
            nn.with_logical_partitioning(
                nn.initializers.zeros, (LORA_RANK_AXIS,) + base.logical_axes[split.num_in :]
            ),
            (self.rank,) + tuple(base.shape[split.num_in :]),
            base.param_dtype,
        ).astype(base.dtype)

    def _dropout(self, x: jnp.ndarray) -> jnp.ndarray:
        active = self.has_rng("dropout") and not self.is_initializing()
        return nn.Dropout(rate=self.dropout_rate, deterministic=not active)(x)


class LoRAEinsum(_AdapterBase):
    """h = W0 x + s · (Dropout(x) A) B around a wrapped ``Einsum`` (W0 = its ``kernel``).

    Attributes:
      wrapped: the base projection; its params keep their names and paths.
      rank: r.
      alpha: s = alpha / r.
      dropout_rate: dropout on the adapter's input (active only with a "dropout" RNG).

    Parameters: ``lora_a`` in_dims + (r,), kaiming-uniform U(±1/sqrt(d_in)); ``lora_b``
    (r,) + out_dims, zeros. Logical axes: the kernel's in/out names and ``lora_rank``.
    """

    @nn.compact
    def __call__(self, equation: str, x: jnp.ndarray) -> jnp.ndarray:
        """Same contract as ``Einsum``: ``einsum(equation, x, kernel)`` plus the update."""
        # Base first, so its kernel draws the init RNG it would draw without an adapter.
        h = self.wrapped(equation, x)
        split = low_rank_einsum(equation, len(self.wrapped.shape))
        lora_a = self._down_param("lora_a", split)
        lora_b = self._up_param("lora_b", split)
        low = jnp.einsum(split.down, self._dropout(x.astype(self.wrapped.dtype)), lora_a)
        return h + (self.alpha / self.rank) * jnp.einsum(split.up, low, lora_b)


class DualLoRAEinsum(_AdapterBase):
    """h = W0 x + s · (ReLU(x W_T) ⊙ LayerNorm_r(Dropout(x) W_A)) W_B around a wrapped ``Einsum``.

    Not mergeable into W0: the ReLU gate and the LayerNorm make the update depend on x.

    Attributes:
      wrapped: the base projection; its params keep their names and paths.
      rank: r.
      alpha: s = alpha / r.
      dropout_rate: dropout on the skill branch's input only (active only with a "dropout" RNG).

    Parameters: ``dual_lora_skill`` (W_A) and ``dual_lora_task`` (W_T), in_dims + (r,),
    kaiming-uniform U(±1/sqrt(d_in)); ``dual_lora_up`` (W_B), (r,) + out_dims, zeros;
    ``dual_lora_norm/scale`` (γ = 1) and ``dual_lora_norm/bias`` (β = 0), [r], axis ``norm``.
    """

    @nn.compact
    def __call__(self, equation: str, x: jnp.ndarray) -> jnp.ndarray:
        """Same contract as ``Einsum``: ``einsum(equation, x, kernel)`` plus the update."""
        h = self.wrapped(equation, x)
        split = low_rank_einsum(equation, len(self.wrapped.shape))
        skill_kernel = self._down_param("dual_lora_skill", split)
        task_kernel = self._down_param("dual_lora_task", split)
        up_kernel = self._up_param("dual_lora_up", split)
        norm = LayerNorm(
            epsilon=DUAL_LORA_NORM_EPSILON,
            dtype=self.wrapped.dtype,
            param_dtype=self.wrapped.param_dtype,
            name="dual_lora_norm",
        )
        x = x.astype(self.wrapped.dtype)
        task = nn.relu(jnp.einsum(split.down, x, task_kernel))
        skill = norm(jnp.einsum(split.down, self._dropout(x), skill_kernel))
        return h + (self.alpha / self.rank) * jnp.einsum(split.up, task * skill, up_kernel)


class LoRAMoEEinsum(_AdapterBase):
    """h = W0 x + s · Σ_e g_e(x) (Dropout(x) A_e) B_e around a wrapped ``Einsum``.

    A mixture of ``num_experts`` LoRA experts with a float32 softmax router of its own; g(x) are
    the router probabilities of the token's top-k experts renormalised over the k (zero for the
    others). All experts' low-rank products are computed (E·r·(d_in + d_out) FLOPs per token,
    small at LoRA ranks) and the gates select. Starts as the base layer (B_e = 0).

    Parameters: ``lora_moe_router`` in_dims + (E,), N(0, 0.02); ``lora_moe_a`` (E,) + in_dims +
    (r,), kaiming-uniform; ``lora_moe_b`` (E, r) + out_dims, zeros. Logical axes: the kernel's
    names, ``lora_expert`` and ``lora_rank``.
    """

    num_experts: int = 4
    top_k: int = 2

    @nn.compact
    def __call__(self, equation: str, x: jnp.ndarray) -> jnp.ndarray:
        """Same contract as ``Einsum``: ``einsum(equation, x, kernel)`` plus the update."""
        base = self.wrapped
        h = base(equation, x)
        split = low_rank_einsum(equation, len(base.shape))
        x_spec, rest = split.down.split(",")
        in_and_rank, kept_and_rank = rest.split("->")
        rank, in_letters, kept = in_and_rank[-1], in_and_rank[:-1], kept_and_rank[:-1]
        out_letters, out_spec = split.up.split(",")[1][1:].split("->")
        expert = next(c for c in string.ascii_letters if c not in equation + rank)
        in_axes, out_axes = base.logical_axes[: split.num_in], base.logical_axes[split.num_in :]
        in_shape, out_shape = tuple(base.shape[: split.num_in]), tuple(base.shape[split.num_in :])

        router = self.param(
            "lora_moe_router",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), in_axes + (LORA_EXPERT_AXIS,)
            ),
            in_shape + (self.num_experts,),
            base.param_dtype,
        )
        down = self.param(
            "lora_moe_a",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(
                    1.0 / 3.0,
                    "fan_in",
                    "uniform",
                    in_axis=tuple(range(1, split.num_in + 1)),
                    out_axis=-1,
                    batch_axis=(0,),
                ),
                (LORA_EXPERT_AXIS,) + in_axes + (LORA_RANK_AXIS,),
            ),
            (self.num_experts,) + in_shape + (self.rank,),
            base.param_dtype,
        ).astype(base.dtype)
        up = self.param(
            "lora_moe_b",
            nn.with_logical_partitioning(
                nn.initializers.zeros, (LORA_EXPERT_AXIS, LORA_RANK_AXIS) + out_axes
            ),
            (self.num_experts, self.rank) + out_shape,
            base.param_dtype,
        ).astype(base.dtype)

        logits = jnp.einsum(
            f"{x_spec},{in_letters}{expert}->{kept}{expert}",
            x.astype(jnp.float32),
            router.astype(jnp.float32),
        )
        probs = jax.nn.softmax(logits, axis=-1)
        top, chosen = jax.lax.top_k(probs, self.top_k)
        gates = jnp.sum(
            jax.nn.one_hot(chosen, self.num_experts)
            * (top / top.sum(-1, keepdims=True))[..., None],
            axis=-2,
        )  # [..., E]: renormalised top-k probabilities, zero elsewhere
        x = self._dropout(x.astype(base.dtype))
        low = jnp.einsum(f"{x_spec},{expert}{in_letters}{rank}->{kept}{expert}{rank}", x, down)
        low = low * gates[..., None].astype(low.dtype)
        update = jnp.einsum(
            f"{kept}{expert}{rank},{expert}{rank}{out_letters}->{out_spec}", low, up
        )
        return h + (self.alpha / self.rank) * update


def make_projection(
    name: str,
    *,
    shape: tuple[int, ...],
    logical_axes: tuple[str, ...],
    in_axis: int | tuple[int, ...] = 0,
    out_axis: int | tuple[int, ...] = -1,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    adapter: AdapterConfig,
    use_bias: bool = False,
) -> nn.Module:
    """An ``Einsum`` named ``name``, wrapped in an adapter if ``adapter`` targets ``name``.

    Call the result as ``(equation, x)``. Its params live under ``name`` whatever the wrapper;
    ``use_bias`` gives the base projection a bias (the adapter's update adds to W x + b).
    """
    base = Einsum(
        shape=shape,
        logical_axes=logical_axes,
        in_axis=in_axis,
        out_axis=out_axis,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=use_bias,
        name=name,
    )
    if not adapter.adapts(name):
        return base
    common = dict(
        wrapped=base, rank=adapter.rank, alpha=adapter.alpha, dropout_rate=adapter.dropout
    )
    if adapter.kind == "lora_moe":
        return LoRAMoEEinsum(**common, num_experts=adapter.num_experts, top_k=adapter.top_k)
    return (LoRAEinsum if adapter.kind == "lora" else DualLoRAEinsum)(**common)
