"""What the paper reports and prescribes, as data: the numbers of its tables and its schedules.

Sources:
  SUPPLEMENTARY: the supplementary material of Hong, Hsu and Liu, "Contrastive Learning for
    DeepFake Classification and Localization via Multi-Label Ranking" (CVPR 2024): Tables A1
    and A2, and section B (training: 200 epochs for the ResNets, 400 for Swin).
  SEQ_DEEPFAKE_RELEASE: the Seq-DeepFake benchmark table of the dataset's release (Shao, Wu and
    Liu, ECCV 2022; github.com/rshaojimmy/SeqDeepFake, "Benchmark Results"), the published
    ResNet-50 baselines CMIL compares with.

The main text of the CMIL paper (its own Seq-DeepFake table, with Adaptive-Acc and the Swin
results) is not at hand: its values are absent here, never guessed. Numbers are percentages
as printed. `cmil_jax.compare` prints a run's results beside them (docs/reproduce.md).
"""

from __future__ import annotations

import dataclasses

SUPPLEMENTARY = "CMIL supplementary material (Hong, Hsu, Liu, CVPR 2024)"
SEQ_DEEPFAKE_RELEASE = "Seq-DeepFake release (Shao, Wu, Liu, ECCV 2022), benchmark table"

# Section B of the supplementary: training length per backbone family.
RESNET_EPOCHS = 200
SWIN_EPOCHS = 400
SWIN_BACKBONES = ("swin_t", "swin_s", "swin_b")


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of the paper.

    columns: column key -> its heading in the paper (cmil_jax.compare maps the keys to a run's
      metrics). rows: row name -> {column key: value in %}; a value the source does not give is
      left out. settings: row name -> the config fields that define the row (Table A1).
    """

    name: str
    title: str
    source: str
    columns: dict
    rows: dict
    settings: dict = dataclasses.field(default_factory=dict)
    note: str = ""


TABLES = {
    "a1": Table(
        name="a1",
        title="Table A1: ablation of the loss hyper-parameters (ResNet-50, Seq-FaceComp)",
        source=SUPPLEMENTARY,
        columns={"ranking_acc": "Ranking Acc. (%)"},
        rows={"I": {"ranking_acc": 74.54}, "II": {"ranking_acc": 73.42},
              "III": {"ranking_acc": 73.22}, "IV": {"ranking_acc": 72.33},
              "V": {"ranking_acc": 74.12}, "VI": {"ranking_acc": 74.55},
              "VII": {"ranking_acc": 72.27}},
        settings={
            name: {"loss.lambda1": l1, "loss.lambda2": l2, "loss.tau": tau, "loss.alpha": alpha}
            for name, (l1, l2, tau, alpha) in {
                "I": (1.0, 1.0, 0.2, 1.0), "II": (0.5, 1.0, 0.2, 1.0),
                "III": (1.5, 1.0, 0.2, 1.0), "IV": (1.0, 0.5, 0.2, 1.0),
                "V": (1.0, 1.5, 0.2, 1.0), "VI": (1.0, 1.0, 0.5, 1.0),
                "VII": (1.0, 1.0, 0.2, 0.5)}.items()},
    ),
    "a2": Table(
        name="a2",
        title="Table A2: separate and joint training on Seq-FaceComp and FF++ (ResNet-50)",
        source=SUPPLEMENTARY,
        columns={"ranking_acc": "Ranking Acc. (%)",
                 "ffpp_auc": "Intra-testing AUC (%) (FF++)",
                 "celebdf_auc": "Cross-testing AUC (%) (CDF)"},
        rows={"separate": {"ranking_acc": 74.54, "ffpp_auc": 99.82, "celebdf_auc": 89.12},
              "joint": {"ranking_acc": 74.62, "ffpp_auc": 99.89, "celebdf_auc": 90.23}},
    ),
    "seq_deepfake": Table(
        name="seq_deepfake",
        title="Seq-DeepFake benchmark: Fixed-Acc and Adaptive-Acc (ResNet-50)",
        source=f"{SEQ_DEEPFAKE_RELEASE}; the CMIL row from the {SUPPLEMENTARY}",
        columns={"comp_fixed_acc": "Seq-FaceComp Fixed-Acc", "comp_adaptive_acc":
                 "Seq-FaceComp Adaptive-Acc", "attr_fixed_acc": "Seq-FaceAttr Fixed-Acc",
                 "attr_adaptive_acc": "Seq-FaceAttr Adaptive-Acc"},
        rows={
            "DRN": {"comp_fixed_acc": 66.06, "comp_adaptive_acc": 45.79,
                    "attr_fixed_acc": 64.42, "attr_adaptive_acc": 43.20},
            "MA": {"comp_fixed_acc": 71.31, "comp_adaptive_acc": 52.94,
                   "attr_fixed_acc": 67.58, "attr_adaptive_acc": 47.48},
            "Two-Stream": {"comp_fixed_acc": 71.92, "comp_adaptive_acc": 53.89,
                           "attr_fixed_acc": 66.77, "attr_adaptive_acc": 46.38},
            "SeqFakeFormer": {"comp_fixed_acc": 72.65, "comp_adaptive_acc": 55.30,
                              "attr_fixed_acc": 68.86, "attr_adaptive_acc": 49.63},
            "CMIL": {"comp_fixed_acc": 74.54},
        },
        note=("The CMIL row is the supplementary's Seq-FaceComp 'Ranking Acc.' (Tables A1 and "
              "A2, setting I / separate), read as Fixed-Acc; its other cells are in the main "
              "text, which is not at hand."),
    ),
}


def apply_swin(c, backbone: str):
    """The Swin recipe on a config (its `:swin_t`, `:swin_s`, `:swin_b` variants).

    [paper] 400 epochs (SWIN_EPOCHS) and otherwise the configs' recipe (AdamW, cosine, LR 1e-4
    with the backbone at x0.1). [ours] from Swin's own ImageNet recipe, which the supplementary
    says it follows: 224 px inputs (window 7, so the released ImageNet weights load unchanged)
    and gradient clipping at global norm 5; its weight decay 0.05 is the configs' default.
    Not applied (docs/method.md): Swin's 20-epoch warm-up (train.warmup_steps counts steps)
    and stochastic depth (not implemented).
    """
    if backbone not in SWIN_BACKBONES:
        raise ValueError(f"unknown Swin backbone {backbone!r}; expected one of {SWIN_BACKBONES}")
    c.model.backbone = backbone
    c.model.dilate_last = False  # Swin has no dilated stage
    c.data.image_size = 224
    c.train.num_epochs = SWIN_EPOCHS
    c.train.num_steps = 0  # the length comes from the epochs
    c.train.grad_clip = 5.0
    return c
