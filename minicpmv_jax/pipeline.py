"""``MiniCPMV``: a loaded checkpoint, its processor and the samplers that run it.

The user-facing object of the README example. It owns loading (``from_pretrained``,
``from_config``) and composes, instead of inheriting, what runs the network:

    MiniCPMV --holds--> ChatSampler (chat.py) --holds--> Sampler (generate.py) --runs--> module

so imports go one way: pipeline -> chat -> generate -> model. ``generate``, ``chat``,
``prompt_logits``, ``warmup`` ... delegate to the samplers, built on first use and rebuilt by
``configure_generation``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax import model as network
from minicpmv_jax import quant as quantization
from minicpmv_jax.batching import Buckets
from minicpmv_jax.chat import ChatSampler, ChatStats
from minicpmv_jax.config import PROJECTIONS, MiniCPMVConfig
from minicpmv_jax.errors import CheckpointError, MiniCPMVError
from minicpmv_jax.generate import GenerationOutput, RequestShape, Sampler
from minicpmv_jax.kernels import IMPLS
from minicpmv_jax.settings import GenerationError
from minicpmv_jax.sharding import make_mesh


class MiniCPMV:
    """A loaded model: config, nnx module, processor and mesh, plus its samplers."""

    def __init__(
        self,
        config: MiniCPMVConfig,
        module: network.MiniCPMVModule,
        processor: Any = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = config
        self.module = module
        self.processor = processor
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(module)
        self.adapter = None  # a PEFT LoRA adapter merged into the weights (train.lora.Adapter)
        self._chat: ChatSampler | None = None
        self._sampler: Sampler | None = None

    # ------------------------------------------------------------------ construction
    abstract_module = staticmethod(network.abstract_module)

    @classmethod
    def from_config(
        cls, config: MiniCPMVConfig, *, seed: int = 0, mesh=None, processor=None, quant=None
    ) -> MiniCPMV:
        """Randomly initialised model (tests, benchmarks); `quant` as in from_pretrained."""
        mesh = mesh if mesh is not None else make_mesh()
        module = network.init_module(config, seed=seed, mesh=mesh, quant=quant)
        return cls(config, module, processor, mesh=mesh)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype: Any = "float32",
        mesh: jax.sharding.Mesh | None = None,
        *,
        progress: bool = True,
        load_processor: bool = True,
        quant: str | quantization.QuantConfig | None = None,
        adapter: str | os.PathLike | None = None,
        attn_impl: str = "xla",
        out_in: tuple[str, ...] | None = None,
    ) -> MiniCPMV:
        """Load an official checkpoint folder (or hub id): config.json + safetensors (+ processor).

        Args:
          path_or_hub_id: local folder or "org/name" (downloaded with huggingface_hub).
          dtype: compute and parameter dtype ("float32", "bfloat16", ...); stored tensors of any
            dtype (bf16, fp16, fp32) are converted one at a time.
          mesh: ("data", "fsdp", "tensor") mesh; default: one device.
          quant: "int8" stores the LLM's dense layers (and lm_head) as int8 with per-channel
            scales, quantized on the host while loading; "int8+vision" also the vision tower
            (see quant.py). An orbax folder written quantized loads quantized by itself.
          adapter: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors),
            merged into the weights as PEFT's merge_and_unload does; `model.adapter` keeps it for
            further training (minicpmv_jax.train).
          attn_impl: the LLM's attention kernel (`kernels.IMPLS`): "xla" (any backend), "cudnn"
            (GPU flash attention, bf16 / fp16), "splash" (TPU Pallas prefill kernel, under
            `shard_map` on a mesh) or "reference" (plain jnp).
          out_in: the LLM decoder projections to store in torch's layout [out, in]
            (`LlmConfig.out_in`, names from `config.PROJECTIONS`). None (default): gate, up and
            down for a bf16 model on CPU devices (faster batch-1 decode there), none otherwise
            (`model.decoder_layout`); () keeps [in, out] everywhere. Not for MiniCPM-V 4.6.
        """
        if attn_impl not in IMPLS:
            raise MiniCPMVError(f"attn_impl {attn_impl!r} is not one of {IMPLS}")
        if out_in is not None and (
            isinstance(out_in, str) or any(p not in PROJECTIONS for p in out_in)
        ):
            raise MiniCPMVError(f"out_in {out_in!r}: expected a tuple of names from {PROJECTIONS}")
        folder = network.resolve_checkpoint(path_or_hub_id)
        hf = network.read_hf_config(folder)
        if hf.get("model_type") == "minicpmv4_6":  # native-transformers 4.6: minicpmv_jax/v46
            from minicpmv_jax.v46.model import MiniCPMV46

            if attn_impl != "xla":
                raise CheckpointError("attn_impl is not supported for MiniCPM-V 4.6 yet")
            if out_in is not None:
                raise CheckpointError("out_in is not supported for MiniCPM-V 4.6")
            return MiniCPMV46.from_pretrained(
                folder,
                jnp.dtype(dtype),
                mesh,
                progress=progress,
                load_processor=load_processor,
                quant=quant,
                hf=hf,
            )
        mesh = mesh if mesh is not None else make_mesh()
        with concurrent.futures.ThreadPoolExecutor(1) as side:
            # The tokenizer and processor load on a side thread while the weights copy: the
            # copies release the GIL, so the two overlap (about 0.4 s of a 1.05 B model's load).
            processor_job = side.submit(_load_processor, folder) if load_processor else None
            config, module = network.load_module(
                folder, dtype, mesh, progress=progress, quant=quant, attn_impl=attn_impl,
                out_in=out_in,
            )  # fmt: skip
            processor = processor_job.result() if processor_job else None
        model = cls(config, module, processor, mesh=mesh)
        if adapter is not None:
            from minicpmv_jax.train.lora import load_adapter  # lazy: training code

            model = load_adapter(model, adapter)
        return model

    # ------------------------------------------------------------------ samplers
    def configure_generation(
        self, buckets: Buckets | None = None, cache_dtype=None, cache_pool: int = 4
    ) -> Sampler:
        """(Re)build the compiled programs with these buckets / KV cache dtype / number of
        pooled KV cache buffers (``generate.CachePool``); returns the new ``Sampler``."""
        self._sampler = Sampler(
            self, buckets=buckets, cache_dtype=cache_dtype, cache_pool=cache_pool
        )
        self._chat = None
        return self._sampler

    @property
    def sampler(self) -> Sampler:
        """The compiled prompt / prefill / decode programs (built on first use)."""
        if self._sampler is None:
            self.configure_generation()
        return self._sampler

    @property
    def chat_sampler(self) -> ChatSampler:
        if self.processor is None:
            raise GenerationError(
                "this model was loaded without a processor; chat() and generate() need one"
            )
        if self._chat is None or self._chat.sampler is not self.sampler:
            self._chat = ChatSampler(self.sampler, self.processor)
        return self._chat

    @property
    def last_stats(self) -> ChatStats | None:
        """Timings of the last chat() / generate() call."""
        return None if self._chat is None else self._chat.last_stats

    def _precision(self):
        """The context the programs run under (mesh, float32 matmul precision)."""
        return self.sampler.context()

    # ------------------------------------------------------------------ stage functions
    def prompt_logits(self, batch, return_intermediates: bool = False):
        """float32 [T, V]: logits at every prompt position (the prefill, without a cache).

        RoPE positions and attention mask as the generation path: keys where `attention_mask`
        is False (2.6/4.5 quirk: input_ids == 0) are not attended; 2.5 attends everything.
        With return_intermediates=True returns (logits, {"vision", "resampler", "embeds"}) so
        that a parity failure can name its stage.
        """
        return self.sampler.prompt_logits(batch, return_intermediates)

    def vision_features(self, batch) -> np.ndarray:
        """float32 [I, P, Dv]: vision tower last_hidden_state (incl. post layernorm)."""
        return self.sampler.encode(batch)[0]

    def resample(self, batch) -> np.ndarray:
        """float32 [G, Q, D]: resampler output, one row-group per image_bound row."""
        return self.sampler.encode(batch)[1]

    def input_embeds(self, batch) -> np.ndarray:
        """float32 [T, D]: token embeddings with resampler rows scattered at image_bound."""
        return self.sampler.prompt_logits(batch, return_intermediates=True)[1]["embeds"]

    # ------------------------------------------------------------------ generation
    @functools.wraps(ChatSampler.generate)  # same signature and documentation
    def generate(self, *args, **kwargs) -> np.ndarray | list[np.ndarray] | GenerationOutput:
        return self.chat_sampler.generate(*args, **kwargs)

    @functools.wraps(ChatSampler.chat)
    def chat(self, *args, **kwargs) -> str | list[str] | Iterator[str]:
        return self.chat_sampler.chat(*args, **kwargs)

    def warmup(self, shapes: Sequence[RequestShape]) -> dict[str, Any]:
        """Compile now the programs requests of these shapes will run (``RequestShape``).

        A server calls this at start-up so that no request waits for a compilation::

            model.warmup([RequestShape(prompt_tokens=800, slices=10, max_new_tokens=512),
                          RequestShape(prompt_tokens=100, slices=1, max_new_tokens=512),
                          RequestShape(prompt_tokens=64, max_new_tokens=512)])
        """
        return self.sampler.warmup(shapes)

    def memory_report(
        self, batch: int = 1, prompt_len: int = 1024, max_new_tokens: int = 256, **kwargs
    ) -> dict[str, Any]:
        """KV cache bytes and compiled prefill / decode memory for a request shape."""
        return self.sampler.memory_report(batch, prompt_len, max_new_tokens, **kwargs)


def _load_processor(folder):
    from minicpmv_jax.processor import MiniCPMVProcessor  # lazy: numpy/tokenizer side

    return MiniCPMVProcessor.from_pretrained(folder)
