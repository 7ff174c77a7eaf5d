"""Byte-level text data for the quality benchmark.

The default corpus needs no download: it is the Python standard library's own
source, the sorted ``*.py`` files directly in ``sysconfig.get_paths()["stdlib"]``
(subfolders excluded), concatenated as raw bytes. Any other text file can be
used instead. :func:`load_docs_corpus` is a second distribution for fine-tuning:
the English prose of the language reference that ships with the standard
library (``pydoc_data.topics``). Tokens are bytes, so the vocabulary has 256 entries and losses
are in nats per byte.

Batches are drawn from a seeded ``numpy`` generator so that every method of a
benchmark run sees exactly the same sequence of batches.
"""

from __future__ import annotations

import pathlib
import sysconfig
from typing import NamedTuple

import numpy as np


class Corpus(NamedTuple):
  """A byte corpus split into a training and a validation part."""

  train: np.ndarray  # uint8[N_train]
  valid: np.ndarray  # uint8[N_valid]
  source: str


def stdlib_files() -> list[pathlib.Path]:
  """The sorted ``*.py`` files directly in the standard library folder."""
  return sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_corpus(path: str | None = None, valid_fraction: float = 0.05) -> Corpus:
  """Loads ``path`` (or the standard-library source) and splits it.

  The first ``1 - valid_fraction`` of the bytes is the training set, the
  rest the validation set; the split is contiguous so no validation text
  leaks into training windows.

  Args:
    path: a text file to read as bytes; ``None`` for the embedded default.
    valid_fraction: share of the bytes held out for validation.

  Returns:
    A :class:`Corpus`.
  """
  if path is None:
    files = stdlib_files()
    raw = b"".join(f.read_bytes() for f in files)
    source = f"{len(files)} stdlib *.py files in {files[0].parent}"
  else:
    raw = pathlib.Path(path).read_bytes()
    source = str(path)
  return _split(raw, source, valid_fraction)


def load_docs_corpus(valid_fraction: float = 0.05) -> Corpus:
  """The language reference's topics (``pydoc_data.topics``, English prose with code
  examples, about 0.7 MB), in sorted topic order, split as :func:`load_corpus`."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  raw = "\n\n".join(topics[k] for k in sorted(topics)).encode()
  return _split(raw, f"{len(topics)} pydoc_data.topics entries (English)", valid_fraction)


def _split(raw: bytes, source: str, valid_fraction: float) -> Corpus:
  data = np.frombuffer(raw, dtype=np.uint8)
  split = int(len(data) * (1.0 - valid_fraction))
  return Corpus(train=data[:split], valid=data[split:], source=source)


def batch_starts(
    data_len: int, num_batches: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
  """Deterministic window offsets: ``int64[num_batches, batch_size]``.

  Each window covers ``seq_len + 1`` bytes (inputs plus next-byte targets).
  """
  rng = np.random.default_rng(seed)
  return rng.integers(0, data_len - seq_len - 1, size=(num_batches, batch_size))


def get_batch(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """Gathers windows of ``seq_len + 1`` bytes: ``int32[batch, seq_len + 1]``."""
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return data[idx].astype(np.int32)
