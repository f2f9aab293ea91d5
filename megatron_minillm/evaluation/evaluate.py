"""Evaluate checkpoints as the MiniLLM paper does: sampled responses over several seeds, Rouge-L,
per-token KL to the teacher, exposure bias (ExAccErr), calibration and response lengths.

Works at any TP x PP x DP. Generation goes through :func:`sampling.generate_all` (prompts split over
the DP ranks); teacher-forced scoring runs one micro-batch at a time through the pipeline schedule
on vocab-parallel logits (only per-token values cross TP ranks) and gathers the per-token values
from the last stage. Every rank ends with the same numbers. The formulas are in :mod:`.metrics`;
docs/evaluation.md describes each metric and the outputs.
"""

import dataclasses
import gc
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_minillm.checkpoint.dist_checkpoint import load_model, read_metadata
from megatron_minillm.data.micro_batch import MicroBatch, pack
from megatron_minillm.data.preprocess import tokenize_pair
from megatron_minillm.data.prompts import Prompt, load_prompts
from megatron_minillm.data.tokenizer import Tokenizer, check_tokenizers_compatible, load_tokenizer
from megatron_minillm.evaluation.metrics import (
    ExposureBias,
    corpus_rouge_l,
    expected_calibration_error,
    exposure_bias,
    length_stats,
)
from megatron_minillm.evaluation.report import ModelResults, write_report
from megatron_minillm.losses import forward_kl, reverse_kl
from megatron_minillm.models import Architecture, load_architecture
from megatron_minillm.parallel.vocab import gather_ids, log_softmax, mask_padded_vocab
from megatron_minillm.platform import device
from megatron_minillm.sampling import SamplingParams, generate_all
from megatron_minillm.sampling.vocab_parallel import argmax
from megatron_minillm.training.schedule import forward_outputs

logger = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Inputs an evaluation cannot run on (no references, no prompt fits, mismatched models)."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; the defaults are the paper's (LMOps ``evaluate.sh``): temperature 1,
    top-k and top-p off, no-repeat-ngram 6, 256 new tokens, prompts of at most 256 tokens, 5 seeds."""

    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    max_prompt_length: int = 256  # longer prompts are dropped (and counted), as LMOps drops them
    batch_size: int = 8  # sequences per generate call and per scoring micro-batch, per DP rank
    exposure_bias_length: int | None = None  # steps of the ExAccErr curve; None: max_new_tokens
    ece_bins: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvaluationError(f"seeds must be one or more distinct integers, got {self.seeds}")
        for name in ("max_prompt_length", "batch_size", "ece_bins"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exposure_bias_length is not None and not 1 <= self.exposure_bias_length <= self.max_new_tokens:
            raise EvaluationError(
                f"exposure_bias_length must be in [1, max_new_tokens={self.max_new_tokens}], "
                f"got {self.exposure_bias_length}"
            )
        try:  # the sampling settings fail here, with SamplingParams' own messages
            self.sampling_params(())
        except ValueError as err:
            raise EvaluationError(str(err)) from None

    def sampling_params(self, stop_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            stop_ids=tuple(stop_ids),
        )


@dataclass
class EvalModel:
    """This rank's shard of a model and the architecture it was built from."""

    model: torch.nn.Module
    arch: Architecture


@dataclass(frozen=True)
class EvalSet:
    prompts: list[Prompt]  # those that fit, in file order
    references: list[list[int]]  # reference response ids with EOS appended, as the training data has them
    dropped: int  # prompts longer than max_prompt_length
    max_prompt_length: int


def prompt_limit(archs: Sequence[Architecture], cfg: EvalConfig) -> int:
    """The longest prompt kept: LMOps drops prompts over 256 tokens so that 256 new tokens fit the
    512-token context; here the same rule holds for every model's context."""
    context = min(a.max_position_embeddings for a in archs)
    limit = min(cfg.max_prompt_length, context - cfg.max_new_tokens)
    if limit < 1:
        raise EvaluationError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in a context of {context} positions"
        )
    return limit


def load_eval_set(
    path: str | Path, tokenizer: Tokenizer, max_prompt_length: int, fmt: str = "auto", template: str = "alpaca"
) -> EvalSet:
    """Prompts and reference responses of an instruction file; longer prompts than
    ``max_prompt_length`` tokens are dropped and counted."""
    prompts = load_prompts(path, tokenizer, fmt, template)
    missing = next((p for p in prompts if p.reference is None), None)
    if missing is not None:
        raise EvaluationError(
            f"{missing.source}: no reference response; evaluation needs instruction data with responses"
        )
    kept = [p for p in prompts if len(p.ids) <= max_prompt_length]
    if not kept:
        raise EvaluationError(f"{path}: all {len(prompts)} prompts are longer than {max_prompt_length} tokens")
    references = [tokenize_pair(tokenizer, p.text, p.reference)[1] + [tokenizer.eos_id] for p in kept]
    return EvalSet(kept, references, len(prompts) - len(kept), max_prompt_length)


@dataclass
class Responses:
    """One model's sampled responses, indexed [seed][prompt]."""

    seeds: tuple[int, ...]
    tokens: list[list[list[int]]]  # generated ids, the stop token included when generation ended with it
    texts: list[list[str]]  # what Rouge-L scores: decoded, cut at the stop token, stripped


def response_text(tokenizer: Tokenizer, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """As LMOps scores a response: decoded without special tokens, cut at the end of text, stripped."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def generate_responses(
    model: EvalModel, eval_set: EvalSet, tokenizer: Tokenizer, cfg: EvalConfig, progress: bool = False
) -> Responses:
    """Sample one response per prompt and seed (collective; a sample depends only on its seed and prompt)."""
    params = cfg.sampling_params((tokenizer.eos_id,))
    tokens = []
    for seed in cfg.seeds:
        samples = generate_all(
            model.model,
            [p.ids for p in eval_set.prompts],
            params,
            seed,
            vocab_size=model.arch.vocab_size,
            batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_id,
            progress=progress,
        )
        tokens.append([s.tokens for s in samples])
    texts = [[response_text(tokenizer, t, params.stop_ids) for t in per_seed] for per_seed in tokens]
    return Responses(cfg.seeds, tokens, texts)


# (vocab-parallel logits [1, n, V/TP] at the n positions where batch.loss_mask is 1, in row-major
# order (the batch's logit_positions), the teacher's or None, micro-batch) -> name -> values [n]
TokenStats = Callable[[Tensor, Tensor | None, MicroBatch], dict[str, Tensor]]


def _micro_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> MicroBatch:
    """Right-padded prompt + response; the loss mask marks the positions that predict response tokens
    (the only positions whose logits the models compute)."""
    width = max(len(p) + len(r) for p, r in pairs)
    [batch] = pack(
        [torch.tensor(p, dtype=torch.long, device=device()) for p, _ in pairs],
        [torch.tensor(r, dtype=torch.long, device=device()) for _, r in pairs],
        kind="eval",
        micro_batch_size=len(pairs),
        seq_length=width - 1,
        pad_id=0,
        device=device(),
    )
    return batch


def _last_stage(model: torch.nn.Module, batch: MicroBatch, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` of the logits of one micro-batch, on the last pipeline stage (None elsewhere)."""
    model.eval()
    outputs = forward_outputs(model, [batch], lambda _, logits: fn(logits))
    return outputs[0] if outputs else None


def token_stats(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    stats: TokenStats,
    batch_size: int,
    teacher: torch.nn.Module | None = None,
) -> list[dict[str, list[float]]]:
    """Teacher-forced per-token statistics of (prompt, response) pairs, one dict per pair with one
    value per response token, on every rank (collective).

    Pairs are split over the DP ranks and batched by length. With a teacher, its logits for a
    micro-batch are kept on the last stage and handed to ``stats`` with the model's: one micro-batch
    per schedule call bounds that memory to [b, s, V/TP].
    """
    dp_group = parallel_state.get_data_parallel_group()
    dp, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    mine = sorted(range(dp_rank, len(pairs), dp), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    local: dict[int, dict[str, list[float]]] = {}
    for start in range(0, len(mine), batch_size):
        ids = mine[start : start + batch_size]
        batch = _micro_batch([pairs[i] for i in ids])
        kept = None if teacher is None else _last_stage(teacher, batch, lambda z: z)
        values = _last_stage(model, batch, lambda z: stats(z, kept, batch))
        if values is None:
            continue
        counts = batch.loss_mask.sum(1).long().tolist()  # host-side: row lengths, to split with
        split = {name: v.double().split(counts) for name, v in values.items()}
        local.update({i: {name: parts[row].tolist() for name, parts in split.items()} for row, i in enumerate(ids)})
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)  # only last-stage ranks hold values
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(pairs))]


def _divergences(vocab_size: int) -> TokenStats:
    def stats(logits: Tensor, teacher_logits: Tensor | None, _: MicroBatch) -> dict[str, Tensor]:
        kl = {"reverse_kl": reverse_kl, "forward_kl": forward_kl}
        return {name: f(logits, teacher_logits, vocab_size=vocab_size, reduction="none")[0] for name, f in kl.items()}

    return stats


def _confidence(vocab_size: int) -> TokenStats:
    """Max next-token probability and whether its argmax is the target, vocab-parallel."""

    def stats(logits: Tensor, _: Tensor | None, batch: MicroBatch) -> dict[str, Tensor]:
        rows = mask_padded_vocab(logits, vocab_size)[0].float()
        predicted = argmax(rows)
        confidence = gather_ids(log_softmax(rows), predicted).exp()
        labels = batch.pick(batch.labels)[0]
        return {"confidence": confidence, "correct": (predicted == labels).float()}

    return stats


def reference_ece(model: EvalModel, eval_set: EvalSet, cfg: EvalConfig) -> float:
    """ECE of next-token predictions on the reference responses (teacher-forced); a reference that
    does not fit the context after its prompt is cut."""
    context = model.arch.max_position_embeddings
    pairs = [(p.ids, r[: context - len(p.ids)]) for p, r in zip(eval_set.prompts, eval_set.references)]
    stats = token_stats(model.model, pairs, _confidence(model.arch.vocab_size), cfg.batch_size)
    # host: metrics, from the per-token lists that token_stats gathered
    confidence = torch.tensor([c for s in stats for c in s["confidence"]], device="cpu")  # host
    correct = torch.tensor([c for s in stats for c in s["correct"]], device="cpu")  # host
    return expected_calibration_error(confidence, correct, n_bins=cfg.ece_bins)


def _token_mean(stats: list[dict[str, list[float]]], name: str) -> float:
    values = [v for s in stats for v in s[name]]
    return sum(values) / len(values)


def _per_step(stats_per_seed: list[list[dict[str, list[float]]]], length: int) -> tuple[Tensor, Tensor]:
    """KL(p || q) per generation step [prompts, seeds, length] and its 0/1 mask."""
    shape = (len(stats_per_seed[0]), len(stats_per_seed), length)
    # host: metrics, from the per-token lists that token_stats gathered
    error = torch.zeros(shape, dtype=torch.float64, device="cpu")  # host
    mask = torch.zeros(shape, dtype=torch.float64, device="cpu")  # host
    for s, per_prompt in enumerate(stats_per_seed):
        for i, st in enumerate(per_prompt):
            steps = st["forward_kl"][:length]
            error[i, s, : len(steps)] = torch.tensor(steps, dtype=torch.float64, device="cpu")  # host
            mask[i, s, : len(steps)] = 1.0
    return error, mask


@dataclass
class Evaluation:
    results: ModelResults
    responses: Responses


def evaluate_model(
    name: str,
    model: EvalModel,
    responses: Responses,
    eval_set: EvalSet,
    cfg: EvalConfig,
    teacher: tuple[EvalModel, Responses] | None = None,
) -> Evaluation:
    """Every metric of one model from its ``responses`` (collective).

    Always: Rouge-L against the references per seed, ECE on the references, response lengths.
    With ``teacher`` (the teacher and its responses for the same seeds): Rouge-L against the
    teacher's responses, per-token KL(q || p) and KL(p || q) on the model's own samples (``@student``)
    and on the teacher's (``@teacher``), and ExAccErr from the per-step KL(p || q) on both (the
    curve, and ``exacc_err``: its value at the last length, one number over all seeds).
    """
    refs = [p.reference for p in eval_set.prompts]
    metrics = {"rougeL": [corpus_rouge_l(texts, refs) for texts in responses.texts]}
    exposure: ExposureBias | None = None
    if teacher is not None:
        teacher_model, teacher_responses = teacher
        if teacher_responses.seeds != responses.seeds:
            raise EvaluationError(
                f"the teacher's responses have seeds {teacher_responses.seeds}, the model's {responses.seeds}"
            )
        if teacher_model.arch.vocab_size != model.arch.vocab_size:
            raise EvaluationError(
                f"{name} and the teacher have different vocabularies in config.json "
                f"({model.arch.vocab_size} vs {teacher_model.arch.vocab_size} tokens)"
            )
        metrics["rougeL_vs_teacher"] = [corpus_rouge_l(s, t) for s, t in zip(responses.texts, teacher_responses.texts)]
        steps = {}
        for source, sampled in (("student", responses), ("teacher", teacher_responses)):
            stats = [
                token_stats(
                    model.model,
                    list(zip((p.ids for p in eval_set.prompts), per_seed)),
                    _divergences(model.arch.vocab_size),
                    cfg.batch_size,
                    teacher_model.model,
                )
                for per_seed in sampled.tokens
            ]
            metrics[f"rkl@{source}"] = [_token_mean(s, "reverse_kl") for s in stats]
            metrics[f"fkl@{source}"] = [_token_mean(s, "forward_kl") for s in stats]
            steps[source] = _per_step(stats, cfg.exposure_bias_length or cfg.max_new_tokens)
        exposure = exposure_bias(*steps["student"], *steps["teacher"])
        metrics["exacc_err"] = [float(exposure.exacc_err[-1])]  # at the curve's last length (NaN: undefined)
    metrics["ece"] = [reference_ece(model, eval_set, cfg)]
    lengths = [length_stats([len(t) for t in per_seed], cfg.max_new_tokens) for per_seed in responses.tokens]
    metrics["length"] = [s["mean"] for s in lengths]
    return Evaluation(ModelResults(name, metrics, exposure, details={"length": lengths}), responses)


@dataclass
class EvalReport:
    evaluations: list[Evaluation]  # the teacher first when there is one
    eval_set: EvalSet
    info: dict  # settings and data counts, for results.json


def _load(path: str | Path, checksums: bool) -> EvalModel:
    model, arch, _ = load_model(path, checksums=checksums)
    return EvalModel(model, arch)


def evaluate_checkpoints(
    checkpoints: Sequence[tuple[str, str | Path]],
    data: str | Path,
    cfg: EvalConfig,
    *,
    teacher: tuple[str, str | Path] | None = None,
    fmt: str = "auto",
    template: str = "alpaca",
    progress: bool = False,
    checksums: bool = True,
) -> EvalReport:
    """Evaluate (name, checkpoint) pairs on one instruction file at the current layout (collective).

    Every checkpoint is validated and every tokenizer checked against the teacher's (else the first
    model's) before any model is loaded. The teacher is loaded once, samples once per seed, and is
    evaluated itself (first row, without the teacher comparison); then each model in turn is loaded,
    evaluated against the teacher and freed. ``checksums=False``: the checkpoints' files are
    checked against their manifests by size only.
    """
    named = ([teacher] if teacher else []) + list(checkpoints)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names must be distinct, got {names}")
    metas = [read_metadata(path) for _, path in named]
    tokenizer = load_tokenizer(named[0][1])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for (_, path), meta in zip(named[1:], metas[1:]):
        check_tokenizers_compatible(
            tokenizer, load_tokenizer(path), metas[0].padded_vocab_size, meta.padded_vocab_size, tp
        )
    limit = prompt_limit([load_architecture(path) for _, path in named], cfg)
    eval_set = load_eval_set(data, tokenizer, limit, fmt, template)
    logger.info(
        "%d prompts, %d dropped (longer than %d tokens)",
        len(eval_set.prompts),
        eval_set.dropped,
        eval_set.max_prompt_length,
    )

    evaluations, reference = [], None
    if teacher:
        logger.info("evaluating %s (teacher)", teacher[0])
        teacher_model = _load(teacher[1], checksums)
        teacher_responses = generate_responses(teacher_model, eval_set, tokenizer, cfg, progress)
        evaluations.append(evaluate_model(teacher[0], teacher_model, teacher_responses, eval_set, cfg))
        reference = (teacher_model, teacher_responses)
    for name, path in checkpoints:
        logger.info("evaluating %s", name)
        model = _load(path, checksums)
        responses = generate_responses(model, eval_set, tokenizer, cfg, progress)
        evaluations.append(evaluate_model(name, model, responses, eval_set, cfg, reference))
        del model
        gc.collect()
    info = {
        "data": str(data),
        "format": fmt,
        "template": template,
        "checkpoints": {n: str(p) for n, p in named},
        "teacher": teacher[0] if teacher else None,
        "prompts": len(eval_set.prompts),
        "dropped_prompts": eval_set.dropped,
        "max_prompt_length": eval_set.max_prompt_length,
        "config": dataclasses.asdict(cfg),
        "layout": {
            "tp": tp,
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
        },
    }
    return EvalReport(evaluations, eval_set, info)


def write_evaluation(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """results.json, results.md, the PNGs (see :mod:`.report`) and responses.jsonl: per model and
    prompt, the reference and the response of each seed."""
    written = write_report([e.results for e in report.evaluations], out_dir, report.info)
    path = Path(out_dir) / "responses.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for e in report.evaluations:
            seeds = [str(s) for s in e.responses.seeds]
            for i, prompt in enumerate(report.eval_set.prompts):
                record = {
                    "model": e.results.name,
                    "index": i,
                    "source": prompt.source,
                    "prompt": prompt.text,
                    "reference": prompt.reference,
                    "responses": {s: texts[i] for s, texts in zip(seeds, e.responses.texts)},
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return [*written, path]
