"""Training data: token ids from .npy / .bin / .jsonl or text, a held-out split, and random batches."""

import os
from functools import cached_property

import numpy as np
import torch

from ..errors import LorakitError
from ..io.jsonio import parse_json, read_json


def load_data(path, vocab_size, base=None):
    """Token ids from .npy / .bin (uint16, or uint32 when the vocabulary needs it: nanoGPT's memmap convention),
    .jsonl with input_ids (optional labels or loss_mask), or .txt / .jsonl text with the base's tokenizer.json.
    Returns ("stream", 1-D tensor) or ("records", [(ids, labels)]). Every id is checked against the vocabulary."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise LorakitError("is a folder: --data takes one file (.npy, .bin, .jsonl or .txt)", path=path)
    if not os.path.isfile(path):
        raise LorakitError("no such data file", path=path)
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise LorakitError(f"not a readable .npy array ({e})", path=path) from None
        if array.dtype.kind not in "iu":
            raise LorakitError(f"token ids must be integers, the array holds {array.dtype}", path=path)
        kind, data = "stream", torch.from_numpy(array.astype(np.int64).reshape(-1))
    elif path.endswith(".bin"):
        dtype = np.uint32 if vocab_size > 65536 else np.uint16
        if os.path.getsize(path) % np.dtype(dtype).itemsize:
            raise LorakitError(
                f"{os.path.getsize(path)} bytes is not a whole number of {np.dtype(dtype).name} token "
                "ids (nanoGPT's .bin: uint16, uint32 for vocabularies over 65536)",
                path=path,
            )
        kind, data = "stream", torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
    elif path.endswith(".jsonl"):
        kind, data = "records", _read_jsonl(path, base)
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as f:
            kind, data = (
                "stream",
                torch.tensor(_tokenizer(base, path).encode(f.read()).ids, dtype=torch.int64),
            )
    else:
        raise LorakitError("data must be .npy, .bin, .jsonl or .txt", path=path)
    ids = (
        data
        if kind == "stream"
        else torch.cat([r[0] for r in data])
        if data
        else torch.zeros(0, dtype=torch.long)
    )
    if ids.numel() == 0:
        raise LorakitError("no tokens in the data", path=path)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise LorakitError(
            f"token id {int(ids[i])} at position {i} is outside the vocabulary [0, {vocab_size})", path=path
        )
    return kind, data


def _read_jsonl(path, base):
    records, text = [], _Text(base, path)
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is no part of line 1
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = parse_json(line, path, f"line {n}")
            ids, labels = _record(r, path, n, text)
            if "loss_mask" in r:
                mask = _token_ids(r["loss_mask"], path, n, "loss_mask")
                if len(mask) != len(labels):
                    raise LorakitError(f"line {n}: loss_mask and input_ids differ in length", path=path)
                labels[torch.tensor(mask, dtype=torch.int64) == 0] = -100
            if labels.shape != ids.shape:
                raise LorakitError(f"line {n}: labels and input_ids differ in length", path=path)
            records.append((ids, labels))
    return records


def _record(r, path, n, text):
    """(ids, labels) of one JSONL record: input_ids (labels optional), text, or prompt + completion (the loss on
    the completion only, TRL's SFT default, the tokenizer's EOS appended to it as TRL does)."""
    if not isinstance(r, dict):
        raise LorakitError(f"line {n} is not a JSON object", path=path)
    if "input_ids" in r:
        ids = torch.tensor(_token_ids(r["input_ids"], path, n, "input_ids"), dtype=torch.int64)
        if "labels" in r:
            return ids, torch.tensor(_token_ids(r["labels"], path, n, "labels"), dtype=torch.int64)
        return ids, ids.clone()
    if "text" in r:
        ids = torch.tensor(text.encode(_string(r, "text", path, n)), dtype=torch.int64)
        return ids, ids.clone()
    if "prompt" in r and "completion" in r:
        prompt, completion = _string(r, "prompt", path, n), _string(r, "completion", path, n)
        eos = text.eos
        if eos and not completion.endswith(eos):
            completion += eos
        ids = torch.tensor(text.encode(prompt + completion), dtype=torch.int64)
        labels = ids.clone()
        labels[: len(text.encode(prompt))] = -100
        return ids, labels
    if "messages" in r:
        raise LorakitError(
            f"line {n}: chat 'messages' need the model's chat template, which lorakit does not run: give "
            "'text' with the template applied (transformers' apply_chat_template), or 'prompt' and 'completion'",
            path=path,
        )
    raise LorakitError(f"line {n} has none of input_ids, text, or prompt and completion", path=path)


def _string(r, key, path, n):
    if not isinstance(r[key], str):
        raise LorakitError(
            f"line {n}: '{key}' must be a string (conversational lists need the chat template: apply it first)",
            path=path,
        )
    return r[key]


class _Text:
    """The base's tokenizer, loaded at the first text that needs it."""

    def __init__(self, base, path):
        self.base, self.path, self.tokenizer = base, path, None

    def encode(self, text):
        self.tokenizer = self.tokenizer or _tokenizer(self.base, self.path)
        return self.tokenizer.encode(text).ids

    @cached_property
    def eos(self):
        """tokenizer_config.json's eos_token (a string or an AddedToken object), None where it names none: read once
        for the whole file."""
        config = os.path.join(self.base or "", "tokenizer_config.json")
        token = (
            read_json(config, "tokenizer_config.json").get("eos_token") if os.path.isfile(config) else None
        )
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) and token else None


def _token_ids(value, path, line, key):
    """A list of integers (never floats truncated to ints, never nested lists)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise LorakitError(f"line {line}: '{key}' must be a list of integers", path=path)
    return value


def _tokenizer(base, path):
    tok = os.path.join(base or "", "tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LorakitError(
            "text data needs the tokenizers package (pip install tokenizers)", path=path
        ) from None
    if not os.path.isfile(tok):
        raise LorakitError("text data needs a tokenizer.json in the base folder", path=path)
    read_json(tok, "tokenizer.json")  # the guarded parser first: depth, duplicates, size, one line naming it
    try:
        return Tokenizer.from_file(tok)
    except Exception as e:  # the tokenizers package's own refusal (a JSON it does not understand)
        raise LorakitError(f"tokenizer.json is not a tokenizer: {str(e).splitlines()[0]}", path=tok) from None


def split(kind, data, seq_len, val_fraction=0.1):
    """Held-out tail for evaluation: the last 10% of the tokens (or records)."""
    n = len(data)
    cut = n - max(seq_len + 1 if kind == "stream" else 1, int(n * val_fraction))
    if cut < (seq_len + 1 if kind == "stream" else 1):
        raise LorakitError(
            f"too little data: {n} {'tokens' if kind == 'stream' else 'records'} for seq-len {seq_len} "
            "and a held-out split"
        )
    return data[:cut], data[cut:]


def get_batch(kind, data, batch, seq_len, generator):
    """(x, y) of [batch, seq_len]; y is x shifted by one (-100 where no loss)."""
    if kind == "stream":
        starts = torch.randint(len(data) - seq_len, (batch,), generator=generator)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + seq_len] for s in starts])
        return x, y
    picks = torch.randint(len(data), (batch,), generator=generator)
    x = torch.zeros(batch, seq_len, dtype=torch.long)
    y = torch.full((batch, seq_len), -100, dtype=torch.long)
    for row, i in enumerate(picks.tolist()):
        ids, labels = data[i]
        n = min(len(ids) - 1, seq_len)
        x[row, :n], y[row, :n] = ids[:n], labels[1 : n + 1]
    return x, y
