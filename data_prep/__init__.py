"""Builders that turn user-supplied copies of the benchmarks into TFDS ArrayRecord datasets.

    python -m data_prep.seq_deepfake --raw-dir RAW --data-dir OUT      # Seq-DeepFake subsets
    python -m data_prep.videos --dataset ffpp --raw-dir RAW --data-dir OUT   # video benchmarks
    python -m data_prep.convert --data-dir OUT --out-dir OUT_RAW --name NAME # raw-pixel copy

Nothing is downloaded; docs/datasets.md says where to obtain each dataset and how to lay it out.
"""
