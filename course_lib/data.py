"""The offline corpus: the Python standard library's own source code.

Every Python install carries its standard library, so the course can train
and evaluate a language model with no download. The module list is fixed (so
the corpus is the same on every machine with the same Python version), and
the split into train and held-out is *by module*: the held-out perplexity is
measured on files the model never saw, not on a random slice of a file it
trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import check_int

log = logging.getLogger(__name__)

# Top-level stdlib modules that exist on CPython 3.9-3.13. Sorted, fixed: do not
# reorder, the corpus hash recorded next to the weights depends on it.
TRAIN_MODULES: tuple[str, ...] = (
    "_collections_abc", "_pydecimal", "_pyio", "abc", "argparse", "ast", "base64",
    "bdb", "bisect", "calendar", "cmd", "code", "codecs", "codeop", "colorsys",
    "compileall", "configparser", "contextlib", "copy", "copyreg", "csv",
    "dataclasses", "datetime", "difflib", "dis", "doctest", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "imaplib",
    "inspect", "io", "ipaddress", "keyword", "linecache", "locale", "lzma",
    "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "opcode", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "queue", "quopri", "random", "reprlib", "rlcompleter", "runpy",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "ssl", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "zipapp", "zipfile",
    "zipimport",
)
# Held out by module: the model never trains on these files.
HELDOUT_MODULES: tuple[str, ...] = (
    "bz2", "contextvars", "decimal", "graphlib", "html", "json",
    "logging", "sqlite3", "tomllib", "zoneinfo",
)
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    """One source file of the corpus."""

    module: str
    path: str
    text: str


def stdlib_dir() -> Path:
    """Folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(module: str, root: Path) -> list[Path]:
    """The .py files of a module (a single file, or a package's files, sorted)."""
    single = root / f"{module}.py"
    if single.is_file():
        return [single]
    pkg = root / module
    if pkg.is_dir():
        return sorted(p for p in pkg.rglob("*.py") if "test" not in p.parts)
    return []


def load_documents(split: str = "train") -> list[Document]:
    """Read the files of one split ("train" or "heldout") from this Python's stdlib."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    modules = HELDOUT_MODULES if split == "heldout" else tuple(
        m for m in TRAIN_MODULES if m not in HELDOUT_MODULES
    )
    root = stdlib_dir()
    docs: list[Document] = []
    for module in modules:
        files = _module_files(module, root)
        if not files:
            log.info("module %s not found in %s; skipped", module, root)
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs.append(Document(module, str(f.relative_to(root)), text))
    return docs


def corpus_spec(split: str = "train") -> dict:
    """What exactly a split contains, for the metadata recorded with a model."""
    docs = load_documents(split)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.path.encode())
        h.update(d.text.encode())
    return {
        "source": "Python standard library source",
        "python": sys.version.split()[0],
        "split": split,
        "files": len(docs),
        "characters": sum(len(d.text) for d in docs),
        "sha256": h.hexdigest(),
    }


def encode_split(tokenizer, split: str = "heldout", max_chars: int | None = None) -> torch.Tensor:
    """Token ids of a whole split as one 1-D tensor (documents joined by EOS)."""
    if max_chars is not None:  # a negative cap gave an empty tensor, True one character
        check_int("max_chars", max_chars, 1, " or None (None = the whole split)")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    used = 0
    for d in load_documents(split):
        text = d.text if max_chars is None else d.text[: max(0, max_chars - used)]
        if not text:
            break
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
        used += len(text)
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless random windows of `seq_len + 1` tokens, as (inputs, targets)."""
    check_int("seq_len", seq_len, 1)  # seq_len=0 gave empty inputs; True a window of one token
    check_int("batch_size", batch_size, 1)
    if ids.numel() <= seq_len + 1:
        raise ValueError(f"need more than {seq_len + 1} tokens, got {ids.numel()}")
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def calibration_batches(tokenizer, n: int = 8, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens from the *train* split (for quantization / pruning calibration)."""
    check_int("n", n, 1, " (the number of calibration windows)")
    check_int("seq_len", seq_len, 1)
    ids = encode_split(tokenizer, "train", max_chars=400_000)
    g = torch.Generator().manual_seed(seed)
    x, _ = next(batches(ids, seq_len, n, g))
    return x


# --- English prose: CPython's own reference documentation ----------------------------------------
# pydoc_data/topics.py ships with every CPython: the language reference's topics (the text of
# `help("assert")` and friends) as one dict of English prose. Topics are split by name, like the stdlib
# modules above: every PROSE_HELDOUT_EVERY-th topic (in the file's alphabetical order) is held out.
# The evaluation slice is the first PROSE_EVAL_TOKENS tokens of the held-out topics, joined by blank lines.
PROSE_HELDOUT_EVERY = 4
PROSE_EVAL_TOKENS = 8192


def prose_documents(split: str = "heldout") -> list[Document]:
    """The topics of one split ("train" or "heldout") of this Python's ``pydoc_data.topics``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    topics = importlib.import_module("pydoc_data.topics").topics
    keep = (lambda i: i % PROSE_HELDOUT_EVERY == 0) if split == "heldout" else (
        lambda i: i % PROSE_HELDOUT_EVERY != 0)
    return [Document("pydoc_data.topics", f"topics[{key!r}]", topics[key])
            for i, key in enumerate(sorted(topics)) if keep(i)]


def encode_prose(tokenizer, split: str = "heldout", max_tokens: int | None = PROSE_EVAL_TOKENS) -> torch.Tensor:
    """Token ids of a prose split as one 1-D tensor; by default the fixed evaluation slice (first 8,192 tokens)."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be an int >= 2 or None (the whole split), got {max_tokens!r}")
    ids: list[int] = []
    for d in prose_documents(split):
        ids.extend(tokenizer(d.text + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def prose_calibration_batches(tokenizer, n: int = 8, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens of *train* prose (calibration for a model judged on prose)."""
    ids = encode_prose(tokenizer, "train", max_tokens=max(4 * n * seq_len, 16384))
    g = torch.Generator().manual_seed(seed)
    x, _ = next(batches(ids, seq_len, n, g))
    return x
