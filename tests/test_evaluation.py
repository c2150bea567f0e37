"""Model-level evaluation: CKA and PER against known answers, perplexity against direct computation."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import SHRUNK_TINY
from garden import families
from garden.evaluation.data import lambada_from_text
from garden.evaluation.perplexity import (
    LambadaExample,
    lambada_scores,
    split_last_word,
    token_nll,
    token_perplexity,
    token_windows,
)
from garden.evaluation.stability import (
    condition_number,
    linear_cka,
    ov_singular_values,
    proportional_effective_rank,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ CKA


def test_cka_of_identical_inputs_is_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(12, 12, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        300, 12, generator=gen, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 3.0, y) == pytest.approx(base, rel=1e-10)  # centring removes offsets


def test_cka_of_independent_noise_is_near_zero():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5000, 8, generator=gen), torch.randn(5000, 8, generator=gen)
    assert linear_cka(x, y) < 0.01


# ------------------------------------------------------------------------------------------------ PER


def test_per_of_identity_is_one():
    assert proportional_effective_rank(torch.linalg.svdvals(torch.eye(9))) == pytest.approx(1.0)


def test_per_of_rank_one_is_one_over_r():
    matrix = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))  # 6 x 4, rank 1
    s = torch.linalg.svdvals(matrix.double())
    assert proportional_effective_rank(s) == pytest.approx(1 / 4, rel=1e-6)


def test_per_of_a_known_spectrum():
    p = np.array([0.75, 0.25])
    expected = math.exp(-(p * np.log(p)).sum()) / 2
    assert proportional_effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert condition_number(torch.tensor([3.0, 1.0])) == 3.0


def test_ov_singular_values_match_the_explicit_product():
    gen = torch.Generator().manual_seed(3)
    d, heads = 16, 4
    head_dim = d // heads
    qkv = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
    dense = torch.randn(d, d, generator=gen, dtype=torch.float64)
    block = SimpleNamespace(attention=SimpleNamespace(query_key_value=torch.nn.Linear(d, 3 * d),
                                                      dense=torch.nn.Linear(d, d)))  # fmt: skip
    block.attention.query_key_value.weight.data, block.attention.dense.weight.data = qkv, dense
    circuits = families.get("gpt_neox").ov_circuits(block, SimpleNamespace(num_attention_heads=heads))
    fast = ov_singular_values(circuits)
    rows = qkv.reshape(heads, 3, head_dim, d)
    for h in range(heads):
        product = dense[:, h * head_dim : (h + 1) * head_dim] @ rows[h, 2]
        explicit = torch.linalg.svdvals(product)[:head_dim]
        torch.testing.assert_close(fast[h].sort(descending=True).values, explicit, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ perplexity


def test_token_perplexity_equals_the_direct_computation(model):
    ids = np.random.default_rng(0).integers(0, 97, size=16 * 20 + 5)
    windows = token_windows(ids, 16)
    assert windows.shape == (20, 16)
    with torch.inference_mode():
        direct = model(input_ids=windows, labels=windows).loss.item()  # mean over all predicted tokens
    for batch_size in (1, 3, 20):
        assert math.log(token_perplexity(model, windows, batch_size)) == pytest.approx(direct, rel=1e-5)
    total, count = token_nll(model, windows, 7)
    assert total > 0
    assert count == 20 * 15


def test_lambada_batched_with_padding_equals_one_at_a_time(model):
    rng = np.random.default_rng(1)
    examples = [
        LambadaExample(list(rng.integers(0, 97, size=n)), list(rng.integers(0, 97, size=k)))
        for n, k in [(5, 1), (12, 2), (3, 3), (20, 1), (9, 2)]
    ]
    batched = lambada_scores(model, examples, batch_size=4, pad_id=0)
    single = lambada_scores(model, examples, batch_size=1, pad_id=0)
    assert batched["lambada_perplexity"] == pytest.approx(single["lambada_perplexity"], rel=1e-5)
    assert batched["lambada_accuracy"] == single["lambada_accuracy"]
    # By hand for one example: the sum of the target's log-probabilities.
    example = examples[1]
    ids = torch.tensor([example.context + example.target])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(example.context)
    by_hand = sum(float(logprobs[n - 1 + i, t]) for i, t in enumerate(example.target))
    only = lambada_scores(model, [example], batch_size=1, pad_id=0)
    assert math.log(only["lambada_perplexity"]) == pytest.approx(-by_hand, rel=1e-5)


def test_lambada_format_helpers():
    assert split_last_word("the cat sat on the mat") == ("the cat sat on the", " mat")
    text = "\n".join(f"line {i} of the play with words enough, to read;" for i in range(40))
    passages = lambada_from_text(text, min_words=20)
    assert passages and all(p.split()[-1].isalpha() for p in passages)


# ------------------------------------------------------------------------------------- the CLI stage


SHRUNK = [
    *SHRUNK_TINY,
    "evaluation.seq_len=16",
    "evaluation.max_windows=32",
    "evaluation.lambada.limit=40",
    "evaluation.cka.n_sequences=32",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluation=perplexity", "evaluation.lambada.source=wikipedia"], "valid: one of heldout, file, h"),
        (
            [
                "evaluation=perplexity",
                "evaluation.lambada.source=file",
                "evaluation.lambada.path=/nope.jsonl",
            ],
            "is not a file",
        ),
        (
            ["evaluation=perplexity", "evaluation.steps.select=list", "evaluation.steps.values=[0,7]"],
            "steps [7] are not in the series",
        ),
        (
            ["evaluation=perplexity", "evaluation.lambada.limit=0"],
            "evaluation.lambada.limit=0 is not valid; valid: an integer >= 1 or null",
        ),
        (["evaluation=perplexity", "evaluation.max_windows=0"], "max_windows=0 is not valid; valid: an int"),
    ],
)
def test_bad_evaluation_input_fails_before_any_work(tmp_path, compose_config, overrides, message):
    from garden.errors import GardenError
    from garden.tasks import run

    cfg = compose_config(*SHRUNK, *overrides, f"paths.data_dir={tmp_path}/data",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false")  # fmt: skip
    with pytest.raises(GardenError, match=re.escape(message)):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "data" / "series").exists()


# ------------------------------------------------------------------- LAMBADA against lm-eval-harness


def _lm_eval_loglikelihoods(model, tokenizer, texts: list[str], max_length: int) -> list[tuple[float, bool]]:
    """lm-evaluation-harness 0.4.13 itself: lambada_openai's doc_to_text / doc_to_target, then HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=max_length, device="cpu")
    requests = [
        Instance("loglikelihood", {"text": t}, (" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]), i)
        for i, t in enumerate(texts)
    ]
    return lm.loglikelihood(requests, disable_tqdm=True)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from conftest import WORDS
    from garden.tiny import train_tokenizer

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=30)) for _ in range(200)]
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def word_model(bpe_tokenizer):
    torch.manual_seed(1)
    config = GPTNeoXConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                           tie_word_embeddings=False)  # fmt: skip
    return GPTNeoXForCausalLM(config).eval()


LAMBADA_CASES = {
    "plain": "the king and the queen walk in the garden while the fool sings",
    "double space before the last word": "the lords argue over crowns and  swords",
    "one word": "letters",
    "long, truncated": " ".join(["the long night and the rain"] * 8) + " crowns",
    "rare last word": "the queen sings of forking paths",
}


@pytest.mark.parametrize("max_length", [64, 12])
def test_lambada_equals_lm_eval_harness_case_by_case(word_model, bpe_tokenizer, max_length):
    """Each case of issue 11 (truncation, whitespace, one-word passages) against lm-eval's own HFLM."""
    from garden.evaluation.perplexity import encode_lambada, lambada_loglikelihoods

    texts = list(LAMBADA_CASES.values())
    model = word_model
    reference = _lm_eval_loglikelihoods(model, bpe_tokenizer, texts, max_length)
    examples = encode_lambada(texts, bpe_tokenizer, max_length)
    assert len(examples) == len(texts)  # one-word passages are scored, not dropped
    assert all(len(e.context) + len(e.target) - 1 <= max_length for e in examples)
    loglik, exact = lambada_loglikelihoods(model, examples, batch_size=3, pad_id=0)
    for name, got, greedy, (want, want_greedy) in zip(LAMBADA_CASES, loglik, exact, reference, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), name
        assert greedy == want_greedy, name


def test_lambada_splits_like_lm_eval():
    assert split_last_word("the cat sat on the mat") == ("the cat sat on the", " mat")
    assert split_last_word("the cat sat  mat") == ("the cat sat", "  mat")  # the space moves to the target
    assert split_last_word("mat") == ("", " mat")
