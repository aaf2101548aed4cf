"""A small byte-level Transformer language model on the Python standard library's own source files.

The corpus is the text of the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``: it is on every machine
that has Python, needs no download, and is the same for the same Python version. Tokens are bytes (a
256-symbol vocabulary), so there is no tokenizer to ship. The model is decoder-only with a causal mask: each
position predicts the next byte from the bytes before it and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

VOCAB = 256
# Folders that differ between installs of the same Python version (third-party packages, the optional test
# suite that Debian ships separately): leaving them out keeps the corpus identical across machines.
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The standard library's ``.py`` files in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]  # prune: site-packages is big
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int = 2_000_000, root: Optional[Path] = None) -> Tensor:
    """The first ``max_bytes`` bytes of the concatenated standard library sources, as a ``uint8`` tensor."""
    chunks, total = [], 0
    for path in stdlib_files(root):
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"No .py files under {root or sysconfig.get_paths()['stdlib']}.")
    text = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def fingerprint(tokens: Tensor) -> str:
    """A short hash of the corpus, so two runs can tell whether they trained on the same text."""
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:12]


def split_corpus(tokens: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """(train, validation): the validation text is the tail, other modules than the training text."""
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


class TextWindows(Dataset):
    """``count`` windows of ``seq_len + 1`` bytes at offsets drawn once from ``seed``; item = (input, next bytes)."""

    def __init__(self, tokens: Tensor, seq_len: int = 64, count: int = 10_000, seed: int = 0) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"A corpus of {len(tokens)} bytes is too short for windows of {seq_len + 1}.")
        self.tokens, self.seq_len = tokens, seq_len
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(tokens) - seq_len - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[i])
        window = self.tokens[start : start + self.seq_len + 1].long()
        return window[:-1], window[1:]


class CausalTransformer(nn.Module):
    """Byte embedding + learned positions, pre-norm Transformer layers under a causal mask, a linear head.

    The defaults (width 128, 2 layers, 4 heads, feed-forward 512, context 64) have 470,784 parameters: about
    20 steps/s of 16 windows on one CPU thread, and 1.9 MB to average, so a slow link dominates.
    """

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, ff: int = 512, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        # enable_nested_tensor only matters for padded batches, and warns with norm_first: switch it off.
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-byte cross-entropy (nats per byte)."""
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


class StdlibLM(L.LightningModule):
    """The model trained with Adam on random windows of the standard library's source (per-rank seed)."""

    def __init__(self, lr: float = 2e-3, batch_size: int = 16, context: int = 64, max_bytes: int = 2_000_000):
        super().__init__()
        self.save_hyperparameters()
        self.model = CausalTransformer(context=context)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = lm_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        train, _ = split_corpus(stdlib_corpus(self.hparams.max_bytes))
        windows = TextWindows(train, self.hparams.context, seed=self.global_rank)
        return DataLoader(windows, batch_size=self.hparams.batch_size)
