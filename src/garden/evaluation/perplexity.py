"""Perplexity of a causal LM: token perplexity on a held-out stream, and LAMBADA last-word scores.

LAMBADA exactly as lm-evaluation-harness (0.4.x) scores `lambada_openai`, case by case:
- context = the words before the last one joined by single spaces (`text.split(" ")[:-1]`), target = " " +
  the last word; trailing spaces of the context move into the target (`HFLM._encode_pair`), so a double
  space before the last word is scored as part of the target;
- the target's tokens are those of `context + target` after the context's own tokens;
- a one-word passage has an empty context and is scored after the prefix token (BOS, else EOS);
- the model sees the last `max_length + 1` tokens of context + target minus the final one, i.e. at most
  `max_length` tokens (`_loglikelihood_tokens`); `max_length` defaults to the model's context length.
An example's log-likelihood is the sum over the target's tokens; accuracy = every target token is the
greedy choice; perplexity = exp(-mean over examples of that log-likelihood). Batched (left padding with
an attention mask and positions that restart at each row's first token), on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def token_windows(ids: np.ndarray, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens over a token stream (the tail that does not fill one is
    dropped), at most `limit` of them."""
    count = len(ids) // seq_len
    if limit is not None:
        count = min(count, limit)
    return torch.as_tensor(np.asarray(ids[: count * seq_len], dtype=np.int64)).reshape(count, seq_len)


@torch.inference_mode()
def token_nll(model, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of every predicted token (all but each window's first)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        )
        count += targets.numel()
    return total, count


def token_perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    total, count = token_nll(model, windows, batch_size)
    return float(np.exp(total / count))


@dataclass(frozen=True)
class LambadaExample:
    context: list[int]
    target: list[int]


def split_last_word(text: str) -> tuple[str, str]:
    """lambada_openai's doc_to_text / doc_to_target, then lm-eval's move of the context's trailing
    whitespace into the target."""
    words = text.split(" ")
    context, target = " ".join(words[:-1]), " " + words[-1]
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, target = context[:-spaces], context[-spaces:] + target
    return context, target


def prefix_token_id(tokenizer) -> int:
    """What lm-eval puts before an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def model_max_length(config, tokenizer) -> int:
    """lm-eval's default `max_length`: the model config's context length, else the tokenizer's, else 2048."""
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 10**12 else 2048


def encode_lambada(texts: list[str], tokenizer, max_length: int) -> list[LambadaExample]:
    """Token ids of each passage's context (truncated as lm-eval truncates) and target."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples = []
    for text in texts:
        context, target = split_last_word(text)
        if context:
            ctx = encode(context)
            tgt = encode(context + target)[len(ctx) :]
        else:
            ctx, tgt = [prefix_token_id(tokenizer)], encode(target)
        if not tgt:
            continue
        # lm-eval feeds (ctx + tgt)[-(max_length + 1):][:-1]: the context keeps max_length + 1 - len(tgt).
        keep = max(1, max_length + 1 - len(tgt))
        examples.append(LambadaExample(ctx[-keep:], tgt))
    return examples


@torch.inference_mode()
def lambada_loglikelihoods(model, examples: list[LambadaExample], batch_size: int,
                           pad_id: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Summed target log-likelihood and greedy exactness per example (in the given order), batched.

    The model reads context + target without its last token. Sequences are left-padded (positions
    restart at each row's first real token), so every target's predictions end at the last column and the
    output head (d x vocab, most of the cost for Pythia's 50k vocabulary) runs only over the last
    `max target length` positions instead of every position.
    """
    device = next(model.parameters()).device
    loglik, exact = np.zeros(len(examples)), np.zeros(len(examples), dtype=bool)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].context) - len(examples[i].target))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        chunk = [examples[i] for i in indices]
        sequences = [(e.context + e.target)[:-1] for e in chunk]
        width = max(len(s) for s in sequences)
        keep = max(len(e.target) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.as_tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
        ).logits.float()  # the last `keep` columns: each row's target predictions end at the last one
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (index, example) in enumerate(zip(indices, chunk, strict=True)):
            n_tgt = len(example.target)
            columns = torch.arange(keep - n_tgt, keep, device=logits.device)
            target = torch.as_tensor(example.target, device=logits.device)
            loglik[index] = float(logprobs[row, columns, target].sum())
            exact[index] = bool((logits[row, columns].argmax(-1) == target).all())
    return loglik, exact


def lambada_scores(model, examples: list[LambadaExample], batch_size: int, pad_id: int) -> dict[str, float]:
    """lm-eval's lambada_openai metrics: perplexity, accuracy, mean log-likelihood, and the count."""
    loglik_arr, exact = lambada_loglikelihoods(model, examples, batch_size, pad_id)
    return {
        "lambada_perplexity": float(np.exp(-loglik_arr.mean())),
        "lambada_accuracy": float(np.mean(exact)),
        "lambada_loglik": float(loglik_arr.mean()),
        "lambada_examples": float(len(examples)),
    }
