"""Data for the training command: a corpus (a text file, or the Python standard library's docstrings, which
need no download), a WordPiece tokenizer trained on it with Hugging Face `tokenizers` and cached, and
batches keyed by global sample ids, so that the masking of a sample depends only on (seed, step, sample
id): the same on any number of processes.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
CACHE = Path(os.environ.get("MASKLM_CACHE", Path.home() / ".cache" / "masklm_kernels"))


def stdlib_docstrings(max_files: int = 400) -> list[str]:
    """Paragraphs of the docstrings of the standard library's modules, classes and functions (parsed with
    ast, never imported), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    out = []
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 4]
    return out


def read_corpus(text_file: str | None) -> list[str]:
    if text_file is None:
        return stdlib_docstrings()
    lines = Path(text_file).read_text(encoding="utf-8").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def tokenizer_for(texts: list[str], vocab_size: int):
    """A WordPiece tokenizer (BERT's, lower-cased) trained on `texts`, cached by a hash of corpus and size.
    Training it is not deterministic across processes (ties broken in hash order): the cache is what makes
    two runs on one corpus use the same vocabulary."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    key = hashlib.sha256(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = CACHE / f"wordpiece-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = BertWordPieceTokenizer(lowercase=True)
    # show_progress=False: the trainer's progress bar, off a terminal, leaves blank lines in the job's output
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=list(SPECIAL), min_frequency=2,
                            show_progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: torchrun's ranks may train it at once
    tok.save(str(tmp))
    os.replace(tmp, path)
    return Tokenizer.from_file(str(path))


@dataclasses.dataclass
class Dataset:
    """Token sequences ([CLS] ... [SEP], at most seq_len) split into train and held-out eval samples."""
    train: list[list[int]]
    eval: list[list[int]]
    vocab_size: int
    seq_len: int

    def batch(self, sample_ids: torch.Tensor, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (B, seq_len) right-padded with [PAD], lengths (B,)) of the given global sample ids."""
        samples = self.train if split == "train" else self.eval
        rows = [samples[int(i) % len(samples)] for i in sample_ids]
        ids = torch.full((len(rows), self.seq_len), PAD_ID, dtype=torch.int64)
        for r, seq in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
        return ids, torch.tensor([len(s) for s in rows])


class CorpusError(ValueError):
    """The corpus cannot make a dataset (too small, unreadable): the training command reports it in one line."""


def build_dataset(text_file: str | None, seq_len: int, vocab_size: int, eval_fraction: float = 0.05) -> Dataset:
    try:
        texts = read_corpus(text_file)
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read the corpus {text_file!r}: {e}") from e
    if len(texts) < 20:
        where = f"{text_file!r}" if text_file else "the corpus"
        raise CorpusError(f"{where} has {len(texts)} non-empty lines (paragraphs): at least 20 are needed")
    tok = tokenizer_for(texts, vocab_size)
    body = seq_len - 2
    seqs = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        for start in range(0, len(ids), body):  # long paragraphs become several samples
            piece = ids[start:start + body]
            if len(piece) >= 4:
                seqs.append([CLS_ID, *piece, SEP_ID])
    if len(seqs) < 2:
        raise CorpusError(f"the corpus gives {len(seqs)} samples of 4 tokens or more: at least 2 are needed "
                          "(one to train on, one to evaluate)")
    n_eval = max(1, int(len(seqs) * eval_fraction))
    return Dataset(seqs[:-n_eval], seqs[-n_eval:], tok.get_vocab_size(), seq_len)


def sample_ids_for(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Global sample ids of this rank's part of step `step`: a seeded permutation per epoch, the global
    batch split across ranks, so that 2 processes see the same samples (and masks) as 1."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
    ids = perm[pos * batch_size:(pos + 1) * batch_size] + epoch * n  # a sample id is unique across epochs
    return ids.chunk(world)[rank] if world > 1 else ids
