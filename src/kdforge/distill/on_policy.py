"""On-policy distillation (GKD, Agarwal et al., ICLR 2024): some steps train on the student's own answers.

With probability λ (``on_policy``, a schedule over training) an optimizer step replaces the teacher's
answers of its micro-batches by answers the student samples to the same prompts, now; the teacher then
scores exactly those tokens and the divergence is taken at them. λ = 0 is sequence-level KD on the
teacher's answers (the off-policy path, untouched: no sampling, no random draw from the global RNG).

Why: off-policy the student only ever sees the teacher's prefixes; at inference it conditions on its own,
and its mistakes compound (exposure bias). Scoring the student's own samples teaches it to recover from
the states it actually reaches. On those batches the objective is the divergence alone (alpha = 0):
cross-entropy on the student's own samples would only reinforce whatever it sampled.

Whether step s is on-policy is drawn from its own seeded RNG (seed, s), and every answer is sampled with
its own generator seeded from (seed, step, example): a rerun, a resumed run or another number of processes
(which trains the same micro-batches) samples the same tokens. Answers decoded in other groupings can differ
by the float noise of batched logits (left padding), as any batched sampler's do. Sampling goes through the
runtime interface (`kdforge.runtime.transformers.TransformersRuntime.generate`: batched, KV-cached, kdforge's
one sampler).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

from kdforge.data.chat import IGNORE_INDEX, EncodedConversation, encode_prompt
from kdforge.data.formats import Conversation
from kdforge.runtime.sampling import SamplingParams, make_generator


@dataclass(frozen=True)
class Rollout:
    """How the student samples its answers (TRL GKDConfig's temperature / max_new_tokens; top-p as vLLM)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16  # prompts decoded together (a micro-batch is usually smaller)


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` trains on the student's samples: a draw from (seed, step) alone."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return random.Random(f"on-policy/{seed}/{step}").random() < fraction


def sample_seed(seed: int, step: int, example: int) -> int:
    """The seed of one answer's generator: from the run's seed, the step and the example alone."""
    digest = hashlib.blake2b(f"{seed}/{step}/{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Samples:
    """A micro-batch's worth of student answers, encoded for training."""

    encoded: list[EncodedConversation]   # prompt + answer (+ end of turn); labels on the answer
    conversations: list[Conversation]    # the same as text (a teacher with another tokenizer re-encodes it)
    tokens: int                          # generated tokens (end-of-turn tokens included)
    seconds: float                       # generation wall time


class StudentSampler:
    """Samples the student's answers to training prompts through the runtime interface."""

    def __init__(self, model, tokenizer, rollout: Rollout, max_length: int, seed: int, stop_ids: list[int]):
        from kdforge.runtime.transformers import TransformersRuntime

        self.runtime = TransformersRuntime(model, tokenizer)
        self.tokenizer, self.rollout, self.max_length, self.seed = tokenizer, rollout, max_length, seed
        self.stop_ids = list(stop_ids)
        self._prompts: dict[int, list[int]] = {}

    def prompt_ids(self, index: int, conv: Conversation) -> list[int]:
        """The chat-template prompt of training example ``index`` (encoded once)."""
        if index not in self._prompts:
            self._prompts[index] = encode_prompt(self.tokenizer, conv.prompt_messages)
        return self._prompts[index]

    def sample(self, indices: list[int], convs: list[Conversation], step: int) -> Samples:
        """The student's answers to examples ``indices`` (``convs`` the conversations they are) at ``step``.

        The model is put in eval mode for sampling (no dropout) and given back in the mode it was in."""
        t0 = time.perf_counter()
        r = self.rollout
        prompts = [self.prompt_ids(i, c) for i, c in zip(indices, convs)]
        params = SamplingParams(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
        gens = [make_generator(sample_seed(self.seed, step, i)) for i in indices]
        model = self.runtime.model
        was_training = model.training
        model.eval()
        try:
            answers = self.runtime.generate(prompts, params, self.stop_ids, generators=gens,
                                            batch_size=r.batch_size, keep_stop=True)
        finally:
            model.train(was_training)
        encoded, texts, tokens = [], [], 0
        for prompt, answer, conv in zip(prompts, answers, convs):
            ids = (prompt + answer)[: self.max_length]
            labels = [IGNORE_INDEX] * len(prompt) + answer
            encoded.append(EncodedConversation(ids, labels[: self.max_length]))
            tokens += len(answer)
            text = self.tokenizer.decode([t for t in answer if t not in self.stop_ids], skip_special_tokens=True)
            texts.append(Conversation(conv.id, conv.prompt_messages + [{"role": "assistant", "content": text}],
                                      conv.category, conv.split))
        return Samples(encoded, texts, tokens, time.perf_counter() - t0)


def has_targets(samples: Samples) -> bool:
    """False when no sampled answer kept a token to train on (e.g. every prompt filled max_length)."""
    return any(e.num_targets > 0 for e in samples.encoded)

