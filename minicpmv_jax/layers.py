"""Shared building blocks: dense() and OutInDense, RMSNorm, LayerNorm, RoPE, the attention switch attend() and
the layer stack (stack_layers / scan_layers: stacked parameters under nnx.scan, optional remat;
LayerParts: the same stack as per-layer arrays, run unrolled) and map_chunks (bounded-memory
batches of independent rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# XLA:CPU runs a bf16 x bf16 matmul on its fast kernels only when the result is float32
# (`python -m benchmarks.cpu_dot`, 2.6's MLP up-projection at 256 rows on 2 cores: 217 GFLOP/s
# with a float32 result, 64 GFLOP/s with a bf16 one; float32 weights: 92 GFLOP/s). Read at trace
# time; False restores the plain dot (for A/B measurements).
CPU_FAST_BF16 = True
# With CPU_FAST_BF16: a bf16 product of a single row is taken as two rows (`_one_row_dot`).
# Read at trace time; False restores the one-row dot (A/B measurements).
CPU_ONE_ROW_BF16 = True
# CPU: bf16 attention ("xla" impl; with CPU_FAST_BF16) takes both of its products with a float32
# result, scores in the dot's order, queries in blocks where the caller asks (`_attend_cpu`).
# Read at trace time; False restores jax's attention (A/B).
CPU_BF16_ATTENTION = True


# XLA:CPU keeps no bf16 value in a loop: each bf16 operand of a while loop (a scanned layer
# stack; in the decode loop, every weight) and of some gathers becomes a float32 copy made before
# the loop, so a bf16 model's compiled programs held float32 copies of nearly all its weights.
# On that backend the samplers pass the large bf16 weights as their uint16 bit patterns
# (`generate.pack_weights`, no copy) and the model reinterprets each slice it uses inside the
# loop: one layer's (or one lm_head tile's) float32 copy exists at a time.
PACKED_BF16 = jnp.uint16


def unpack_bf16(x: jax.Array) -> jax.Array:
    """uint16 bit patterns of bf16 weights -> those bf16 weights (bit-exact); others unchanged."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == PACKED_BF16 else x


def unpack_module(module: nnx.Module) -> nnx.Module:
    """`module` with every packed bf16 parameter reinterpreted as bf16 (inside a trace)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(unpack_bf16, state))


def cpu_aware_dot(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
):
    """``lax.dot_general`` of a dense layer. On the CPU backend a bf16 x bf16 product is taken
    with a float32 result, rounded back to the requested dtype (the same values up to summation
    order; prefill of a bf16 model 1.6x faster on this CPU), a single row as two rows
    (`_one_row_dot`). Other backends and dtypes: the plain dot."""
    fast = (
        CPU_FAST_BF16 and jax.default_backend() == "cpu" and lhs.dtype == rhs.dtype == jnp.bfloat16
    )
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    one_row = lhs.size == lhs.shape[-1] and tuple(lhs_contract) == (lhs.ndim - 1,)
    if fast and CPU_ONE_ROW_BF16 and one_row and not lhs_batch:
        return _one_row_dot(lhs, rhs, rhs_contract, precision, preferred_element_type)
    y = jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type=jnp.float32 if fast else preferred_element_type,
        out_sharding=out_sharding,
    )
    return y.astype(preferred_element_type or lhs.dtype) if fast else y


def _one_row_dot(lhs, rhs, rhs_contract, precision, preferred_element_type):
    """The bf16 product of one row, taken as two: XLA:CPU runs a bf16 matrix-vector product
    with a float32 result as a slow generic loop that first widens the weights to a float32
    copy (2.6's 3584 x 18,944 up-projection: 85 ms against 9 ms for the same dot of two rows,
    `python -m benchmarks.cpu_dot`), while the two-row dot reads the bf16 weights in place.
    That is what lets a batch-1 decode step read bf16 layers in place (`generate.split_layers`)."""
    row = lhs.reshape(1, lhs.shape[-1])
    y = jax.lax.dot_general(
        jnp.concatenate([row, row]),
        rhs,
        (((1,), tuple(rhs_contract)), ((), ())),
        precision,
        preferred_element_type=jnp.float32,
    )
    return y[:1].reshape(lhs.shape[:-1] + y.shape[1:]).astype(preferred_element_type or lhs.dtype)


def dense(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    bias: bool = True,
) -> nnx.Linear:
    """nnx.Linear whose kernel [din, dout] and bias [dout] carry logical axis names."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        dot_general=cpu_aware_dot,
        rngs=rngs,
    )


class OutInDense(nnx.Module):
    """A torch-layout linear layer: `weight` [out, in] (torch's `nn.Linear.weight`, the
    checkpoint tensor as stored) and an optional `bias` [out]; y = x W^T + b.

    The loader copies the checkpoint tensor without a transpose (weights.py name rule). Speed
    depends on the CPU (BENCHMARKS.md "Weight layout of wide projections", 2.6's lm_head 3584 x
    151,666): on a Xeon VM float32 at 4 / 16 rows took 109 / 176 ms against 229 / 338 ms for an
    [in, out] kernel; on an AMD EPYC VM float32 is 1.18x faster at 1 row but 0.70x / 0.77x at 4
    / 16 rows, while the CPU bf16 (packed) and int8 paths are 1.2-1.6x faster at 1-16 rows.
    The decoder's gate / up / down_proj of a bf16 model on CPU use it too (`LlmConfig.out_in`,
    `model.decoder_layout`: batch-1 bf16 decode 1.14x faster on the AMD EPYC VM).
    """

    def __init__(
        self,
        din: int,
        dout: int,
        names: tuple[str | None, str | None],
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        bias: bool = False,
    ):
        """names: logical axis names of the weight in its own order, (out, in)."""
        init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        self.weight = nnx.Param(
            nnx.with_partitioning(init, names)(rngs.params(), (dout, din), param_dtype)
        )
        self.bias = (
            nnx.Param(
                nnx.with_partitioning(nnx.initializers.zeros_init(), (names[0],))(
                    rngs.params(), (dout,), param_dtype
                )
            )
            if bias
            else None
        )
        self.dtype = dtype  # compute dtype (None: promote the input's and the weight's)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] (computed as nnx.Linear does, through `cpu_aware_dot`)."""
        bias = None if self.bias is None else self.bias[...]
        x, w, bias = nnx.nn.dtypes.promote_dtype((x, self.weight[...], bias), dtype=self.dtype)
        y = cpu_aware_dot(x, w, (((x.ndim - 1,), (1,)), ((), ())))
        if bias is not None:
            y = y + bias
        return y


# Rematerialisation policies of a scanned layer stack (`LlmConfig.remat`, `VisionConfig.remat`):
# "none" keeps every activation of the layer for the backward pass (inference: no recompute);
# "full" keeps only the layer inputs and recomputes the layer in the backward pass (least
# memory); "dots" keeps the matmul outputs without batch dimensions and recomputes the rest
# (element-wise ops, norms, softmax), MaxText's usual middle ground.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(make, num: int, rngs) -> nnx.Module:
    """`num` layers `make(rngs)` whose parameters are stacked on a leading "layers" axis.

    nnx.vmap over the constructor (flax's scan-over-layers recipe): every parameter gets the
    leading dim L and the logical name "layers" in front of its own names. Real `nnx.Rngs` are
    split so that each layer draws its own initial values; any other key source (the fixed-key
    `model.AbstractRngs` of shape-only construction) is shared by the layers.
    """
    meta = {nnx.PARTITION_NAME: "layers"}
    if isinstance(rngs, nnx.Rngs):

        @nnx.split_rngs(splits=num)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=meta)
        def create(r):
            return make(r)

        return create(rngs)
    return nnx.vmap(lambda: make(rngs), in_axes=(), out_axes=0, axis_size=num,
                    transform_metadata=meta)()  # fmt: skip


@jax.tree_util.register_pytree_node_class
class LayerParts:
    """The value of a stacked layer parameter given as its L layer slices, separate arrays.

    XLA:CPU copies the weight operand of a dot when it is a slice of a larger array (the dynamic
    slice of a scanned stack, and a static `w[i]` as well) before multiplying: a batch-1 decode
    step then reads every layer weight three times (read, write the copy, read it). Given as
    separate arrays (on CPU, zero-copy views of the stacked buffer, `generate.split_layers`),
    each layer's dots read their weights in place, and `scan_layers` runs the stack as an
    unrolled loop over the parts. A pytree node: a jit flattens it into its L arrays.
    """

    def __init__(self, parts):
        self.parts = tuple(parts)

    def tree_flatten(self):
        return self.parts, None

    @classmethod
    def tree_unflatten(cls, _, parts):
        return cls(parts)

    def __len__(self) -> int:
        return len(self.parts)


def _is_parts(x) -> bool:
    return isinstance(x, LayerParts)


def layer_parts_count(layers: nnx.Module) -> int:
    """L when the stack's parameters are given as `LayerParts`, else 0 (stacked arrays)."""
    values = jax.tree.leaves(nnx.state(layers), is_leaf=_is_parts)
    return next((len(v) for v in values if _is_parts(v)), 0)


def scan_layers(step, carry, layers: nnx.Module, remat: str = "none"):
    """Run `carry = step(carry, layer)` over a `stack_layers` stack with one traced layer body.

    One `nnx.scan` (jax.lax.scan) instead of an unrolled loop: the program holds one copy of the
    layer whatever the depth, so trace and compile time stay flat in depth. `remat` names a
    policy of `REMAT_POLICIES` applied per layer (training); "none" for inference.

    A stack whose parameters are `LayerParts` (the CPU samplers' decoder and the CPU train step's
    frozen decoder weights, see `generate.split_layers`) runs as a Python loop over its layers
    instead, each layer reading its own arrays (rematerialised per layer as `remat` says); a
    parameter left stacked there (a trainable one, LoRA tensors) is sliced per layer. Trace and
    compile time then grow with the depth.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}"
        )
    inner = step

    def step(carry, layer):  # a packed stack is sliced by the scan, then reinterpreted
        return inner(carry, unpack_module(layer))

    policy = REMAT_POLICIES[remat]
    num = layer_parts_count(layers)
    if num:
        if policy is not None:  # training: each unrolled layer rematerialised on its own;
            # prevent_cse: outside a loop XLA would otherwise merge the recomputation with the
            # forward pass and keep the activations remat is meant to drop
            step = nnx.remat(step, policy=policy, prevent_cse=True, graph=False)
        graphdef, state = nnx.split(layers)
        for i in range(num):
            part = jax.tree.map(lambda v, i=i: v.parts[i] if _is_parts(v) else v[i], state,
                                is_leaf=_is_parts)  # fmt: skip
            carry = step(carry, nnx.merge(graphdef, part))
        return carry
    # graph=False (tree mode): the layers are a plain pytree of stacked arrays, so the scan also
    # runs where the module came from an enclosing trace (the decode while_loop's body).
    if policy is not None:
        # prevent_cse=False: inside a scan the loop already keeps XLA from merging recomputation
        step = nnx.remat(step, policy=policy, prevent_cse=False, graph=False)
    scan = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph=False)
    return scan(carry, layers)


def map_chunks(f, xs: tuple, size: int, pads: tuple, valid: jax.Array | None = None):
    """`f(*xs)` computed `size` rows at a time inside one program (jax.lax.map over chunks).

    Peak activation memory is then that of one chunk, whatever the number of rows: the official
    code runs the vision tower on at most `vision_batch_size` slices per call for the same
    reason. Rows must be independent of each other. The row count is padded up to a multiple of
    `size` with `pads` (one fill value per array) and the padding rows are dropped again.

    Args:
      f: function of arrays with leading dim R (R <= size) -> pytree of arrays with leading R.
      xs: arrays with the same leading dim I.
      size: rows per chunk (static).
      pads: fill value of the padding rows, one per array of `xs`.
      valid: optional bool [I]: a chunk without a valid row is not computed (its outputs are
        zeros), e.g. the padding slices of a slice bucket.
    """
    i = xs[0].shape[0]
    if i <= size and valid is None:
        return f(*xs)
    n = -(-i // size)

    def chunked(a, value):  # [I, ...] -> [n, size, ...]
        a = jnp.pad(a, [(0, n * size - i)] + [(0, 0)] * (a.ndim - 1), constant_values=value)
        return a.reshape(n, size, *a.shape[1:])

    chunks = tuple(chunked(a, v) for a, v in zip(xs, pads, strict=True))
    if valid is None:
        out = jax.lax.map(lambda a: f(*a), chunks)
    else:
        shapes = jax.eval_shape(f, *(c[0] for c in chunks))

        def skip(_):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def one(a):
            return jax.lax.cond(jnp.any(a[0]), lambda r: f(*r), skip, a[1:])

        out = jax.lax.map(one, (chunked(valid, False), *chunks))
    return jax.tree.map(lambda o: o.reshape(n * size, *o.shape[2:])[:i], out)


def param(shape, names, *, param_dtype, rngs: nnx.Rngs, init=None) -> nnx.Param:
    """A raw parameter with logical axis names (used for `resampler.query` / `resampler.proj`)."""
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, param_dtype))


def embed(num: int, dim: int, names, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed with table [num, dim] (checkpoint layout, no transpose)."""
    return nnx.Embed(
        num,
        dim,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), names),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """HF Llama/Qwen RMSNorm: normalise in float32, cast back to the input dtype, then * weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, name: str = "norm"):
        self.scale = nnx.Param(
            nnx.with_partitioning(nnx.initializers.ones_init(), (name,))(
                rngs.params(), (dim,), param_dtype
            )
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in x.dtype."""
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF: `weight * hidden_states.to(input_dtype)`: the cast happens before the scale.
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics in float32 (as torch's LayerNorm kernel)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, name: str = "norm"):
        init = nnx.with_partitioning
        self.scale = nnx.Param(
            init(nnx.initializers.ones_init(), (name,))(rngs.params(), (dim,), param_dtype)
        )
        self.bias = nnx.Param(
            init(nnx.initializers.zeros_init(), (name,))(rngs.params(), (dim,), param_dtype)
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in x.dtype."""
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE (HF `apply_rotary_pos_emb`), computed in float32.

    Args:
      x: [B, T, N, H].
      positions: int32 [B, T].
    Returns: [B, T, N, H] in x.dtype.
    """
    h = x.shape[-1]
    # HF: inv_freq = 1 / theta ** (arange(0, H, 2).float() / H), float32.
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    impl: str = "xla",
    scale=None,
    q_block: int | None = None,
) -> jax.Array:
    """Grouped-query attention, softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (N a multiple of K).
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
      impl: "xla" (jax.nn.dot_product_attention, any backend), "cudnn" (GPU, bf16/fp16),
        "splash" (TPU Pallas splash attention for prefill) or "reference" (plain jnp); see
        kernels.py.
      q_block: CPU bf16 "xla" attention only: the queries in blocks of this many, one block
        after the other (its float32 scores are the program's largest temporaries).
    Returns: [B, T, N, H].
    """
    if impl == "xla":
        if _cpu_attention(q, k, v):
            return _attend_cpu_blocks(q, k, v, mask, scale, q_block)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    from minicpmv_jax import kernels  # Pallas imports only when a kernel is asked for

    return kernels.attention(q, k, v, mask, impl=impl, scale=scale)


def _cpu_attention(q, k, v) -> bool:
    """Whether `attend` takes the CPU form (`_attend_cpu`): bf16 attention of more than one
    query on the CPU backend (a decode step keeps jax's attention, as measured)."""
    return (
        CPU_FAST_BF16
        and CPU_BF16_ATTENTION
        and jax.default_backend() == "cpu"
        and q.dtype == k.dtype == v.dtype == jnp.bfloat16
        and q.shape[1] > 1
    )


def _attend_cpu_blocks(q, k, v, mask, scale, q_block):
    """`_attend_cpu` over query blocks of `q_block`, chained by optimization barriers so
    that XLA runs them in turn and one block's scores are freed before the next one's exist
    (2.6's vision tower, 1024 patches: prefill temporaries 170 -> 128 MB)."""
    t = q.shape[1]
    if q_block is None or t <= q_block:
        return _attend_cpu(q, k, v, mask, scale)
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, N|1, T|1, S]
    outs = []
    for i in range(0, t, q_block):
        qi = q[:, i : i + q_block]
        if outs:  # this block starts once the previous one is done
            qi, outs[-1] = jax.lax.optimization_barrier((qi, outs[-1]))
        mi = mask if mask.shape[2] == 1 else mask[:, :, i : i + q_block]
        outs.append(_attend_cpu(qi, k, v, mi, scale))
    return jnp.concatenate(outs, axis=1)


def _attend_cpu(q, k, v, mask, scale):
    """`jax.nn.dot_product_attention`'s "xla" attention of bf16 q / k / v, both products taken
    with a float32 result (`cpu_aware_dot`'s rule): the same values up to summation order.

    jax takes the probabilities-times-values product with a bf16 result, which XLA:CPU runs on
    a slow loop. As there: scores in float32, scaled, masked to -0.7 x float32 max, float32
    softmax, probabilities rounded to bf16 before the second product, result rounded to bf16.
    The scores stay in the dot's own output order [B, K, T, G, S] (jax's [B, K, G, T, S] made
    XLA:CPU copy them: 2.6's vision tower, 1024 patches, held two 67 MB float32 score arrays).
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    scale = h**-0.5 if scale is None else scale
    s = jnp.einsum(
        "btkgh,bskh->bktgs", q.reshape(b, t, kv, g, h), k, preferred_element_type=jnp.float32
    )
    s = s * jnp.float32(scale)
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, N|1, T|1, S]
    if mask.shape[1] == 1:
        mask = mask[:, :, :, None]  # [B|1, 1, T|1, 1, S]
    else:
        mask = mask.reshape(mask.shape[0], kv, g, *mask.shape[2:]).transpose(0, 1, 3, 2, 4)
    s = jnp.where(mask, s, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    out = jnp.einsum("bktgs,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, n, h)
