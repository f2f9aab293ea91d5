"""From one model's vocab-parallel logits to the log-probabilities tokens are drawn from.

Order as in Hugging Face ``generate``: bans (no-repeat n-gram, min new tokens) first, then the
warpers (temperature, top-k, top-p), which greedy decoding skips. Teacher mixing happens in
probability space after both models are processed (LMOps), and a token is drawn by Gumbel-max with
counter-based noise, so the draw never needs the full vocabulary on one rank.
"""

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_minillm.parallel.vocab import local_columns, log_softmax, mask_padded_vocab, vocab_slice
from megatron_minillm.sampling import vocab_parallel as vp
from megatron_minillm.sampling.noise import DRAW, gumbel
from megatron_minillm.sampling.params import SamplingParams


class NoRepeatNGram:
    """Tokens that would repeat an n-gram of the sequence so far (prompt included), per sample.

    The same rule as HF's NoRepeatNGramLogitsProcessor, kept incrementally: a table from each seen
    (n-1)-gram to the tokens that followed it, extended by one n-gram per step.
    """

    def __init__(self, n: int, prompts: Sequence[Sequence[int]]) -> None:
        self.n = n
        self.sequences = [list(p) for p in prompts]
        self.tables: list[dict[tuple[int, ...], set[int]]] = [defaultdict(set) for _ in prompts]
        for seq, table in zip(self.sequences, self.tables):
            for end in range(n, len(seq) + 1):
                table[tuple(seq[end - n : end - 1])].add(seq[end - 1])

    def append(self, tokens: Sequence[int]) -> None:
        """One more token per sample."""
        self.extend([[token] for token in tokens])

    def extend(self, tokens: Sequence[Sequence[int]]) -> None:
        """Any number of tokens per sample (``tokens[i]`` for sample i)."""
        for seq, table, new in zip(self.sequences, self.tables, tokens):
            for token in new:
                seq.append(int(token))
                if len(seq) >= self.n:
                    table[tuple(seq[len(seq) - self.n : -1])].add(seq[-1])

    def banned(self) -> list[list[int]]:
        return self.banned_after([])

    def banned_after(self, drafts: Sequence[Sequence[int]]) -> list[list[int]]:
        """:meth:`banned` as if each sequence went on with ``drafts`` (``drafts[j][i]``: the j-th
        draft of sample i), without adding them: the n-grams they form are checked on the side."""
        prefix, out = self.n - 1, []
        for i, (seq, table) in enumerate(zip(self.sequences, self.tables)):
            full = seq + [int(d[i]) for d in drafts]
            if len(full) < prefix:
                out.append([])
                continue
            key = tuple(full[len(full) - prefix :]) if prefix else ()
            found = set(table.get(key, ()))
            for end in range(max(len(seq) + 1, self.n), len(full) + 1):  # n-grams ending in a draft
                if tuple(full[end - self.n : end - 1]) == key:
                    found.add(full[end - 1])
            out.append(sorted(found))
        return out


def ban(logits: Tensor, banned: Sequence[Sequence[int]], tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """-inf at the banned ids of each row that fall in this rank's vocabulary slice."""
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    if not rows:
        return logits
    banned_ids = torch.tensor([t for ids in banned for t in ids], dtype=torch.long, device=logits.device)
    cols, mine = local_columns(banned_ids, logits.shape[-1], tp_group)
    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits = logits.clone()
    logits[rows_t[mine], cols[mine]] = vp.NEG_INF
    return logits


def processed_log_probs(
    logits: Tensor,
    params: SamplingParams,
    vocab_size: int,
    banned: Sequence[Sequence[int]],
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Log-probabilities [b, V/TP] (float32) of the distribution one model samples from; ``tp_group``
    splits the vocabulary (None: megatron's global TP group)."""
    z = ban(mask_padded_vocab(logits.float(), vocab_size, tp_group), banned, tp_group)
    if not params.greedy:
        if params.temperature != 1.0:
            z = z / params.temperature
        if params.top_k:
            z = vp.top_k_mask(z, params.top_k, tp_group)
        if params.top_p < 1.0:
            z = vp.top_p_mask(z, params.top_p, tp_group=tp_group)
    return log_softmax(z, tp_group)


def mix(log_q: Tensor, log_p: Tensor | None, alpha: float) -> Tensor:
    """log p~ of the teacher-mixed distribution p~ = alpha * p + (1 - alpha) * q (exact at 0 and 1)."""
    if log_p is None or alpha == 0.0:
        return log_q
    if alpha == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


def draw(
    log_probs: Tensor,
    seeds: Tensor,
    step: int | Tensor,
    greedy: bool,
    tp_group: dist.ProcessGroup | None = None,
    stream: int = DRAW,
) -> Tensor:
    """Token ids [b]: the argmax (greedy) or a Gumbel-max sample keyed by (seed, step, token id) on
    noise ``stream``; ``step`` is one int or one per row [b]. Unnormalised log-probabilities do."""
    if greedy:
        return vp.argmax(log_probs, tp_group)
    start, _ = vocab_slice(log_probs.shape[-1], tp_group=tp_group)
    ids = torch.arange(start, start + log_probs.shape[-1], device=log_probs.device)
    return vp.argmax(gumbel(seeds, step, ids, stream).add_(log_probs), tp_group)
