"""Released presets build under nnx.eval_shape (no memory) with the released parameter counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpmv_jax.config import (
    MINICPM_LLAMA3_V_2_5,
    MINICPM_V_2_6,
    MINICPM_V_4_5,
    MiniCPMVConfig,
)
from minicpmv_jax.model import MiniCPMV

# Expected counts from the spec's tensor table (§10.1, §10.2, §10.4):
#   vision (all three): patch 1152*588 + 1152, position 4900*1152, post LN 2*1152, and per layer
#     q/k/v/out 4*(1152*1152 + 1152) + 2 LNs 4*1152 + fc1 4304*1152 + 4304 + fc2 1152*4304 + 1152,
#     x 27 layers                                                            = 417,792,240
#   resampler: query Q*D + kv_proj D*1152 + in_proj 3D*D + 3D + out_proj D*D + D + 3 LNs 6D
#     + proj D*D          2.5 (Q 96, D 4096) = 89,038,848; 2.6 (64, 3584) = 68,619,264;
#                         4.5 (64, 4096) = 88,907,776
#   LLM: embed + lm_head 2*V*D + final norm D + per layer q D*N*H + k,v 2*D*K*H + o N*H*D
#     + MLP 3*D*F + 2 norms 2D (+ 2.6 biases N*H + 2*K*H; + 4.5 q/k norms 2H)
#     2.5: V 128256, D 4096, L 32, N 32, K 8, H 128, F 14336               = 8,030,261,248
#     2.6: V 151666, D 3584, L 28, N 28, K 4, H 128, F 18944 (+ bias)      = 7,612,763,648
#     4.5: V 151748, D 4096, L 36, N 32, K 8, H 128, F 12288 (+ qk norm)   = 8,189,195,264
EXPECTED = {
    "2.5": 417_792_240 + 89_038_848 + 8_030_261_248,  # 8,537,092,336 ("8.5B")
    "2.6": 417_792_240 + 68_619_264 + 7_612_763_648,  # 8,099,175,152 ("8.1B")
    "4.5": 417_792_240 + 88_907_776 + 8_189_195_264,  # 8,695,895,280 ("8.7B")
}
PRESETS = {"2.5": MINICPM_LLAMA3_V_2_5, "2.6": MINICPM_V_2_6, "4.5": MINICPM_V_4_5}


@pytest.mark.parametrize("version", sorted(PRESETS))
def test_preset_param_count(version):
    cfg: MiniCPMVConfig = PRESETS[version]
    _, abstract = MiniCPMV.abstract_module(cfg)  # ShapeDtypeStructs only
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(math.prod(x.shape) for x in leaves)
    assert n == EXPECTED[version], f"{version}: {n:,} params != {EXPECTED[version]:,}"
    assert {x.dtype for x in leaves} == {np.dtype(jnp.bfloat16)}


def test_preset_shapes_and_partitioning():
    _, abstract = MiniCPMV.abstract_module(MINICPM_V_4_5)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    # layer stacks: one parameter per layer tensor, the 36 decoder / 26 vision layers leading
    q = flat["llm.model.layers.self_attn.q_proj.kernel"]
    assert q.get_value().shape == (36, 4096, 32 * 128)
    assert q.out_sharding == ("layers", "embed", "q_heads")
    assert flat["llm.model.layers.self_attn.q_norm.scale"].get_value().shape == (36, 128)
    fc1 = flat["vpm.encoder.layers.mlp.fc1.kernel"]
    assert fc1.get_value().shape == (27, 1152, 4304)
    assert fc1.out_sharding == ("layers", "vis_embed", "vis_mlp")
    assert flat["vpm.embeddings.position_embedding.embedding"].get_value().shape == (4900, 1152)
    assert flat["resampler.query"].get_value().shape == (64, 4096)
    assert not any(".layers.0." in k for k in flat)


def test_with_dtype():
    cfg = MINICPM_V_2_6.with_dtype("float32")
    assert cfg.llm.dtype == jnp.float32 and cfg.vision.param_dtype == jnp.float32
    assert cfg.llm.qkv_bias and not cfg.llm.qk_norm
