"""Shared pieces of the configs in `configs/`.

Every hyper-parameter of the method is a field here, so any of them can be overridden on the
command line (`--config.loss.tau=0.1`). Fields tagged [ours] in docs/method.md are our
reconstruction of the paper; they are options so that users can switch them.

Variants are chosen with a `:arg` suffix on the config path, e.g. `configs/seqattr.py:demo`.
"""

import ml_collections

from cmil_jax import labels


def base_config() -> ml_collections.ConfigDict:
    """Paper recipe (method.md section 7) for the Seq-DeepFake subsets."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"
    c.model.backbone_width = 64  # base width of ResNets (64 = torchvision)
    c.model.dilate_last = False  # [ours] stride 16 instead of 32 in the last stage
    c.model.width = 384  # [ours] transformer width d
    c.model.num_heads = 6  # [ours]
    c.model.mlp_ratio = 4.0  # [ours]
    c.model.embed_dim = 128  # [ours] MIL embedding size d_e
    c.model.patch_pool = "mean"  # [ours] z^V pooling: mean | lse | max
    c.model.pool_temperature = 1.0  # [ours] temperature of the lse pooling
    c.model.mil_bias_init = 0.5  # [ours] initial b of the MIL fake probability
    c.model.num_class_tokens = labels.NUM_CLASSES  # K = C (paper); 1 in binary mode
    c.model.num_classes = labels.NUM_CLASSES  # C
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

    # How this machine computes the model, never what (cmil_jax/runtime/__init__.py): resolved
    # once at start-up, logged, and recorded in config.json under "resolved_runtime".
    c.runtime = ml_collections.ConfigDict()
    # ResNet layers: auto | xla | matmul | onednn. auto = xla on GPU/TPU; on CPU onednn
    # (oneDNN convolutions and BatchNorm + ReLU; the `onednn` extra) where it can be built and
    # model.dtype is float32, else matmul. The same choice for any number of devices.
    c.runtime.kernels = "auto"
    # XLA:CPU's convolution kernels: default (XLA's choice) | eigen (its Eigen kernels, which run
    # convolutions of 64 or fewer output channels on every core; YNNPACK runs them on one).
    # Ignored off the CPU, and moot for the convolutions of the onednn kernels.
    c.runtime.xla_cpu_conv = "default"
    # Host memory: keep (reuse freed memory instead of mapping fresh pages every XLA:CPU step)
    # | default (glibc's settings) | auto (keep where JAX runs on the CPU).
    c.runtime.host_malloc = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.name = "seq_deepfake/facial_attributes"  # TFDS name/config
    c.data.subset = "facial_attributes"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.image_size = 256
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"
    c.data.triples = False  # genuine / SBI / fake triples (method.md section 5)
    # [ours] the SBI image's sequence target: 'zeros' (all-zero sequence, method.md section 5)
    # or 'masked' (has_seq 0: it trains L_CLS only, like a binary-only sample).
    c.data.sbi_labels = "zeros"
    # Joint training (method.md section 5, Table A2): a second, binary-only TFDS dataset (e.g.
    # "ffpp/c23") mixed into every training batch; its samples have has_seq = 0, so only L_CLS
    # sees them [ours: masking]. "" = off. joint_fraction: its share of each batch [ours].
    c.data.joint_name = ""
    c.data.joint_fraction = 0.5
    c.data.joint_eval_split = "val"  # evaluated with each val pass (keys joint_*); "" = never
    c.data.joint_test_split = "test"  # tested with the best checkpoints; "" = never
    c.data.num_workers = 8  # grain worker processes (0 = in the main process)
    c.data.prefetch = 2  # batches kept on the device ahead of the step
    # Training skips unreadable/malformed records (replaced by the next good one, listed in
    # <workdir>/bad_records*.jsonl, counted in the train metrics) and stops when more than
    # this many were skipped; 0 = fail on the first one. Evaluation always fails on them.
    c.data.max_bad_records = 100
    # Built-in synthetic data (only read when data.name starts with "cmil_synthetic").
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_train = 20000
    c.data.synthetic.num_val = 1000
    c.data.synthetic.num_test = 2000
    c.data.synthetic.seed = 0
    # Weak augmentation (method.md section 5); fields of cmil_jax.data.augment.AugmentConfig.
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.flip_p = 0.5
    c.data.augment.crop_mode = "resized"  # resized | pad | none
    c.data.augment.crop_p = 1.0
    c.data.augment.crop_scale = (0.8, 1.0)  # area fraction of the random-resized crop
    c.data.augment.crop_ratio = (0.9, 1.0 / 0.9)
    c.data.augment.crop_pad = 0.0625  # pad mode: reflection padding, fraction of the side
    c.data.augment.jitter_p = 0.8
    c.data.augment.brightness = 0.15
    c.data.augment.contrast = 0.15
    c.data.augment.saturation = 0.15
    c.data.augment.hue = 0.02  # fraction of the colour circle
    c.data.augment.blur_p = 0.2
    c.data.augment.blur_sigma = (0.1, 1.2)

    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 1.0  # weight of L_CLS [paper]
    c.loss.lambda1 = 1.0  # weight of L_BCE^U + L_BCE^V [paper]
    c.loss.lambda2 = 1.0  # weight of L_Rank [paper]
    c.loss.tau = 0.2  # temperature of the sorted-similarity MIL [paper]
    c.loss.num_lowest = 0  # M_k lowest similarities used; 0 = N (patch count) [ours]
    c.loss.rank_order = "first_high"  # first_high | last_high [ours]
    c.loss.use_rank = True  # False in binary mode

    c.train = ml_collections.ConfigDict()
    c.train.init_from = ""  # directory of converted backbone weights (optional)
    c.train.batch_size = 64  # global batch of training examples (triples mode: triples)
    c.train.num_epochs = 200  # used when num_steps == 0
    c.train.num_steps = 0
    c.train.lr = 1e-4
    c.train.backbone_lr_mult = 0.1
    c.train.weight_decay = 0.05
    c.train.warmup_steps = 1000  # [ours]
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip = 0.0  # global-norm clip; 0 = off
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 2
    # A step with a NaN/Inf loss or gradient is skipped (no update; counted as 'nonfinite' in
    # the train metrics). This many in a row stop the run (checked every log_every steps);
    # 0 = never stop.
    c.train.max_nonfinite_steps = 10
    c.train.debug_nonfinite_steps = ""  # testing hook: steps whose loss is set to NaN, "3,7-9"

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    c.eval.threshold = 0.5  # p_k > threshold -> class k predicted [ours]
    c.eval.gate_by_fake_prob = False  # zero the sequence when the MIL p(x) < 0.5 [ours]
    c.eval.select_metrics = "fixed_acc,adaptive_acc"  # best checkpoint kept per metric (on val)
    c.eval.video_auc = True  # video-level AUC/EER/AP when records carry video ids
    return c


def seq_config(subset: str, arg: str | None) -> ml_collections.ConfigDict:
    """Config for a Seq-DeepFake subset; `arg` = None | 'demo' (triples, 72 px) |
    'demo_single' (the former demo: single images at 96 px, docs/method.md)."""
    c = base_config()
    c.data.subset = subset
    c.data.name = f"seq_deepfake/{subset}"
    if arg in (None, "", "paper"):
        c.data.triples = True  # method.md section 5; batch_size counts triples (examples)
        return c
    if arg == "demo":
        return apply_triples_demo(apply_demo(c))
    if arg == "demo_single":
        return apply_demo(c)
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'demo' or 'demo_single'")


def apply_triples_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Seq-DeepFake demos on training triples within 10 minutes on 2 CPU cores.

    A triple carries one sequence-labelled fake in three images and the demo's accuracy follows
    the labelled fakes it sees (docs/method.md), so the images are smaller (72 px: still a 3 x 3
    feature grid), the SBI image trains L_CLS only, and XLA:CPU computes the convolutions with
    its Eigen kernels where oneDNN is not available (runtime.xla_cpu_conv), which run the demo
    net's 32- and 64-channel convolutions on both cores.
    """
    c.data.triples = True
    c.data.image_size = 72
    c.data.sbi_labels = "masked"
    c.runtime.xla_cpu_conv = "eigen"
    c.train.batch_size = 16  # triples: 48 images a step
    # Seq-FaceComp needs the longer run; attributes are learnt faster, so their demo keeps a
    # margin on the clock (the demos' measured accuracies: docs/evaluation.md).
    c.train.num_steps = 3400 if c.data.subset == "facial_components" else 3000
    c.train.eval_every = c.train.num_steps // 2
    c.train.checkpoint_every = c.train.num_steps // 2
    return c


def apply_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Small CPU-friendly run on the built-in synthetic faces (minutes on 2 cores)."""
    c.data.name = f"cmil_synthetic/{c.data.subset}"
    c.data.data_dir = ""  # empty: <workdir>/data
    c.data.image_size = 96
    c.data.num_workers = 1
    c.data.synthetic.num_train = 6000
    c.data.synthetic.num_val = 500
    c.data.synthetic.num_test = 1000
    c.model.backbone = "resnet10"
    c.model.backbone_width = 32
    c.model.dilate_last = False  # 3x3 patches at 96 px; dilation doubles the step time here
    c.data.triples = False  # single images; the configs' demo variants choose (docs/method.md)
    c.model.width = 192
    c.model.num_heads = 6
    c.train.batch_size = 32
    c.train.num_steps = 2500
    c.train.lr = 1e-3
    c.train.backbone_lr_mult = 1.0  # no pretrained backbone in the demo
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.eval.batch_size = 100
    # Milder colour jitter and blur than the paper-scale default: the synthetic edits leave
    # faint colour traces, and the demo trains for minutes, not 200 epochs.
    c.data.augment.jitter_p = 0.5
    c.data.augment.brightness = 0.1
    c.data.augment.contrast = 0.1
    c.data.augment.saturation = 0.1
    c.data.augment.hue = 0.01
    c.data.augment.blur_p = 0.1
    return c


# ----------------------------------------------------------------------------- checks


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def per_process(global_batch: int, processes: int) -> int:
    """This process's share of a global batch."""
    if global_batch % processes:
        raise ConfigError(f"batch size {global_batch} is not divisible by {processes} processes")
    return global_batch // processes


def joint_batch_size(cfg, processes: int) -> int:
    """Per-process number of elements (images or triples) of each batch from data.joint_name."""
    return round(per_process(cfg.train.batch_size, processes) * cfg.data.joint_fraction)


def validate(cfg, devices: int, processes: int) -> None:
    """Checks what lock_config cannot: values that fit the devices and processes of this run,
    and the names of the runtime section. Raises ConfigError naming the field."""
    from cmil_jax import runtime  # pylint: disable=import-outside-toplevel

    runtime.check(cfg.runtime)
    images = cfg.train.batch_size * (3 if cfg.data.triples else 1)
    checks = [
        ("train.batch_size", images % devices == 0,
         f"the global batch ({images} images) must split evenly over the {devices} devices"),
        ("train.batch_size", cfg.train.batch_size % processes == 0,
         f"must be a multiple of the {processes} processes"),
        ("eval.batch_size", cfg.eval.batch_size % devices == 0,
         f"must be a multiple of the {devices} devices"),
        ("train.log_every", cfg.train.log_every > 0, "must be positive"),
        ("train.eval_every", cfg.train.eval_every > 0, "must be positive"),
        ("train.checkpoint_every", cfg.train.checkpoint_every > 0, "must be positive"),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps >= 0, "must be >= 0"),
        ("data.max_bad_records", cfg.data.max_bad_records >= 0, "must be >= 0"),
    ]
    if cfg.data.joint_name and cfg.train.batch_size % processes == 0:
        share = cfg.train.batch_size // processes
        checks.append((
            "data.joint_fraction", 0 < joint_batch_size(cfg, processes) < share,
            f"must leave both datasets at least one of the {share} elements of each "
            "(per-process) batch",
        ))
    for field, ok, why in checks:
        if not ok:
            section, name = field.split(".")
            raise ConfigError(f"config field {field}={cfg[section][name]}: {why}")
    parse_steps(cfg.train.debug_nonfinite_steps)


def parse_steps(spec: str) -> tuple[int, ...]:
    """'3,7-9' -> (3, 7, 8, 9); '' -> (). Used by train.debug_nonfinite_steps."""
    steps = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            steps.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as e:
        raise ConfigError(
            f"config field train.debug_nonfinite_steps={spec!r}: expected steps like '3,7-9'"
        ) from e
    return tuple(steps)


# ----------------------------------------------------------------------------- recorded configs


def load_recorded(path: str) -> ml_collections.ConfigDict:
    """The config a run recorded in its config.json (train.write_config), without the runtime
    choices it resolved to (they are re-resolved on the machine that loads it).

    Runs recorded before the `runtime` section existed are read too: their model.conv_impl is
    dropped (the layers are a runtime choice now), model.cpu_conv_library becomes
    runtime.xla_cpu_conv and model.init_from train.init_from.
    """
    import json  # pylint: disable=import-outside-toplevel

    with open(path) as f:
        recorded = json.load(f)
    recorded.pop("resolved_runtime", None)
    model = recorded.get("model", {})
    if "runtime" not in recorded:
        default = base_config().runtime.to_dict()
        model.pop("conv_impl", None)
        default["xla_cpu_conv"] = model.pop("cpu_conv_library", default["xla_cpu_conv"])
        recorded["runtime"] = default
    if "init_from" in model:
        recorded.setdefault("train", {})["init_from"] = model.pop("init_from")
    return ml_collections.ConfigDict(recorded)
