"""Shared pieces of the configs in `configs/`.

Every hyper-parameter of the method is a field here, so any of them can be overridden on the
command line (`--config.loss.tau=0.1`). Fields tagged [ours] in docs/method.md are our
reconstruction of the paper; they are options so that users can switch them.

Variants are chosen with a `:arg` suffix on the config path, e.g. `configs/seqattr.py:demo`.
"""

import ml_collections

from cmil_jax import labels


def base_config() -> ml_collections.ConfigDict:
    """Paper recipe (docs/method.md, "Data and training") for the Seq-DeepFake subsets."""
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
    # Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU; resolved at start-up, logged and
    # recorded under "resolved_runtime") | float32 | bfloat16: parameters stay float32. float64:
    # everything in float64, XLA's layers only, for equivalence checks across topologies
    # (docs/distributed.md); several times slower.
    c.model.dtype = "auto"

    # How this machine computes the model, never what (cmil_jax/runtime/__init__.py): resolved
    # once at start-up, logged, and recorded in config.json under "resolved_runtime".
    c.runtime = ml_collections.ConfigDict()
    # ResNet layers: auto | xla | matmul | onednn. auto = xla on GPU/TPU; on CPU onednn
    # (oneDNN convolutions and BatchNorm + ReLU; the `onednn` extra) where it can be built and
    # the compute dtype is float32, else matmul. The same choice for any number of devices.
    c.runtime.kernels = "auto"
    # XLA:CPU's convolution kernels: default (XLA's choice) | eigen (its Eigen kernels, which run
    # convolutions of 64 or fewer output channels on every core; YNNPACK runs them on one).
    # Ignored off the CPU, and moot for the convolutions of the onednn kernels.
    c.runtime.xla_cpu_conv = "default"
    # Host memory: keep (reuse freed memory instead of mapping fresh pages every XLA:CPU step)
    # | default (glibc's settings) | auto (keep where JAX runs on the CPU).
    c.runtime.host_malloc = "auto"
    # BatchNorm of the ResNet (with the ReLU and the residual add that follow it): flax
    # (flax.linen.BatchNorm, autodiff backward) | jnp (one-pass statistics and a closed-form
    # backward as a custom VJP in jax.numpy, left to XLA to fuse) | pallas (the same passes as
    # Pallas kernels: Triton on GPU, interpret mode elsewhere, slow; one device only).
    # runtime/fused_batchnorm.py; the same variables and numbers up to rounding.
    c.runtime.batchnorm = "flax"

    c.data = ml_collections.ConfigDict()
    c.data.name = "seq_deepfake/facial_attributes"  # TFDS name/config
    c.data.subset = "facial_attributes"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.image_size = 256
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"
    c.data.triples = False  # genuine / SBI / fake triples (method.md, "Data and training")
    # [ours] the SBI image's sequence target: 'zeros' (all-zero sequence, method.md, "Data and training")
    # or 'masked' (has_seq 0: it trains L_CLS only, like a binary-only sample).
    c.data.sbi_labels = "zeros"
    # Joint training (method.md, "Data and training", Table A2): a second, binary-only TFDS dataset (e.g.
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
    # Weak augmentation (method.md, "Data and training"); fields of cmil_jax.data.augment.AugmentConfig.
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
    # The backbone's starting weights (cmil_jax/pretrained.py): imagenet (the ImageNet weights
    # of model.backbone; inferred, docs/method.md) | a name such as resnet50.tv_in1k | a
    # converted directory or a weights file | none (random initialisation). Logged, and
    # recorded in config.json under "resolved_weights".
    c.train.init_from = "imagenet"
    c.train.init_sha256 = ""  # optional pin: the weights file's sha256
    c.train.weights_cache = "~/.cache/cmil_jax/weights"  # converted weights, reused by runs
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
    # Testing hook: SIGTERM to the run itself, as a preemption would send it, at 'eval:N' (during
    # the evaluation of step N), 'save:N' (while the checkpoint of step N is written) or 'test'
    # (during the test of the best checkpoints); comma separated (faults.SigtermHook).
    c.train.debug_sigterm_at = ""
    # Every metrics.jsonl scalar (train, val, test) also goes to TensorBoard event files in
    # <workdir>/tensorboard (tensorboardX), with val localization maps at each evaluation.
    c.train.tensorboard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    c.eval.threshold = 0.5  # p_k > threshold -> class k predicted [ours]
    c.eval.gate_by_fake_prob = False  # zero the sequence when the MIL p(x) < 0.5 [ours]
    c.eval.select_metrics = "fixed_acc,adaptive_acc"  # best checkpoint kept per metric (on val)
    c.eval.video_auc = True  # video-level AUC/EER/AP when records carry video ids

    c.video = video_config()
    return c


VIDEO_FACE = ("largest", "max")
VIDEO_AGGREGATE = ("mean", "max", "median")
VIDEO_NO_FACE = ("skip", "full_frame")


def video_config() -> ml_collections.ConfigDict:
    """The video protocol: how a video becomes one score, in predict and in evaluation
    (docs/evaluation.md, "Binary detection" and section 3).

    frames_per_video: frames sampled, evenly spaced over the video (data_prep.faces
      .sample_indices, as data_prep.videos samples training frames); all when it has fewer.
      Evaluation keeps this many of each video's stored frames, evenly spaced.
    face: 'largest' (the largest detected face of a frame is its input) or 'max' (every face
      found is scored and the frame's score is the highest of them). Predict only: a built
      dataset stores the largest face.
    aggregate: frame scores -> video score: 'mean', 'max', 'median' (predict, and evaluation's
      video_auc).
    no_face: a frame without a detected face is 'skip'ped (counted, not scored) or scored on
      the 'full_frame' resized to the model's input. A video with no scored frame has no score.
      Predict only: a built dataset stores no frame without a face.
    sequence_vote: the video's manipulation sequence is the sequence predicted on the most
      scored frames whose fake probability is at least this (0 = over all of them; when no
      frame reaches it, over all of them); ties go to the sequence whose frames have the
      higher mean fake probability.
    """
    v = ml_collections.ConfigDict()
    v.frames_per_video = 32
    v.face = "largest"
    v.aggregate = "mean"
    v.no_face = "skip"
    v.sequence_vote = 0.5
    return v


def check_video(v) -> None:
    """Raises ConfigError naming the field of a video section that cannot work."""
    checks = [
        ("frames_per_video", isinstance(v.frames_per_video, int) and v.frames_per_video > 0,
         "must be a positive integer"),
        ("face", v.face in VIDEO_FACE, f"must be one of {VIDEO_FACE}"),
        ("aggregate", v.aggregate in VIDEO_AGGREGATE, f"must be one of {VIDEO_AGGREGATE}"),
        ("no_face", v.no_face in VIDEO_NO_FACE, f"must be one of {VIDEO_NO_FACE}"),
        ("sequence_vote", 0.0 <= float(v.sequence_vote) <= 1.0, "must lie in [0, 1]"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"config field video.{name}={v[name]!r}: {why}")


def seq_config(subset: str, arg: str | None) -> ml_collections.ConfigDict:
    """Config for a Seq-DeepFake subset; `arg` = None | 'demo' | 'demo_triples' (triples,
    72 px) | 'demo_single' (single images at 96 px). 'demo' is 'demo_triples' on
    facial_attributes and apply_components_demo on facial_components (docs/demo_tuning.md)."""
    c = base_config()
    c.data.subset = subset
    c.data.name = f"seq_deepfake/{subset}"
    if arg in (None, "", "paper"):
        c.data.triples = True  # method.md, "Data and training"; batch_size counts triples (examples)
        return c
    if arg == "demo" and subset == "facial_components":
        return apply_components_demo(apply_triples_demo(apply_demo(c)))
    if arg in ("demo", "demo_triples"):
        return apply_triples_demo(apply_demo(c))
    if arg == "demo_single":
        return apply_demo(c)
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'demo', 'demo_triples' or "
                     "'demo_single'")


def apply_components_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Seq-FaceComp demo: the triples demo's 72 px net on single images, 32 a step.

    Its accuracy follows the sequence-labelled fakes it sees; a triple carries one in three
    images, and within 9 minutes on 2 CPU cores the triples demo tested at Fixed-Acc 0.715,
    single images at 0.819 (docs/demo_tuning.md). The triples recipe is the attributes demo's,
    `:demo_triples`' and the joint demo's.
    """
    c.data.triples = False
    c.train.batch_size = 32
    c.train.num_steps = 5000
    c.train.eval_every = 2500
    c.train.checkpoint_every = 2500
    return c


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
    c.train.init_from = "none"  # the demo's small nets have no ImageNet weights
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float(
        "inf")


def _at_least(low, integer=True):
    ok = _is_int if integer else _is_number
    return (lambda v: ok(v) and v >= low), (
        f"must be an integer >= {low}" if integer else f"must be a number >= {low}")


def _in_range(low, high, high_open=False):
    return ((lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)),
            f"must be a number in [{low}, {high}{')' if high_open else ']'}")


def _positive():
    return (lambda v: _is_number(v) and v > 0), "must be a number > 0"


def _pair(low, high):
    """A (lo, hi) pair with low <= lo <= hi <= high (high None: unbounded)."""
    def ok(v):
        return (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v))
                and low <= v[0] <= v[1] and (high is None or v[1] <= high))
    return ok, (f"must be a pair (lo, hi) with {low} <= lo <= hi"
                + (f" <= {high}" if high is not None else ""))


def _one_of(*names):
    return (lambda v: v in names), f"must be one of {names}"


# The backbones' output stride (models.FEATURE_STRIDES): a side of at least one feature-map
# cell. ResNets take any side above it (their strided layers round up: 72 px gives 3 x 3 cells).
MIN_IMAGE_SIZE = 32
SWIN_SIDE_MULTIPLE = 32  # Swin: patch 4 times three 2x merges, no padding (models/swin.py)
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float64")


def check_values(cfg) -> None:
    """Range and type checks of the sizes, counts, rates and choices of a config that need
    neither JAX nor the devices (validate adds those), so that a bad value, given on the
    command line or found in a recorded config.json, stops before anything starts.
    Raises ConfigError 'config field <field>=<value>: <what is expected>'."""
    checks = {
        "seed": ((lambda v: _is_int(v)), "must be an integer"),
        "data.image_size": _at_least(MIN_IMAGE_SIZE),
        "data.num_workers": _at_least(0),
        "data.prefetch": _at_least(0),
        "data.max_bad_records": _at_least(0),
        "data.augment.flip_p": _in_range(0, 1),
        "data.augment.crop_mode": _one_of("resized", "pad", "none"),
        "data.augment.crop_p": _in_range(0, 1),
        "data.augment.crop_scale": _pair(1e-6, 1),
        "data.augment.crop_ratio": _pair(1e-6, None),
        "data.augment.crop_pad": _in_range(0, 0.5, high_open=True),
        "data.augment.jitter_p": _in_range(0, 1),
        "data.augment.brightness": _at_least(0, integer=False),
        "data.augment.contrast": _at_least(0, integer=False),
        "data.augment.saturation": _at_least(0, integer=False),
        "data.augment.hue": _in_range(0, 0.5),
        "data.augment.blur_p": _in_range(0, 1),
        "data.augment.blur_sigma": _pair(0, None),
        "model.backbone_width": _at_least(1),
        "model.width": _at_least(1),
        "model.num_heads": _at_least(1),
        "model.mlp_ratio": _positive(),
        "model.embed_dim": _at_least(1),
        "model.pool_temperature": _positive(),
        "model.num_class_tokens": _at_least(1),
        "model.num_classes": _at_least(1),
        "model.dtype": _one_of(*MODEL_DTYPES),
        "loss.alpha": _at_least(0, integer=False),
        "loss.lambda1": _at_least(0, integer=False),
        "loss.lambda2": _at_least(0, integer=False),
        "loss.tau": _positive(),
        "loss.num_lowest": _at_least(0),
        "loss.rank_order": _one_of("first_high", "last_high"),
        "train.batch_size": _at_least(1),
        "train.num_steps": _at_least(0),
        "train.lr": _positive(),
        "train.backbone_lr_mult": _at_least(0, integer=False),
        "train.weight_decay": _at_least(0, integer=False),
        "train.warmup_steps": _at_least(0),
        "train.b1": _in_range(0, 1, high_open=True),
        "train.b2": _in_range(0, 1, high_open=True),
        "train.grad_clip": _at_least(0, integer=False),
        "train.log_every": _at_least(1),
        "train.eval_every": _at_least(1),
        "train.checkpoint_every": _at_least(1),
        "train.keep_checkpoints": _at_least(1),
        "train.max_nonfinite_steps": _at_least(0),
        "eval.batch_size": _at_least(1),
        "eval.threshold": _in_range(0, 1),
        "eval.select_metrics": ((lambda v: isinstance(v, str) and any(
            m.strip() for m in v.split(","))), "must name at least one metric, comma separated"),
    }
    if cfg.train.get("num_steps") == 0:  # the length comes from the epochs
        checks["train.num_epochs"] = (lambda v: _is_int(v) and v >= 1), (
            "must be an integer >= 1 when train.num_steps is 0")
    if str(cfg.data.get("name", "")).startswith("cmil_synthetic"):
        for split in ("train", "val", "test"):
            checks[f"data.synthetic.num_{split}"] = _at_least(1)
    for field, (ok, why) in checks.items():
        try:
            value = _get_field(cfg, field)
        except (KeyError, AttributeError):
            continue  # a field an older recorded config lacks: its default applies
        if not ok(value):
            raise ConfigError(f"config field {field}={value!r}: {why}")
    model = cfg.model
    if str(model.backbone).startswith("swin") and cfg.data.image_size % SWIN_SIDE_MULTIPLE:
        raise ConfigError(f"config field data.image_size={cfg.data.image_size}: the "
                          f"{model.backbone} backbone needs a multiple of {SWIN_SIDE_MULTIPLE}")
    if model.width % model.num_heads:
        raise ConfigError(f"config field model.num_heads={model.num_heads}: must divide "
                          f"model.width={model.width}")
    if model.num_class_tokens != model.num_classes:
        raise ConfigError(f"config field model.num_class_tokens={model.num_class_tokens}: must "
                          f"equal model.num_classes={model.num_classes} (one class token per "
                          "class logit)")
    parse_steps(cfg.train.get("debug_nonfinite_steps", ""))
    parse_sigterm_points(cfg.train.get("debug_sigterm_at", ""))
    if "video" in cfg:
        check_video(cfg.video)
    from cmil_jax import pretrained  # pylint: disable=import-outside-toplevel

    pretrained.check(cfg)  # train.init_from names weights of model.backbone


def validate(cfg, devices: int, processes: int) -> None:
    """Checks what lock_config cannot: sizes, counts and choices (check_values), values that
    fit the devices and processes of this run, the backbone and the names of the runtime
    section. Raises ConfigError naming the field."""
    from cmil_jax import models  # pylint: disable=import-outside-toplevel
    from cmil_jax import runtime  # pylint: disable=import-outside-toplevel

    check_values(cfg)
    if cfg.model.backbone not in models.BACKBONES:
        raise ConfigError(f"config field model.backbone={cfg.model.backbone!r}: must be one of "
                          f"{tuple(sorted(models.BACKBONES))}")
    if cfg.model.patch_pool not in models.cmil.PATCH_POOLS:
        raise ConfigError(f"config field model.patch_pool={cfg.model.patch_pool!r}: must be one "
                          f"of {tuple(models.cmil.PATCH_POOLS)}")
    runtime.check(cfg.runtime)
    images = cfg.train.batch_size * (3 if cfg.data.triples else 1)
    checks = [
        ("train.batch_size", images % devices == 0,
         f"the global batch ({images} images) must split evenly over the {devices} devices"),
        ("train.batch_size", cfg.train.batch_size % processes == 0,
         f"must be a multiple of the {processes} processes"),
        ("eval.batch_size", cfg.eval.batch_size % devices == 0,
         f"must be a multiple of the {devices} devices"),
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


def parse_sigterm_points(spec: str) -> set:
    """train.debug_sigterm_at: 'eval:10,save:20,test' -> {('eval', 10), ('save', 20),
    ('test', None)} (faults.SigtermHook); ConfigError saying what is expected."""
    points = set()
    for part in filter(None, (p.strip() for p in str(spec or "").split(","))):
        point, _, step = part.partition(":")
        if point == "test" and not step:
            points.add(("test", None))
        elif point in ("eval", "save") and step.isdigit() and int(step) > 0:
            points.add((point, int(step)))
        else:
            raise ConfigError(f"config field train.debug_sigterm_at={spec!r}: {part!r} is not "
                              "'eval:STEP', 'save:STEP' or 'test' (comma separated)")
    return points


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
    runtime.xla_cpu_conv and model.init_from train.init_from. An empty train.init_from (random
    initialisation before 'none' existed) reads as 'none'.
    """
    import json  # pylint: disable=import-outside-toplevel

    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                          f"{e.msg}); it is the run's recorded config: restore it, or pass "
                          "--config with a new --workdir") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it is "
                          "the run's recorded config") from e
    sections = ("model", "data", "loss", "train", "eval")
    if not isinstance(recorded, dict) or not all(
            isinstance(recorded.get(s), dict) for s in sections):
        raise ConfigError(f"{path}: expected a JSON object with the config sections "
                          f"{', '.join(sections)} (the run's recorded config)")
    recorded.pop("resolved_runtime", None)
    recorded.pop("resolved_weights", None)
    model = recorded.get("model", {})
    if "runtime" not in recorded:
        default = base_config().runtime.to_dict()
        model.pop("conv_impl", None)
        default["xla_cpu_conv"] = model.pop("cpu_conv_library", default["xla_cpu_conv"])
        recorded["runtime"] = default
    # Runtime fields added since the run was recorded take their defaults.
    recorded["runtime"] = {**base_config().runtime.to_dict(), **recorded["runtime"]}
    if "init_from" in model:
        recorded.setdefault("train", {})["init_from"] = model.pop("init_from")
    if not recorded["train"].get("init_from"):
        recorded["train"]["init_from"] = "none"
    for field in ("init_sha256", "weights_cache"):  # runs recorded before these fields
        recorded["train"].setdefault(field, base_config().train[field])
    # Runs recorded before the video section existed: the default protocol (recorded fields
    # kept, missing ones filled in).
    recorded["video"] = {**video_config().to_dict(), **recorded.get("video", {})}
    return ml_collections.ConfigDict(recorded)


# ----------------------------------------------------------------------------- comparing configs

# Fields that never change what a run computes, only how fast, where the data lives or how often
# it reports: a resume may change them without --accept_config_changes. Every other field
# (model, loss, optimizer, schedule length, data, augmentation, seeds) counts as a change.
RESUME_FREE_FIELDS = (
    "runtime.",  # the whole section: how this machine computes, never what
    "data.data_dir", "data.num_workers", "data.prefetch",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.tensorboard",  # what is reported, not what is trained
    "train.weights_cache",  # where converted weights are kept
    "train.debug_sigterm_at",  # when a test stops the run, not what it computes
    # predict's alone; video.frames_per_video and video.aggregate change the val figures
    "video.face", "video.no_face", "video.sequence_vote",
    "eval.batch_size",
)

# What `--mode eval` takes from --config (when given) on top of the run's recorded config: the
# datasets and splits to test on. Everything else comes from <workdir>/config.json, so the model
# is the one that was trained; --config.x=y overrides apply on top, except those of
# EVAL_FIXED_FIELDS, which must match the recording.
EVAL_DATASET_FIELDS = ("data.name", "data.test_split", "data.joint_name", "data.joint_test_split")
EVAL_FIXED_FIELDS = ("seed", "model.", "loss.", "train.", "data.image_size")


def _matches(field: str, patterns) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def flatten(cfg) -> dict:
    """{'model.width': 384, ...}: the config's leaves as JSON values (tuples become lists)."""
    import json  # pylint: disable=import-outside-toplevel

    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    tree = json.loads(json.dumps(tree))
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                out[name] = value

    walk("", tree)
    return out


_ABSENT = "(absent)"


def config_changes(recorded, given, ignore=RESUME_FREE_FIELDS) -> dict:
    """{field: (recorded value, given value)} for every leaf that differs, fields matching
    `ignore` (exact names, or prefixes ending in '.') left out. A field only one side has is
    reported with the value '(absent)' on the other."""
    old, new = flatten(recorded), flatten(given)
    changes = {}
    for field in sorted(set(old) | set(new)):
        if _matches(field, ignore):
            continue
        a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
        if a != b:
            changes[field] = (a, b)
    return changes


def format_changes(changes: dict) -> str:
    return "; ".join(f"{field}: {a!r} -> {b!r}" for field, (a, b) in changes.items())


def _set_field(cfg, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


def _get_field(cfg, field: str):
    node = cfg
    for p in field.split("."):
        node = node[p]
    return node


def eval_config(recorded, given=None, overrides: dict | None = None,
                where: str = "config.json") -> ml_collections.ConfigDict:
    """The config `--mode eval` runs with: the run's `recorded` config (load_recorded), with
    the datasets of `given` (the --config file, EVAL_DATASET_FIELDS) and the command line's
    `overrides` ({field: value}) applied on top.

    Raises ConfigError naming the field when an override would change the trained model
    (EVAL_FIXED_FIELDS) or names a field the recorded config lacks.
    """
    import copy  # pylint: disable=import-outside-toplevel

    cfg = copy.deepcopy(recorded)
    if given is not None:
        for field in EVAL_DATASET_FIELDS:
            _set_field(cfg, field, copy.deepcopy(_get_field(given, field)))
    recorded_flat = flatten(recorded)
    for field, value in (overrides or {}).items():
        if field not in recorded_flat:
            raise ConfigError(f"config field {field} is not in the run's recorded config "
                              f"({where})")
        plain = flatten({"v": value})["v"] if not isinstance(value, dict) else value
        if _matches(field, EVAL_FIXED_FIELDS):
            if plain != recorded_flat[field]:
                raise ConfigError(
                    f"config field {field}={value!r}: --mode eval evaluates the model the run "
                    f"trained, recorded with {field}={recorded_flat[field]!r} in {where}; drop "
                    "the override (the recorded value is used) or train a new run")
            continue
        _set_field(cfg, field, value)
    return cfg


# ----------------------------------------------------------------------------- binary datasets

# Short names of the binary benchmarks the data_prep builders write (data_prep/videos.py):
# short name -> (TFDS dataset name, its splits). Any '<builder>/<config>' name is accepted as
# well: 'ffpp/c40', 'ffpp/c23_Deepfakes-FaceSwap' (a build with --methods), 'dfd/c40',
# 'folders/NAME' (data_prep/folders.py).
BINARY_DATASETS = {
    "ffpp": ("ffpp/c23", ("train", "val", "test")),
    "celebdf": ("celebdf/v2", ("train", "test")),
    "dfdc": ("dfdc/default", ("train", "test")),
    "wilddeepfake": ("wilddeepfake/default", ("train", "test")),
    "dfd": ("dfd/c23", ("test",)),
}


def binary_dataset(arg: str) -> tuple[str, tuple[str, ...]]:
    """(TFDS name, splits) of a dataset given by short name or '<builder>/<config>'.

    Splits of unknown builders are assumed to be train, val and test (data_prep/folders.py).
    ValueError for anything else, listing what is accepted."""
    if arg in BINARY_DATASETS:
        return BINARY_DATASETS[arg]
    builder, _, config = (arg or "").partition("/")
    if not builder or not config or "/" in config:
        raise ValueError(f"unknown dataset {arg!r}: expected one of {sorted(BINARY_DATASETS)} "
                         "or a TFDS name '<builder>/<config>' such as ffpp/c40 or folders/NAME")
    if builder == "ffpp":
        from data_prep import videos  # pylint: disable=import-outside-toplevel

        videos.parse_ffpp_config(config)  # ValueError naming a bad compression or method
    for name, splits in BINARY_DATASETS.values():
        if name.split("/")[0] == builder:
            return arg, splits
    return arg, ("train", "val", "test")


def apply_binary(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The binary recipe [paper] reading TFDS dataset `name`: one class token, one class
    (target = is_fake), no L_Rank, genuine / SBI / fake triples, best checkpoint by AUC."""
    c.data.name = name
    c.data.subset = "facial_components"  # only read by the synthetic demo data
    c.data.triples = True
    c.model.num_class_tokens = 1
    c.model.num_classes = 1
    c.loss.use_rank = False
    c.eval.select_metrics = "auc"
    return c


def use_splits(c: ml_collections.ConfigDict, splits) -> ml_collections.ConfigDict:
    """Points the val split at 'test' for datasets without an official val split (Celeb-DF,
    DFDC, WildDeepfake): the best checkpoint is then selected on the test split, which the
    results must say."""
    if "val" not in splits and "test" in splits:
        c.data.val_split = "test"
    return c


def apply_demo_size(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo's model, image size and schedule (apply_demo) on a config's own dataset."""
    name, data_dir = c.data.name, c.data.data_dir
    c = apply_demo(c)
    c.data.name, c.data.data_dir = name, data_dir
    return c


def split_variant(arg: str | None) -> tuple[str, bool]:
    """'<dataset>[,demo]' -> (dataset, demo?)."""
    parts = [p.strip() for p in (arg or "").split(",")]
    demo = "demo" in parts[1:]
    extra = [p for p in parts[1:] if p != "demo"]
    if extra:
        raise ValueError(f"config variant {arg!r}: unknown option(s) {extra}; the only one is "
                         "',demo'")
    return parts[0], demo
