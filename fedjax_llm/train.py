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
from fedjax_llm.core.round import CohortData, build_round
from fedjax_llm.data import federated
from fedjax_llm.optim import add_proximal, fedopt_adaptive
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft.base import make_lm_loss, split_model, token_nll

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


def load_model(model_cfg, seed: int):
  """(nnx model, tokenizer) for ``model_cfg.name``."""
  from fedjax_llm import models
  if model_cfg.name == "tiny-random":  # tests and smoke runs only: a random 2-layer Llama over bytes
    from fedjax_llm.models.byte_tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    cfg = models.tiny_llama_config(vocab_size=tok.vocab_size, max_position_embeddings=256,
                                   dtype=model_cfg.dtype, remat=model_cfg.remat)
    return models.random_llama(cfg, seed=seed), tok
  return models.load_pretrained(model_cfg.name, dtype=model_cfg.dtype, remat=model_cfg.remat, seed=seed)


def load_data(data_cfg, tokenizer, max_len: int):
  from fedjax_llm.data import federated, shakespeare
  _choice("dataset", data_cfg.dataset, {"shakespeare"})
  if data_cfg.seq_len > max_len:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} is longer than the model's context "
                     f"({max_len} tokens); allowed: 2..{max_len}")
  if data_cfg.seq_len < 2:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} must be >= 2 (a token and its successor)")
  clients = shakespeare.load_shakespeare(min_chars=data_cfg.min_chars, heldout_fraction=data_cfg.heldout_fraction,
                                         plays=list(data_cfg.plays) or None)
  if not clients:
    raise ValueError(f"no Shakespeare client has >= {data_cfg.min_chars} characters; lower data.min_chars")
  return federated.FederatedTokenData.from_texts(
      clients, tokenizer.encode, tokenizer.eos_id, data_cfg.seq_len,
      max_train_seqs_per_client=data_cfg.max_train_seqs_per_client or None)


def client_ranks_from_config(config, num_clients: int) -> np.ndarray:
  """Each client's LoRA rank from its capability level (``clients.rank_choices`` / ``rank_probs``)."""
  cl = config.clients
  bad = [r for r in cl.rank_choices if r > config.lora.rank]
  if bad:
    raise ValueError(f"clients.rank_choices {tuple(cl.rank_choices)} has rank {max(bad)} > r_max "
                     f"lora.rank={config.lora.rank}; allowed ranks: 1..{config.lora.rank}")
  return sample_client_ranks(num_clients, rank_choices=cl.rank_choices, rank_probs=cl.rank_probs or None,
                             seed=config.seed)


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
                     "server_optimizer.learning_rate")


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
  if fl.cohort_size < 1 or fl.chunk_size < 1 or fl.local_steps < 1 or fl.batch_size < 1:
    raise ValueError(f"fl.cohort_size, fl.chunk_size, fl.local_steps, fl.batch_size must be >= 1, got "
                     f"{fl.cohort_size}, {fl.chunk_size}, {fl.local_steps}, {fl.batch_size}")
  algorithms_lib.get_algorithm(config.algorithm)  # fail fast on an unknown name
  _choice("fl.client_weighting", fl.client_weighting, WEIGHTINGS)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  start = ckpt.latest_round() or 0
  check_resume_config(config, workdir, resuming=bool(start))  # before the slow model load

  # Model + PEFT.
  model, tokenizer = load_model(config.model, config.seed)
  max_len = model.config.max_position_embeddings
  lora_paths = lora_lib.apply_lora(model, target=config.lora.target, rank=config.lora.rank,
                                   alpha=config.lora.alpha, dropout=config.lora.dropout, seed=config.seed)
  builder = algorithms_lib.get_algorithm(config.algorithm)
  if getattr(builder, "mutable_base", False):  # the method changes the targeted kernels: they join the trainable tree
    targeted = set(lora_paths)
    kernel_filter = lambda path, _: (path[-1] == "kernel" and "/".join(str(p) for p in path[:-1]) in targeted)
    peft, base, trainable = split_model(model, nnx.Any(nnx.LoRAParam, kernel_filter))
  else:
    peft, base, trainable = split_model(model, nnx.LoRAParam)
  del model

  # Data.
  data = load_data(config.data, tokenizer, max_len)
  num_clients = data.num_clients
  if fl.cohort_size > num_clients:
    raise ValueError(f"fl.cohort_size={fl.cohort_size} > number of clients {num_clients}")
  padded_c = sampling.padded_cohort_size(fl.cohort_size, fl.chunk_size)
  eval_ids = federated.select_eval_clients(num_clients, min(config.eval.num_clients, num_clients), config.seed)
  ev_rows = data.eval_batches(eval_ids, config.eval.max_seqs_per_client)
  ev = federated.pad_to_multiple(ev_rows, config.eval.batch_size)
  eval_tokens, eval_mask = jnp.asarray(ev["tokens"]), jnp.asarray(ev["mask"])
  n_rows = len(ev_rows["client_index"])
  row_client = np.searchsorted(eval_ids, ev_rows["client_index"]) if n_rows else np.zeros(0, np.int64)

  # Algorithm, state, compiled round.
  loss_fn = make_lm_loss(peft)
  algorithm = make_algorithm(config, loss_fn, num_clients)
  key = jax.random.key(config.seed)
  server_state = algorithm.init(trainable, jax.random.fold_in(key, 1))
  client_store = store_lib.init_store(algorithm.init_client, trainable, num_clients)
  round_step = build_round(algorithm, chunk_size=fl.chunk_size)
  evaluate = build_eval(peft, config.eval.batch_size)
  personal = algorithm.personal_params is not None
  if personal:
    evaluate_personal = build_personal_eval(peft, algorithm)
    pt, pm = per_client_rows(ev_rows["tokens"], ev_rows["mask"], ev_rows["client_index"], eval_ids)
    personal_tokens, personal_mask = jnp.asarray(pt), jnp.asarray(pm)
    personal_ids = jnp.asarray(eval_ids)

  if start:
    (server_state, client_store), _ = ckpt.restore(start, (server_state, client_store))
  logger = _Logger(workdir, start)
  setup_s = time.time() - t_start

  def run_eval(r: int) -> dict:
    """Global model on the held-out rows (token-weighted and per client); personalized models if any."""
    s, c = jax.device_get(evaluate(base, algorithm.eval_params(server_state), eval_tokens, eval_mask))
    s, c = np.asarray(s)[:n_rows], np.asarray(c)[:n_rows]
    per_s = np.bincount(row_client, weights=s, minlength=len(eval_ids))
    per_c = np.bincount(row_client, weights=c, minlength=len(eval_ids))
    out = client_loss_stats("eval/", per_s, per_c)
    if personal:
      states = store_lib.gather(client_store, personal_ids)
      ps, pc = jax.device_get(evaluate_personal(base, server_state, states, personal_tokens, personal_mask))
      out.update(client_loss_stats("eval/personal_", ps, pc))
    logger.log(r, out)
    return out

  trainable_bytes = T.tree_bytes(trainable)
  print(f"[fedjax_llm] {config.algorithm}: model={config.model.name} LoRA on {len(lora_paths)} layers "
        f"({T.tree_size(trainable):,} trainable params), {num_clients} clients, cohort {fl.cohort_size} "
        f"(chunk {fl.chunk_size}), {fl.local_steps}x{fl.batch_size}x{config.data.seq_len} tokens/client/round; "
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
    new_server, new_store, metrics = round_step(base, server_state, client_store, jnp.asarray(ids), cohort,
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
      "final_eval_perplexity": evals[-1]["eval/perplexity"] if evals else None,
      "final_eval": {k: v for k, v in evals[-1].items() if k != "round"} if evals else {},
      "final_personal_loss": evals[-1].get("eval/personal_loss") if evals else None,
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
