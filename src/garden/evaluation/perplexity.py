"""Perplexity of a causal LM: token perplexity on a held-out stream, and LAMBADA last-word scores.

LAMBADA as lm-eval-harness's `lambada_openai`: context = the text up to its last space, target = " " +
the last word; an example's log-likelihood is the sum over the target's tokens; accuracy = every target
token is the greedy choice; perplexity = exp(-mean over examples of that log-likelihood).
Everything is batched (right padding with an attention mask) and runs on the model's device.
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
    context, _, word = text.strip().rpartition(" ")
    return context, " " + word


def encode_lambada(texts: list[str], tokenizer, max_length: int) -> list[LambadaExample]:
    """Tokenize context and target separately (as lm-eval does); keep the last max_length tokens."""
    examples = []
    for text in texts:
        context, target = split_last_word(text)
        if not context:
            continue
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not tgt:
            continue
        keep = max(1, max_length - len(tgt))
        examples.append(LambadaExample(ctx[-keep:], tgt))
    return examples


@torch.inference_mode()
def lambada_scores(model, examples: list[LambadaExample], batch_size: int, pad_id: int) -> dict[str, float]:
    """Summed target log-likelihood and greedy exactness per example, batched.

    Sequences are left-padded (positions restart at each row's first real token), so every target ends
    at the last column and the output head (d x vocab, most of the cost for Pythia's 50k vocabulary) runs
    only over the last `max target length` positions instead of every position.
    """
    device = next(model.parameters()).device
    loglik, exact = [], []
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].context) - len(examples[i].target))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        sequences = [e.context + e.target for e in chunk]
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
            logits_to_keep=keep + 1,
        ).logits.float()  # column c predicts token width - keep + c
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, example in enumerate(chunk):
            n_tgt = len(example.target)
            columns = torch.arange(keep - n_tgt, keep, device=logits.device)
            target = torch.as_tensor(example.target, device=logits.device)
            loglik.append(float(logprobs[row, columns, target].sum()))
            exact.append(bool((logits[row, columns].argmax(-1) == target).all()))
    loglik_arr = np.array(loglik)
    return {
        "lambada_perplexity": float(np.exp(-loglik_arr.mean())),
        "lambada_accuracy": float(np.mean(exact)),
        "lambada_loglik": float(loglik_arr.mean()),
        "lambada_examples": float(len(examples)),
    }
