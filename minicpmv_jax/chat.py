"""``ChatSampler``: the official chat() behaviour on top of a ``generate.Sampler``.

It holds a sampler (which holds the model) and the processor, as gemma's ``ChatSampler`` does;
``pipeline.MiniCPMV.chat`` / ``generate`` delegate to it.

Official behaviour reproduced here (each version's ``chat()``, read from its ``VersionSpec``):

* decoding defaults (``VersionSpec.generation_defaults``): sampling = top_p 0.8, top_k 100,
  temperature 0.7, repetition_penalty 1.05 (4.5 non-thinking: 1.03; 4.5 thinking: temperature 0.7
  only, the inner LLM's generation config supplies top_k 50, top_p 1.0); no sampling = beam
  search with num_beams 3, repetition_penalty 1.2. max_new_tokens 2.5: 1024, 2.6 / 4.5: 2048.
* post-processing (``postprocess``): drop EVERY id 0 (``result[result != 0]``), a leading bos and
  a trailing terminator, ``decode(...).strip()``; 4.5 with thinking prepends ``"<think>\\n"``.

Differences, on purpose: the official chat() silently drops generation keywords it has no default
for (e.g. ``length_penalty``, ``early_stopping``); here every supported keyword is honoured and an
unknown one raises.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from minicpmv_jax import versions
from minicpmv_jax.errors import MessageError
from minicpmv_jax.generate import TRACE_COUNTS, GenerationOutput, Sampler
from minicpmv_jax.settings import GenerationError, GenerationSettings


def postprocess(ids: np.ndarray, processor, enable_thinking: bool = False) -> str:
    """Official chat() decoding of one row of new token ids.

    Quirk: ``result[result != 0]`` drops every id 0 (a genuine generated "!" in Qwen's / Llama's
    vocabulary disappears), then a leading bos and a trailing terminator are removed.
    """
    ids = np.asarray(ids).reshape(-1)
    ids = ids[ids != 0]
    bos = getattr(processor, "bos_id", None)
    if len(ids) and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if len(ids) and int(ids[-1]) in set(processor.terminators):
        ids = ids[:-1]
    text = processor.decode(ids).strip()
    if enable_thinking:  # 4.5 chat(): the generation prefill is part of the answer
        text = versions.spec(processor.version).thinking_prefix + text
    return text


class _TextStream:
    """Incremental detokenisation in time linear in the answer: yields complete UTF-8 text.

    Each token decodes only a short window (the ids since the last emitted piece, plus the ones
    before them for context), as transformers' ``TextStreamer`` and vLLM do; a window ending in a
    replacement character (an unfinished multi-byte sequence) waits for more tokens. The rules of
    ``postprocess`` apply on the way: id 0 and a leading bos are dropped, a terminator ends the
    answer, leading whitespace is dropped and trailing whitespace held back until more text
    follows (``strip``), and the thinking prefix opens the answer. The concatenation of the
    pieces equals the blocking answer.
    """

    def __init__(self, processor, enable_thinking: bool):
        head = versions.spec(processor.version).thinking_prefix if enable_thinking else ""
        self._setup(
            lambda ids: processor.decode(np.asarray(ids, np.int64)),
            processor.terminators,
            bos=getattr(processor, "bos_id", None),
            head=head,
            dropped=(0,),  # postprocess drops every id 0 (2.x quirk)
        )

    @classmethod
    def with_rules(cls, decode, terminators, *, bos=None, head: str = "", dropped=()):
        """A stream with explicit rules (4.6: its own decode, nothing dropped but the end).

        decode: list of ids -> text; terminators end the answer; a leading ``bos`` and every id
        in ``dropped`` are skipped; ``head`` opens the answer."""
        self = cls.__new__(cls)
        self._setup(decode, terminators, bos=bos, head=head, dropped=dropped)
        return self

    def _setup(self, decode, terminators, *, bos, head: str, dropped) -> None:
        self.decode = decode
        self.terminators = {int(t) for t in terminators}
        self.bos = bos
        self.head = head
        self.dropped = {int(t) for t in dropped}
        self.ids: list[int] = []  # the answer's ids after postprocess's filtering
        self.prefix = 0  # ids[prefix:read]: context of the next window, already emitted
        self.read = 0  # ids[read:]: not emitted yet
        self.held = ""  # trailing whitespace held back
        self.started = False  # a non-whitespace character was emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.decode(self.ids[start:end])

    def _emit(self, piece: str) -> str:
        text = self.held + piece
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
            text = self.head + text
        kept = text.rstrip()
        self.held = text[len(kept) :]
        return kept

    def push(self, token: int) -> str:
        token = int(token)
        if (
            token in self.dropped
            or token in self.terminators
            or (not self.ids and token == self.bos)
        ):
            return ""  # postprocess: every id 0 (2.x), a leading bos, the final terminator
        self.ids.append(token)
        before = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix)
        if text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(text[len(before) :])

    def flush(self) -> str:
        """The rest of the answer (an unfinished multi-byte tail decodes as the blocking answer
        decodes it); held-back trailing whitespace is dropped."""
        piece = ""
        if self.read < len(self.ids):
            piece = self._decode(self.prefix)[len(self._decode(self.prefix, self.read)) :]
            self.prefix = self.read = len(self.ids)
            piece = self._emit(piece)
        if not self.started:  # an empty answer is the thinking prefix alone
            self.started = True
            return self.head
        return piece


@dataclasses.dataclass
class ChatStats:
    """Timings of the last chat() / generate() call (seconds; tokens/s of the decode loop)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compiled: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


class ChatSampler:
    """``generate`` and ``chat`` with the official chat() defaults and answer decoding.

    Args:
      sampler: the compiled programs (``generate.Sampler``), which hold the model.
      processor: the model's ``MiniCPMVProcessor`` (templates, stop tokens, detokenisation).
    """

    def __init__(self, sampler: Sampler, processor):
        self.sampler = sampler
        self.processor = processor
        self.version = versions.spec(sampler.config.version)
        self.last_stats: ChatStats | None = None

    # -- generate -----------------------------------------------------------------------------------

    def generate(
        self,
        batch,
        max_new_tokens: int | None = None,
        sampling: bool = False,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        *,
        return_dict: bool = False,
        record_logits: bool = False,
        **kwargs,
    ) -> np.ndarray | list[np.ndarray] | GenerationOutput:
        """New token ids for processed conversations (transformers ``generate`` semantics).

        Args:
          batch: one ``ProcessorOutput`` or a list of them (run as one batch).
          max_new_tokens: default per version (2.5: 1024; 2.6 / 4.5: 2048).
          sampling: multinomial sampling (``do_sample``) instead of greedy / beam search.
          num_beams, repetition_penalty, **kwargs: ``temperature``, ``top_k``, ``top_p``,
            ``min_new_tokens``, ``min_p``, ``length_penalty``, ``early_stopping``, ``seed``
            (None, the default: fresh randomness each call; an int: reproducible sampling).
          return_dict: return the full ``GenerationOutput``; record_logits: keep the raw logits
            of every greedy / sampling step in it (``step_logits`` [B, M, V]).
        Returns:
          int64 ids [n] (one conversation) or a list of them: new tokens only, the terminator
          last when one was produced.
        """
        single = not isinstance(batch, (list, tuple))
        outputs = [batch] if single else list(batch)
        if not outputs:
            raise GenerationError("generate() got an empty batch")
        defaults = {
            "do_sample": bool(sampling),
            "num_beams": num_beams,
            "repetition_penalty": repetition_penalty,
        }
        settings = GenerationSettings.create(self.version, max_new_tokens, defaults, kwargs)
        out = self.sampler.run(outputs, settings, record_logits=record_logits)
        self._record_stats(out)
        if return_dict:
            return out
        return out.sequences[0] if single else out.sequences

    def _record_stats(self, out: GenerationOutput) -> None:
        self.last_stats = ChatStats(
            prompt_tokens=sum(out.prompt_tokens),
            new_tokens=sum(len(s) for s in out.sequences),
            prefill_s=out.timings.get("prefill", 0.0),
            decode_s=out.timings.get("decode", 0.0),
            compiled=int(out.timings.get("traces", 0)),
        )

    # -- chat ---------------------------------------------------------------------------------------

    def chat(
        self,
        msgs,
        max_new_tokens: int | None = None,
        sampling: bool = True,
        stream: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        system_prompt: str | None = None,
        enable_thinking: bool = False,
        temporal_ids=None,
        **generation_kwargs,
    ) -> str | list[str] | Iterator[str]:
        """Answer a conversation as the official ``chat()`` does.

        Args:
          msgs: one conversation (list of ``{"role", "content"}`` dicts; content = str or a list
            of str / PIL images / paths) or a list of conversations, answered as one batch.
          max_new_tokens: default 1024 (2.5) / 2048 (2.6, 4.5).
          sampling: official defaults: True = top-p / top-k sampling, False = beam search
            (num_beams 3, repetition_penalty 1.2); override with ``**generation_kwargs``
            (``num_beams``, ``repetition_penalty``, ``temperature``, ``top_k``, ``top_p``,
            ``min_new_tokens``, ``min_p``, ``length_penalty``, ``early_stopping``, ``seed``;
            no seed: fresh randomness each call).
          stream: return a generator of text pieces (one conversation, no beam search).
          max_slice_nums, use_image_id, system_prompt, enable_thinking (4.5), temporal_ids (4.5
            video groups): processor settings, as in the official chat().
        Returns:
          the answer, a list of answers (batch), or an iterator of text pieces (stream).
        """
        batched = _is_batch(msgs)
        convs = list(msgs) if batched else [msgs]
        if not convs:
            raise MessageError("chat() got an empty list of conversations")
        tids = list(temporal_ids) if (batched and temporal_ids is not None) else [temporal_ids]
        if batched and temporal_ids is None:
            tids = [None] * len(convs)
        if len(tids) != len(convs):
            raise MessageError("temporal_ids must hold one entry per conversation")
        settings = GenerationSettings.for_chat(
            self.version, max_new_tokens, sampling, enable_thinking, generation_kwargs
        )
        outputs = [
            self.processor(
                conv,
                max_slice_nums=max_slice_nums,
                use_image_id=use_image_id,
                enable_thinking=enable_thinking,
                system_prompt=system_prompt,
                temporal_ids=t,
            )
            for conv, t in zip(convs, tids, strict=True)
        ]
        if stream:
            if batched:
                raise GenerationError("stream=True answers one conversation at a time")
            if settings.num_beams > 1:
                raise GenerationError(
                    "stream=True needs num_beams=1 (beam search only knows its answer at the "
                    "end); pass sampling=True or num_beams=1"
                )
            return self._stream(outputs[0], settings, enable_thinking)
        prepared = self.sampler.prepare(outputs)
        # the processor outputs are not needed past here: dropping them before the programs run
        # keeps one copy of the pixels (the prepared batch's) alive, not two (GBs for a video)
        del outputs
        out = self.sampler.run_prepared(prepared, settings)
        self._record_stats(out)
        answers = [postprocess(s, self.processor, enable_thinking) for s in out.sequences]
        return answers if batched else answers[0]

    def _stream(self, output, settings: GenerationSettings, enable_thinking: bool) -> Iterator[str]:
        text = _TextStream(self.processor, enable_thinking)
        stats = ChatStats(prompt_tokens=int(np.asarray(output["input_ids"]).shape[-1]))
        t0 = time.perf_counter()
        traces = sum(TRACE_COUNTS.values())
        first = None
        for tok in self.sampler.stream([output], settings):
            if first is None:
                first = time.perf_counter()
                stats.prefill_s = first - t0
            token = int(tok[0])
            stats.new_tokens += 1
            piece = text.push(token)
            if piece:
                yield piece
            if token in text.terminators:
                break
        stats.decode_s = time.perf_counter() - (first or t0)
        stats.compiled = sum(TRACE_COUNTS.values()) - traces
        self.last_stats = stats
        tail = text.flush()
        if tail:
            yield tail


def _is_batch(msgs: Any) -> bool:
    """A list of conversations (each a list of messages) rather than one conversation."""
    return (
        isinstance(msgs, Sequence)
        and not isinstance(msgs, (str, bytes))
        and len(msgs) > 0
        and all(isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in msgs)
    )
