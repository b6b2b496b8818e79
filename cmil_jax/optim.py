"""Optimizer: AdamW with linear warm-up and cosine decay (method.md, "Data and training").

Two parameter groups: the backbone learns at `lr * backbone_lr_mult` (0.1 in the paper's
recipe), everything else (tokenizer, class tokens, transformer layer, heads, MIL bias) at `lr`.
Weight decay applies to weights only: not to norms (scale, bias), biases of any rank (Flax's
attention query/key/value biases are (heads, head_dim)), class tokens, position embeddings and
tables, or the MIL bias.
"""

import jax
import optax

# Leaf names that never get weight decay, whatever their rank: exact names, and substrings.
NO_DECAY_LEAVES = ("bias", "scale")
NO_DECAY_NAMES = ("pos_embed", "class_tokens", "mil_bias", "relative_position_bias_table")


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params):
    """True for leaves that get weight decay: rank >= 2, not named in NO_DECAY_LEAVES and not
    containing a name of NO_DECAY_NAMES."""

    def keep(path, leaf):
        name = _leaf_name(path)
        if name in NO_DECAY_LEAVES or any(n in name for n in NO_DECAY_NAMES):
            return False
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def param_groups(params):
    """'backbone' for leaves under the top-level 'backbone' module, else 'head'."""

    def group(path, _):
        top = str(getattr(path[0], "key", path[0]))
        return "backbone" if top == "backbone" else "head"

    return jax.tree_util.tree_map_with_path(group, params)


def lr_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def make_optimizer(train_cfg, total_steps: int, params) -> optax.GradientTransformation:
    """AdamW (decoupled decay) per parameter group, with optional global-norm clipping."""

    def adamw(mult):
        schedule = lr_schedule(train_cfg.lr * mult, train_cfg.warmup_steps, total_steps)
        return optax.adamw(
            schedule,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask,
        )

    tx = optax.multi_transform(
        {"backbone": adamw(train_cfg.backbone_lr_mult), "head": adamw(1.0)}, param_groups(params)
    )
    if train_cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
    return tx
