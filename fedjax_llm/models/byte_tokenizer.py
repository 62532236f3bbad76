"""A byte-level tokenizer (256 bytes + BOS + EOS) for tiny random test models."""
from __future__ import annotations


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, ``bos_id`` = 256, ``eos_id`` = ``pad_id`` = 257."""

  vocab_size = 258
  bos_id = 256
  eos_id = 257
  pad_id = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
