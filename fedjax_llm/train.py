"""``run(config, workdir)``: the only library code that reads a config.

It turns the config into arguments for the model loader, the PEFT method, the
federated data, the algorithm builder and the compiled round, then runs the
rounds with evaluation, logging (progress bar, tensorboardX, metrics.jsonl),
Orbax checkpoints with automatic resume, a NaN guard, ``summary.json`` and a
loss-curve PNG.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax import nnx

from fedjax_llm import algorithms as algorithms_lib
from fedjax_llm.algorithms.hetlora import sample_client_ranks
from fedjax_llm import tree as T
from fedjax_llm.checkpoint import Checkpointer
from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core import sampling
from fedjax_llm.core import round as round_lib
from fedjax_llm.core.round import CohortData, build_round
from fedjax_llm.data import federated
from fedjax_llm.optim import add_proximal, fedopt_adaptive
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft.base import (classification_logits, make_classification_loss, make_lm_loss,
                                  row_cross_entropy, split_model, token_nll)

jax.config.update("jax_threefry_partitionable", True)  # stable seed replay across jax versions


class TrainingError(RuntimeError):
  """A run that cannot continue (NaN loss, ...); the message says why and what was kept."""


# ----------------------------------------------------------------------------- config -> objects


def _choice(kind: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(sorted(allowed))}")


def make_client_optimizer(c) -> optax.GradientTransformation:
  builders = {
      "sgd": lambda: optax.sgd(c.learning_rate, momentum=c.momentum or None),
      "adam": lambda: optax.adam(c.learning_rate),
      "adamw": lambda: optax.adamw(c.learning_rate, weight_decay=c.weight_decay),
  }
  _choice("client optimizer", c.name, builders)
  opt = builders[c.name]()
  if c.grad_clip and c.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  if c.get("prox_mu", 0.0):  # FedProx: proximal gradient first, then clipping and the optimizer
    opt = optax.chain(add_proximal(c.prox_mu), opt)
  return opt


def make_server_optimizer(c) -> optax.GradientTransformation:
  """FedOpt (Reddi et al., 2021, arXiv:2003.00295): an optimizer on the pseudo-gradient ``x - mean_k y_k``.

  ``fedavg`` (SGD, lr 1 = plain averaging) and ``fedavgm`` (SGD with ``momentum``);
  ``fedadam`` / ``fedyogi`` / ``fedadagrad`` are the paper's Algorithm 2 exactly
  (``optim.fedopt_adaptive``: no bias correction, m_{-1} = 0, v_{-1} = tau^2, step
  ``lr m / (sqrt(v) + tau)``, adagrad with ``b1`` momentum) with ``b1``, ``b2`` and ``eps`` as tau;
  ``adam`` / ``yogi`` / ``adagrad`` are the optax optimizers (bias-corrected adam/yogi, yogi's
  moments start at 1e-6, adagrad without momentum and with ``eps`` inside the square root).
  """
  builders = {
      "fedavg": lambda: optax.sgd(c.learning_rate),
      "fedavgm": lambda: optax.sgd(c.learning_rate, momentum=c.momentum),
      "fedadam": lambda: fedopt_adaptive("adam", c.learning_rate, b1=c.b1, b2=c.b2, tau=c.eps),
      "fedyogi": lambda: fedopt_adaptive("yogi", c.learning_rate, b1=c.b1, b2=c.b2, tau=c.eps),
      "fedadagrad": lambda: fedopt_adaptive("adagrad", c.learning_rate, b1=c.b1, b2=c.b2, tau=c.eps),
      "adam": lambda: optax.adam(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps),
      "yogi": lambda: optax.yogi(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps),
      "adagrad": lambda: optax.adagrad(c.learning_rate, initial_accumulator_value=0.0, eps=c.eps),
  }
  _choice("server optimizer", c.name, builders)
  return builders[c.name]()


ENCODER_NAMES = ("all-minilm-l6-v2", "tiny-bert")


def model_kind(name: str) -> str:
  """"encoder" (BERT family) or "decoder" (Llama family) for a model name or path."""
  if name in ENCODER_NAMES:
    return "encoder"
  cfg = os.path.join(name, "config.json")
  if os.path.isdir(name) and os.path.isfile(cfg):
    with open(cfg) as f:
      mt = json.load(f).get("model_type", "")
    return "encoder" if mt in ("bert", "roberta", "xlm-roberta", "distilbert") else "decoder"
  return "decoder"


def load_model(model_cfg, seed: int, *, num_classes: int = 0, pooling: str = "mean"):
  """(nnx model, tokenizer, kind) for ``model_cfg.name``; kind is "encoder" or "decoder".

  Encoders are loaded as classifiers with ``num_classes`` outputs (a fresh head, ``pooling``).
  """
  from fedjax_llm import models
  kind = model_kind(model_cfg.name)
  if kind == "encoder":
    if num_classes < 2:
      raise ValueError(f"model {model_cfg.name!r} is an encoder: it needs task='classification' (got no classes)")
    from fedjax_llm.models import bert
    if model_cfg.name == "tiny-bert":  # tests and smoke runs only: a random 2-layer BERT over bytes
      from fedjax_llm.models.byte_tokenizer import ByteEncoderTokenizer
      tok = ByteEncoderTokenizer()
      cfg = bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, max_position_embeddings=160, type_vocab_size=2,
                            pad_token_id=tok.pad_id, dtype=model_cfg.dtype, remat=model_cfg.remat,
                            num_classes=num_classes, pooling=pooling)
      return bert.BertClassifier(cfg, rngs=nnx.Rngs(seed)), tok, kind
    model, tok = bert.load_encoder(model_cfg.name, num_classes=num_classes, pooling=pooling, dtype=model_cfg.dtype,
                                   remat=model_cfg.remat, seed=seed, num_layers=model_cfg.get("num_layers") or None)
    return model, tok, kind
  if model_cfg.name == "tiny-random":  # tests and smoke runs only: a random 2-layer Llama over bytes
    from fedjax_llm.models.byte_tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    cfg = models.tiny_llama_config(vocab_size=tok.vocab_size, max_position_embeddings=256,
                                   dtype=model_cfg.dtype, remat=model_cfg.remat)
    return models.random_llama(cfg, seed=seed), tok, kind
  model, tok = models.load_pretrained(model_cfg.name, dtype=model_cfg.dtype, remat=model_cfg.remat, seed=seed)
  return model, tok, kind


def _check_seq_len(seq_len: int, max_len: int, prompt_rows: int = 0) -> None:
  if seq_len > max_len:
    room = f", after {prompt_rows} soft-prompt rows" if prompt_rows else ""
    raise ValueError(f"data.seq_len={seq_len} is longer than the model's context "
                     f"({max_len} tokens{room}); allowed: 2..{max_len}")
  if seq_len < 2:
    raise ValueError(f"data.seq_len={seq_len} must be >= 2")


def load_data(data_cfg, tokenizer, max_len: int, prompt_rows: int = 0):
  """Causal-LM data: Shakespeare by role, each role a client."""
  from fedjax_llm.data import federated, shakespeare
  _choice("dataset", data_cfg.dataset, {"shakespeare"})
  _check_seq_len(data_cfg.seq_len, max_len, prompt_rows)
  clients = shakespeare.load_shakespeare(min_chars=data_cfg.min_chars, heldout_fraction=data_cfg.heldout_fraction,
                                         plays=list(data_cfg.plays) or None)
  if not clients:
    raise ValueError(f"no Shakespeare client has >= {data_cfg.min_chars} characters; lower data.min_chars")
  return federated.FederatedTokenData.from_texts(
      clients, tokenizer.encode, tokenizer.eos_id, data_cfg.seq_len,
      max_train_seqs_per_client=data_cfg.max_train_seqs_per_client or None)


def load_classification_dataset(data_cfg):
  from fedjax_llm.data import classification as cls
  name = data_cfg.dataset
  if name in ("bbc_news", "tweets"):
    return cls.load_classification(name)
  return cls.load_classification(name, text_column=data_cfg.text_column, label_column=data_cfg.label_column,
                                 client_column=data_cfg.client_column or None)


def verbalizer(tokenizer, words) -> tuple[int, ...]:
  """The first non-blank token of " word" for each class word; they must be distinct."""
  ids = []
  for w in words:
    toks = [t for t in tokenizer.encode(" " + str(w)) if tokenizer.decode([t]).strip()]
    if not toks:
      raise ValueError(f"label word {w!r} encodes to no non-blank token")
    ids.append(int(toks[0]))
  if len(set(ids)) != len(ids):
    raise ValueError(f"label words {tuple(words)} share first tokens {ids}; set data.label_words to words that "
                     "start with distinct tokens")
  return tuple(ids)


def decoder_encoder(tokenizer, template: str, seq_len: int):
  """``encode(text) -> ids`` for verbalizer classification: the template with ``{text}`` truncated to fit."""
  if template.count("{text}") != 1:
    raise ValueError(f"data.template must contain '{{text}}' exactly once, got {template!r}")
  pre, post = template.split("{text}")
  pre_ids = tokenizer.encode(pre) if pre else []
  post_ids = tokenizer.encode(post) if post else []
  budget = seq_len - len(pre_ids) - len(post_ids)
  if budget < 1:
    raise ValueError(f"data.seq_len={seq_len} leaves no room for text after the template's "
                     f"{len(pre_ids) + len(post_ids)} tokens")

  def encode(text: str) -> list[int]:
    return pre_ids + tokenizer.encode(text)[:budget] + post_ids

  return encode


def load_classification_data(config, dataset, tokenizer, kind: str, max_len: int, prompt_rows: int = 0):
  """(FederatedClassificationData, verbalizer label token ids or None) for a classification run."""
  from fedjax_llm.data import classification as cls
  d = config.data
  _check_seq_len(d.seq_len, max_len, prompt_rows)
  client_of = cls.partition(dataset, d.partition, d.num_clients, d.alpha, config.seed)
  if kind == "encoder":
    encode, pad_id, label_ids = (lambda t: tokenizer.encode(t, max_length=d.seq_len)), tokenizer.pad_id, None
  else:
    words = tuple(d.label_words) or tuple(dataset.class_names)
    if len(words) != len(dataset.class_names):
      raise ValueError(f"data.label_words has {len(words)} words for {len(dataset.class_names)} classes "
                       f"{tuple(dataset.class_names)}")
    label_ids = verbalizer(tokenizer, words)
    encode, pad_id = decoder_encoder(tokenizer, d.template, d.seq_len), tokenizer.pad_id
  data = cls.FederatedClassificationData.from_dataset(
      dataset, client_of, encode, d.seq_len, pad_id, test_fraction=d.test_fraction, seed=config.seed,
      max_train_per_client=d.max_train_seqs_per_client or None)
  return data, label_ids


def peft_plan(model, config, tokenizer=None, *, head: bool = False):
  """Apply ``config.peft.methods`` to ``model`` (each family's options from its config section)."""
  from fedjax_llm.peft.apply import apply_peft
  pr = config.prompt
  init_ids = None
  if pr.init == "text":
    if not pr.init_text or tokenizer is None:
      raise ValueError("prompt.init='text' needs prompt.init_text")
    init_ids = tokenizer.encode(pr.init_text)
    if isinstance(init_ids, list) and init_ids and hasattr(tokenizer, "cls_id"):
      init_ids = [i for i in init_ids if i not in (tokenizer.cls_id, tokenizer.sep_id)]
  return apply_peft(
      model, tuple(config.peft.methods),
      lora=dict(target=config.lora.target, rank=config.lora.rank, alpha=config.lora.alpha,
                dropout=config.lora.dropout, kernel=config.lora.get("kernel", "xla")),
      prompt=dict(length=pr.length, local_length=pr.local_length, init=pr.init, init_std=pr.init_std,
                  init_ids=init_ids),
      prefix=dict(length=config.prefix.length, init_std=config.prefix.init_std),
      adapter=dict(kind=config.adapter.kind, width=config.adapter.width, activation=config.adapter.activation,
                   local_width=config.adapter.local_width),
      bitfit=dict(add_missing=config.bitfit.add_missing, norms=config.bitfit.norms),
      partial=dict(layers=tuple(config.partial.layers), norms_only=config.partial.norms_only),
      head=head, seed=config.seed)


def client_ranks_from_config(config, num_clients: int) -> np.ndarray:
  """Each client's LoRA rank from its capability level (``clients.rank_choices`` / ``rank_probs``)."""
  cl = config.clients
  bad = [r for r in cl.rank_choices if r > config.lora.rank]
  if bad:
    raise ValueError(f"clients.rank_choices {tuple(cl.rank_choices)} has rank {max(bad)} > r_max "
                     f"lora.rank={config.lora.rank}; allowed ranks: 1..{config.lora.rank}")
  return sample_client_ranks(num_clients, rank_choices=cl.rank_choices, rank_probs=cl.rank_probs or None,
                             seed=config.seed)


def client_depths_from_config(config, num_clients: int):
  """Each client's number of trained blocks from ``clients.depth_choices`` / ``depth_probs`` (None = all)."""
  cl = config.clients
  if not cl.depth_choices:
    return None
  bad = [d for d in cl.depth_choices if int(d) != d or d < 1]
  if bad:
    raise ValueError(f"clients.depth_choices {tuple(cl.depth_choices)} must be integers >= 1")
  return sample_client_ranks(num_clients, rank_choices=cl.depth_choices, rank_probs=cl.depth_probs or None,
                             seed=config.seed + 1)


def _plain(v):
  if isinstance(v, (list, tuple)):
    return tuple(_plain(x) for x in v)
  return v


def algorithm_kwargs(config, num_clients: int) -> dict:
  """Keyword arguments for the algorithm builder.

  The method's own section (``config.<algorithm>``, e.g. ``config.hetlora``) is passed
  as is, every key checked against the builder's signature; shared values are passed
  to builders that take them: ``client_optimizer``, ``server_optimizer``, ``r_max``
  (lora.rank), ``lora_alpha``, ``lora_scale`` (alpha / rank), ``client_ranks``
  (sampled from ``clients``), ``num_clients``, ``seed``, ``client_learning_rate``
  and ``local_steps``.
  """
  name = config.algorithm
  builder = algorithms_lib.get_algorithm(name)
  params = inspect.signature(builder).parameters
  kwargs: dict[str, Any] = {}
  section = config.get(name) if name in config else None
  if section is not None:
    for k, v in section.items():
      if k not in params or k == "loss_fn":
        allowed = [p for p in params if p not in ("loss_fn",) and params[p].kind == inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"config.{name}.{k} is not a parameter of {name}; allowed: {', '.join(allowed)}")
      kwargs[k] = _plain(v.to_dict() if hasattr(v, "to_dict") else v)
  shared = {
      "client_optimizer": lambda: make_client_optimizer(config.client_optimizer),
      "server_optimizer": lambda: make_server_optimizer(config.server_optimizer),
      "r_max": lambda: config.lora.rank,
      "lora_alpha": lambda: config.lora.alpha,
      "lora_scale": lambda: config.lora.alpha / config.lora.rank,
      "client_ranks": lambda: client_ranks_from_config(config, num_clients),
      "num_clients": lambda: num_clients,
      "seed": lambda: config.seed,
      "client_learning_rate": lambda: config.client_optimizer.learning_rate,
      "local_steps": lambda: config.fl.local_steps,
      "client_depths": lambda: client_depths_from_config(config, num_clients),
  }
  for k, make in shared.items():
    if k in params and k not in kwargs:
      kwargs[k] = make()
  return kwargs


def make_algorithm(config, loss_fn, num_clients: int):
  builder = algorithms_lib.get_algorithm(config.algorithm)
  return builder(loss_fn, **algorithm_kwargs(config, num_clients))


WEIGHTINGS = ("dataset_tokens", "round_tokens", "uniform")


def client_weights(kind: str, ids: np.ndarray, round_tokens: np.ndarray, dataset_tokens: np.ndarray) -> np.ndarray:
  """Unnormalized aggregation weights p_k of a cohort (0 for empty slots).

  ``dataset_tokens``: the client's training-set size in tokens (FedAvg's n_k);
  ``round_tokens``: target tokens it trained on this round; ``uniform``: 1 each.
  """
  present = ids >= 0
  if kind == "dataset_tokens":
    w = dataset_tokens[np.maximum(ids, 0)].astype(np.float32)
  elif kind == "round_tokens":
    w = np.asarray(round_tokens, np.float32)
  elif kind == "uniform":
    w = np.ones(ids.shape, np.float32)
  else:
    raise ValueError(f"unknown fl.client_weighting {kind!r}; allowed: {', '.join(WEIGHTINGS)}")
  return np.where(present, w, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- evaluation


def _row_nll(logits, tokens, mask):
  """Per-row (nll_sum [B], target count [B])."""
  return jax.vmap(lambda l, t, m: token_nll(l[None], t[None], m[None]))(logits, tokens, mask)


def build_eval(peft, batch_size: int):
  """jit(base, trainable, tokens[N,T], mask[N,T]) -> per-row (nll_sum[N], count[N]), N a multiple of batch_size."""

  @jax.jit
  def evaluate(base, trainable, tokens, mask):
    n = tokens.shape[0]
    tb = tokens.reshape((n // batch_size, batch_size) + tokens.shape[1:])
    mb = mask.reshape((n // batch_size, batch_size) + mask.shape[1:])

    def body(_, xs):
      return None, _row_nll(peft.apply(base, trainable, xs[0]), xs[0], xs[1])

    _, (s, c) = jax.lax.scan(body, None, (tb, mb))
    return s.reshape(n), c.reshape(n)

  return evaluate


def build_personal_eval(peft, algorithm):
  """jit(base, server_state, client_states[C], tokens[C,M,T], mask[C,M,T]) -> (nll_sum[C], count[C]).

  Each client's rows are scored with ``algorithm.personal_params`` (row by row, so a
  method can weight its parts per instance); clients run one after another (lax.map).
  """

  @jax.jit
  def evaluate(base, server_state, client_states, tokens, mask):
    def one_client(xs):
      cs, tok, msk = xs

      def one_row(t, m):
        params = algorithm.personal_params(base, server_state, cs, t, m)
        s, c = token_nll(peft.apply(base, params, t[None]), t[None], m[None])
        return jnp.where(c > 0, s, 0.0), c  # padded rows add nothing, even if a method returns NaN there

      s, c = jax.vmap(one_row)(tok, msk)
      return jnp.sum(s), jnp.sum(c)

    return jax.lax.map(one_client, (client_states, tokens, mask))

  return evaluate


def build_classification_eval(peft, batch_size: int, label_token_ids=None):
  """jit(base, trainable, tokens[N,T+1], mask[N,T+1]) -> per-row (cross-entropy[N], predicted class[N])."""

  @jax.jit
  def evaluate(base, trainable, tokens, mask):
    n = tokens.shape[0]
    tb = tokens.reshape((n // batch_size, batch_size) + tokens.shape[1:])
    mb = mask.reshape((n // batch_size, batch_size) + mask.shape[1:])

    def body(_, xs):
      logits = classification_logits(peft, base, trainable, xs[0], xs[1], label_token_ids=label_token_ids)
      return None, (row_cross_entropy(logits, xs[0]), jnp.argmax(logits, axis=-1))

    _, (ce, pred) = jax.lax.scan(body, None, (tb, mb))
    return ce.reshape(n), pred.reshape(n)

  return evaluate


def build_personal_classification_eval(peft, algorithm, label_token_ids=None):
  """jit(base, server_state, client_states[C], tokens[C,M,T+1], mask[C,M,T+1]) -> (ce[C,M], pred[C,M])."""

  @jax.jit
  def evaluate(base, server_state, client_states, tokens, mask):
    def one_client(xs):
      cs, tok, msk = xs

      def one_row(t, m):
        params = algorithm.personal_params(base, server_state, cs, t, m)
        logits = classification_logits(peft, base, params, t[None], m[None], label_token_ids=label_token_ids)
        ce = row_cross_entropy(logits, t[None])[0]
        return jnp.where(m[-1] > 0, ce, 0.0), jnp.argmax(logits[0])

      return jax.vmap(one_row)(tok, msk)

    return jax.lax.map(one_client, (client_states, tokens, mask))

  return evaluate


def classification_stats(prefix: str, ce, pred, labels, client_index, num_classes: int) -> dict:
  """Cross-entropy, accuracy and macro-F1, global and per client (real rows only)."""
  from fedjax_llm.data.classification import classification_metrics
  ce = np.asarray(ce, np.float64)
  out = {f"{prefix}loss": float(ce.mean()) if ce.size else float("nan")}
  out.update(classification_metrics(prefix, np.asarray(pred), np.asarray(labels), np.asarray(client_index),
                                    num_classes))
  return out


def per_client_rows(tokens: np.ndarray, mask: np.ndarray, client_index: np.ndarray, ids: np.ndarray):
  """Regroup eval rows by client: (tokens [C,M,T], mask [C,M,T]) with M the most rows of a client."""
  groups = [np.nonzero(client_index == i)[0] for i in ids]
  m = max([1] + [len(g) for g in groups])
  t = np.zeros((len(ids), m, tokens.shape[1]), tokens.dtype)
  k = np.zeros((len(ids), m, tokens.shape[1]), mask.dtype)
  for j, g in enumerate(groups):
    t[j, :len(g)] = tokens[g]
    k[j, :len(g)] = mask[g]
  return t, k


def client_loss_stats(prefix: str, nll: np.ndarray, count: np.ndarray) -> dict:
  """Token-weighted loss and the distribution of per-client losses (clients with targets only)."""
  nll, count = np.asarray(nll, np.float64), np.asarray(count, np.float64)
  loss = float(nll.sum() / max(count.sum(), 1.0))
  has = count > 0
  per = nll[has] / count[has]
  out = {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}
  if per.size:
    out.update({f"{prefix}client_loss_mean": float(per.mean()), f"{prefix}client_loss_std": float(per.std()),
                f"{prefix}client_loss_p10": float(np.percentile(per, 10)),
                f"{prefix}client_loss_p50": float(np.percentile(per, 50)),
                f"{prefix}client_loss_p90": float(np.percentile(per, 90))})
  return out


# ----------------------------------------------------------------------------- outputs


class _Logger:
  def __init__(self, workdir: str, start_round: int):
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_round)
    self.path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(self.path):  # resume: drop rows past the restored round
      with open(self.path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
      rows = [r for r in rows if r["round"] <= start_round]
    self.rows = rows
    self._rewrite()

  def _rewrite(self):
    with open(self.path, "w") as f:
      for r in self.rows:
        f.write(json.dumps(r) + "\n")

  def log(self, round_idx: int, scalars: dict):
    row = {"round": round_idx, **{k: float(v) for k, v in scalars.items()}}
    self.rows.append(row)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self.writer.add_scalar(k, float(v), round_idx)
    self.writer.flush()

  def close(self):
    self.writer.close()


def plot_curves(rows: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  tr = [(r["round"], r["train/loss"]) for r in rows if "train/loss" in r]
  ev = [(r["round"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  if tr:
    ax.plot(*zip(*tr), label="train loss (cohort, during local training)", alpha=0.7)
  if ev:
    ax.plot(*zip(*ev), "o-", label="held-out loss (global model)")
  pe = [(r["round"], r["eval/personal_loss"]) for r in rows if "eval/personal_loss" in r]
  if pe:
    ax.plot(*zip(*pe), "x--", label="held-out loss (each client's personalized model)")
  ax.set_xlabel("round")
  ax.set_ylabel("next-token NLL (nats)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- run

STANDARD_METRICS = ("train_loss", "sum_tokens", "sum_bytes_up", "sum_bytes_down", "update_norm", "clients")

# Fields that may change between a run and its resumption: they leave the checkpointed state's meaning and
# structure intact (client optimizer state is rebuilt every round; the server's learning rate is not in its
# state). Prefixes ending in "." cover a whole group.
RESUMABLE_CHANGES = ("fl.num_rounds", "eval.", "checkpoint_every", "log_every", "client_optimizer.",
                     "server_optimizer.learning_rate", "mesh.", "distributed")


def _resumable(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def check_resume_config(config, workdir: str, *, resuming: bool) -> None:
  """Write ``workdir/config.json``; when resuming, refuse a config that changes the trajectory."""
  path = os.path.join(workdir, "config.json")
  now = _flatten(json.loads(config.to_json()))
  if resuming and os.path.exists(path):
    with open(path) as f:
      before = _flatten(json.load(f))
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    fmt = lambda keys: "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys)
    refused = [k for k in changed if not _resumable(k)]
    if refused:
      raise ValueError(f"{workdir} holds checkpoints of a different config ({fmt(refused)}); use a new --workdir, "
                       f"or change only {', '.join(p + '*' if p.endswith('.') else p for p in RESUMABLE_CHANGES)} "
                       f"when resuming")
    if changed:
      print(f"[fedjax_llm] resuming with changed settings ({fmt(changed)})", flush=True)
  with open(path, "w") as f:
    f.write(config.to_json(indent=2))



def make_mesh(config):
  """The client mesh of ``config.mesh`` (None for one device); ``config.distributed`` joins a multi-host run first."""
  if config.get("distributed", False) and jax.process_count() == 1:
    jax.distributed.initialize()  # coordinator, process count and id from the launcher's environment (TPU, SLURM, ...)
  m = config.get("mesh")
  devices = 0 if m is None else int(m.devices)
  model = 1 if m is None else int(m.model)
  n = len(jax.devices()) if devices == 0 else devices
  if n == 1 and model == 1:
    return None
  return round_lib.client_mesh(n, model=model)


def run(config, workdir: str, *, progress: bool = True, stop_after_round: int | None = None) -> dict:
  """Train ``config`` in ``workdir``; resumes from the latest checkpoint there.

  Args:
    stop_after_round: stop (as if killed) right after this round is done and
      checkpointed, without the final evaluation (for resume tests).
  Returns:
    the summary dict (also written to ``workdir/summary.json``).
  """
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  fl = config.fl
  mesh = make_mesh(config)
  if fl.cohort_size < 1 or fl.chunk_size < 1 or fl.local_steps < 1 or fl.batch_size < 1:
    raise ValueError(f"fl.cohort_size, fl.chunk_size, fl.local_steps, fl.batch_size must be >= 1, got "
                     f"{fl.cohort_size}, {fl.chunk_size}, {fl.local_steps}, {fl.batch_size}")
  algorithms_lib.get_algorithm(config.algorithm)  # fail fast on an unknown name
  _choice("fl.client_weighting", fl.client_weighting, WEIGHTINGS)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  start = ckpt.latest_round() or 0
  check_resume_config(config, workdir, resuming=bool(start))  # before the slow model load

  # Data source (classification needs its classes before the model's head is built).
  classify = config.task == "classification"
  _choice("task", config.task, ("lm", "classification"))
  dataset = load_classification_dataset(config.data) if classify else None
  num_classes = len(dataset.class_names) if classify else 0

  # Model + PEFT.
  model, tokenizer, kind = load_model(config.model, config.seed, num_classes=num_classes,
                                      pooling=config.head.pooling)
  if not classify and kind == "encoder":
    raise ValueError(f"model {config.model.name!r} is an encoder; task='lm' needs a decoder (e.g. smollm2-135m)")
  plan = peft_plan(model, config, tokenizer, head=classify and kind == "encoder" and config.head.trainable)
  prompt_rows = config.prompt.length + config.prompt.local_length if "prompt" in plan.methods else 0
  from fedjax_llm.peft.common import trunk
  max_len = trunk(model).config.max_position_embeddings - prompt_rows
  lora_paths = list(plan.lora_paths)
  builder = algorithms_lib.get_algorithm(config.algorithm)
  if getattr(builder, "mutable_base", False):  # the method changes the targeted kernels: they join the trainable tree
    if not lora_paths:
      raise ValueError(f"{config.algorithm} changes LoRA-targeted kernels: peft.methods must include 'lora'")
    targeted = set(lora_paths)
    kernel_filter = lambda path, _: (path[-1] == "kernel" and "/".join(str(p) for p in path[:-1]) in targeted)
    peft, base, trainable = split_model(model, nnx.Any(plan.filter, kernel_filter))
  else:
    peft, base, trainable = split_model(model, plan.filter)
  del model

  # Data.
  if classify:
    data, label_ids = load_classification_data(config, dataset, tokenizer, kind, max_len, prompt_rows)
  else:
    data, label_ids = load_data(config.data, tokenizer, max_len, prompt_rows), None
  num_clients = data.num_clients
  if fl.cohort_size > num_clients:
    raise ValueError(f"fl.cohort_size={fl.cohort_size} > number of clients {num_clients}")
  shards = 1 if mesh is None else mesh.shape[round_lib.CLIENT_AXIS]
  chunk = min(fl.chunk_size, -(-fl.cohort_size // shards))  # per device; no chunk larger than a shard's clients
  padded_c = sampling.padded_cohort_size(fl.cohort_size, chunk * shards)  # empty slots: weight 0
  n_eval = config.eval.num_clients or num_clients
  eval_ids = federated.select_eval_clients(num_clients, min(n_eval, num_clients), config.seed)
  ev_rows = data.eval_batches(eval_ids, config.eval.max_seqs_per_client or None)
  ev = federated.pad_to_multiple(ev_rows, config.eval.batch_size)
  eval_tokens, eval_mask = jnp.asarray(ev["tokens"]), jnp.asarray(ev["mask"])
  n_rows = len(ev_rows["client_index"])
  row_client = np.searchsorted(eval_ids, ev_rows["client_index"]) if n_rows else np.zeros(0, np.int64)

  # Algorithm, state, compiled round.
  loss_fn = make_classification_loss(peft, label_token_ids=label_ids) if classify else make_lm_loss(peft)
  algorithm = make_algorithm(config, loss_fn, num_clients)
  key = jax.random.key(config.seed)
  server_state = algorithm.init(trainable, jax.random.fold_in(key, 1))
  client_store = store_lib.init_store(algorithm.init_client, trainable, num_clients)
  if mesh is not None:  # cohort and store split over the client axis, base and server state on every shard
    base = round_lib.shard_base(mesh, base)
    server_state = round_lib.place(server_state, lambda x: round_lib.replicated(mesh))
    client_store = round_lib.shard_clients(mesh, client_store)
  round_step = build_round(algorithm, chunk_size=chunk, mesh=mesh)
  if classify:
    evaluate = build_classification_eval(peft, config.eval.batch_size, label_ids)
  else:
    evaluate = build_eval(peft, config.eval.batch_size)
  personal = algorithm.personal_params is not None
  if personal:
    evaluate_personal = (build_personal_classification_eval(peft, algorithm, label_ids) if classify
                         else build_personal_eval(peft, algorithm))
    pt, pm = per_client_rows(ev_rows["tokens"], ev_rows["mask"], ev_rows["client_index"], eval_ids)
    personal_tokens, personal_mask = jnp.asarray(pt), jnp.asarray(pm)
    personal_ids = jnp.asarray(eval_ids)
    if mesh is not None:  # global (replicated) arrays: what a multi-host jit needs next to the placed base
      personal_tokens, personal_mask, personal_ids = round_lib.place(
          (personal_tokens, personal_mask, personal_ids), lambda x: round_lib.replicated(mesh))
  if mesh is not None:
    eval_tokens, eval_mask = round_lib.place((eval_tokens, eval_mask), lambda x: round_lib.replicated(mesh))

  if start:
    (server_state, client_store), _ = ckpt.restore(start, (server_state, client_store))
  logger = _Logger(workdir, start)
  setup_s = time.time() - t_start

  def run_eval(r: int) -> dict:
    """Global model on the held-out rows (token-weighted and per client); personalized models if any."""
    a, b = jax.device_get(evaluate(base, algorithm.eval_params(server_state), eval_tokens, eval_mask))
    a, b = np.asarray(a)[:n_rows], np.asarray(b)[:n_rows]
    if classify:
      labels = np.asarray(ev_rows["tokens"])[:, -1]
      out = classification_stats("eval/", a, b, labels, row_client, num_classes)
    else:
      per_s = np.bincount(row_client, weights=a, minlength=len(eval_ids))
      per_c = np.bincount(row_client, weights=b, minlength=len(eval_ids))
      out = client_loss_stats("eval/", per_s, per_c)
    if personal:
      states = store_lib.gather(client_store, personal_ids)
      ps, pc = jax.device_get(evaluate_personal(base, server_state, states, personal_tokens, personal_mask))
      if classify:
        real = np.asarray(pm)[..., -1] > 0
        labels = np.asarray(pt)[..., -1][real]
        cidx = np.broadcast_to(np.arange(len(eval_ids))[:, None], real.shape)[real]
        out.update(classification_stats("eval/personal_", np.asarray(ps)[real], np.asarray(pc)[real], labels,
                                        cidx, num_classes))
      else:
        out.update(client_loss_stats("eval/personal_", ps, pc))
    logger.log(r, out)
    return out

  trainable_bytes = T.tree_bytes(trainable)
  print(f"[fedjax_llm] {config.algorithm}: model={config.model.name} ({config.task}) "
        f"PEFT {'+'.join(list(plan.methods) + (['head'] if classify and kind == 'encoder' and config.head.trainable else []))} "
        f"({T.tree_size(trainable):,} trainable params), {num_clients} clients, cohort {fl.cohort_size} "
        f"(chunk {chunk}{'' if mesh is None else f' x {shards} client shards, padded to {padded_c}'}), {fl.local_steps}x{fl.batch_size}x{config.data.seq_len} tokens/client/round; "
        f"setup {setup_s:.1f}s" + (f"; resumed at round {start}" if start else ""), flush=True)

  last_eval = run_eval(start) if start == 0 else {}
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=fl.num_rounds, initial=start, desc=config.algorithm, unit="round", dynamic_ncols=True)
  train_loss = float("nan")
  round_times = []
  for r in range(start, fl.num_rounds):
    t0 = time.time()
    ids = sampling.sample_cohort(num_clients, fl.cohort_size, seed=config.seed, round_idx=r, padded_size=padded_c)
    b = data.client_batches(ids, fl.local_steps, fl.batch_size, config.seed, r)
    cohort = CohortData(tokens=jnp.asarray(b["tokens"]), mask=jnp.asarray(b["mask"]),
                        num_steps=jnp.asarray(b["num_steps"]), num_tokens=jnp.asarray(b["num_tokens"]),
                        weights=jnp.asarray(client_weights(fl.client_weighting, ids, b["num_tokens"],
                                                            data.num_train_tokens)))
    ids_in = jnp.asarray(ids)
    if mesh is not None:
      ids_in, cohort = round_lib.shard_clients(mesh, (ids, jax.tree.map(np.asarray, cohort)))
    new_server, new_store, metrics = round_step(base, server_state, client_store, ids_in, cohort,
                                                jax.random.fold_in(key, 1000 + r))
    metrics = jax.device_get(metrics)
    dt = time.time() - t0
    train_loss = float(metrics["train_loss"])
    if not (math.isfinite(train_loss) and bool(T.tree_all_finite(new_server.params))
            and bool(T.tree_all_finite(new_server.extra)) and bool(T.tree_all_finite(new_store))):
      kept = ckpt.latest_round()
      if bar is not None:
        bar.close()
      raise TrainingError(f"non-finite training loss ({train_loss}) or parameters (server or client store) at round {r + 1}; "
                          f"stopping. Last good checkpoint: "
                          f"{'round ' + str(kept) if kept else 'none'} in {ckpt.directory} "
                          f"(lower client_optimizer.learning_rate={config.client_optimizer.learning_rate} "
                          f"or enable grad_clip, then re-run: it resumes from that checkpoint)")
    server_state, client_store = new_server, new_store
    round_times.append(dt)
    done = r + 1
    scalars = {"train/loss": train_loss, "round_time_s": dt,
               "tokens_per_s": float(metrics["sum_tokens"]) / dt,
               "comm/bytes_up": float(metrics["sum_bytes_up"]), "comm/bytes_down": float(metrics["sum_bytes_down"]),
               "comm/bytes_up_per_client": float(metrics["sum_bytes_up"]) / max(float(metrics["clients"]), 1.0),
               "server/update_norm": float(metrics["update_norm"])}
    for k, v in metrics.items():  # method-specific metrics (client ranks, pruned clients, sparsity, ...)
      if k not in STANDARD_METRICS:
        scalars[f"clients/{k}"] = float(v)
    if done % config.log_every == 0 or done == fl.num_rounds:
      logger.log(done, scalars)
    if done % config.eval.every == 0 or done == fl.num_rounds:
      last_eval = run_eval(done)
    stopping = stop_after_round is not None and done >= stop_after_round and done < fl.num_rounds
    if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == fl.num_rounds or stopping:
      ckpt.save(done, (server_state, client_store), {"round": done})
    if bar is not None:
      bar.set_postfix(loss=f"{train_loss:.3f}", heldout=f"{last_eval.get('eval/loss', float('nan')):.3f}",
                      round_s=f"{dt:.2f}")
      bar.update(1)
    if stopping:  # simulate a kill right after this round's checkpoint (tests)
      if bar is not None:
        bar.close()
      logger.close()
      ckpt.close()
      return {"stopped_at_round": done}
  if bar is not None:
    bar.close()

  evals = [row for row in logger.rows if "eval/loss" in row]
  summary = {
      "algorithm": config.algorithm, "model": config.model.name, "rounds": fl.num_rounds,
      "num_clients": num_clients, "cohort_size": fl.cohort_size,
      "final_eval_loss": evals[-1]["eval/loss"] if evals else None,
      "final_eval_perplexity": evals[-1].get("eval/perplexity") if evals else None,
      "final_eval": {k: v for k, v in evals[-1].items() if k != "round"} if evals else {},
      "final_personal_loss": evals[-1].get("eval/personal_loss") if evals else None,
      "task": config.task, "peft": list(plan.methods),
      "final_accuracy": evals[-1].get("eval/accuracy") if evals else None,
      "final_macro_f1": evals[-1].get("eval/macro_f1") if evals else None,
      "initial_accuracy": evals[0].get("eval/accuracy") if evals else None,
      "final_personal_accuracy": evals[-1].get("eval/personal_accuracy") if evals else None,
      "total_bytes_up": float(sum(r.get("comm/bytes_up", 0.0) for r in logger.rows)),
      "total_bytes_down": float(sum(r.get("comm/bytes_down", 0.0) for r in logger.rows)),
      "mean_bytes_up_per_client_round": float(np.mean([r["comm/bytes_up_per_client"] for r in logger.rows
                                                       if "comm/bytes_up_per_client" in r] or [0.0])),
      "initial_eval_loss": evals[0]["eval/loss"] if evals else None,
      "final_train_loss": train_loss,
      "trainable_params": T.tree_size(trainable), "trainable_bytes": trainable_bytes,
      "mean_round_time_s": float(np.mean(round_times[1:] if len(round_times) > 1 else round_times))
      if round_times else None,
      "total_wall_s": time.time() - t_start,
      "final_params_checksum": float(sum(float(jnp.sum(jnp.abs(x))) for x in
                                         jax.tree.leaves(algorithm.eval_params(server_state)))),
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot_curves(logger.rows, os.path.join(workdir, "loss.png"), f"{config.algorithm} on {config.model.name}")
  logger.close()
  ckpt.close()
  return summary
