"""Evaluation data: a held-out token stream, LAMBADA-format passages, and the fixed CKA batch.

Offline everything comes from the corpus (the tail `heldout_fraction` that the tiny series never trains
on); online LAMBADA is EleutherAI/lambada_openai from the Hub; any of them can be a local file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from garden.corpus import load_corpus, read_text_files
from garden.errors import GardenError
from garden.settings import CorpusSettings, LambadaSettings, TextSettings


def heldout_text(corpus: CorpusSettings, data_dir: Path, fraction: float) -> str:
    """The corpus tail that training leaves out (by characters; the tiny series splits its tokens the
    same way, so this is the text of its held-out split)."""
    texts = load_corpus(corpus, data_dir)
    joined = "\n".join(texts)
    return joined[int(len(joined) * (1.0 - fraction)) :]


def eval_text(text: TextSettings, corpus: CorpusSettings, data_dir: Path, fraction: float) -> str:
    if text.source == "file":
        return "\n".join(read_text_files(str(text.path)))
    return heldout_text(corpus, data_dir, fraction)


def lambada_from_text(text: str, min_words: int = 40, limit: int | None = None) -> list[str]:
    """LAMBADA-format passages (ending on a word to predict) cut from running text at line breaks."""
    passages, words = [], []
    for line in text.splitlines():
        words.extend(line.split())
        if len(words) >= min_words:
            while words and not re.search(r"[A-Za-z]", words[-1]):
                words.pop()
            if words:
                words[-1] = re.sub(r"[^A-Za-z']+$", "", words[-1]) or words[-1]
                passages.append(" ".join(words))
            words = []
            if limit is not None and len(passages) >= limit:
                break
    return passages


def load_lambada(lambada: LambadaSettings, corpus: CorpusSettings, data_dir: Path, fraction: float,
                 heldout: str | None = None) -> list[str]:  # fmt: skip
    """The LAMBADA texts: the Hub dataset, a local file (jsonl with "text", or plain lines), or passages
    cut from the held-out text (`heldout` when the caller has it, else the corpus tail)."""
    if lambada.source == "hub":
        import datasets

        try:
            rows = datasets.load_dataset(lambada.dataset, lambada.config, split=lambada.split)
        except Exception as err:
            raise GardenError(
                f"could not load {lambada.dataset} from the Hub ({err}); offline, use "
                "evaluation.lambada.source=heldout or =file with evaluation.lambada.path"
            ) from err
        texts = [row["text"] for row in rows]
    elif lambada.source == "file":
        texts = read_lambada_file(Path(str(lambada.path)))
    else:
        source = heldout if heldout is not None else heldout_text(corpus, data_dir, fraction)
        texts = lambada_from_text(source, limit=lambada.heldout_passages)
    return texts[: lambada.limit] if lambada.limit is not None else texts


def read_lambada_file(path: Path) -> list[str]:
    if not path.is_file():
        raise GardenError(f"evaluation.lambada.path {path} is not a file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        try:
            return [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError) as err:
            raise GardenError(f'{path}: each JSON line needs a "text" field ({err})') from err
    return lines


def cka_batch(ids: np.ndarray, n_sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """A fixed batch of n sequences (seeded offsets into the held-out stream): the same at every step."""
    if len(ids) < seq_len + 1:
        raise GardenError(f"the held-out text has {len(ids)} tokens, fewer than evaluation.seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    offsets = np.sort(
        rng.choice(len(ids) - seq_len, size=n_sequences, replace=n_sequences > len(ids) - seq_len)
    )
    return np.stack([ids[o : o + seq_len] for o in offsets]).astype(np.int64)
