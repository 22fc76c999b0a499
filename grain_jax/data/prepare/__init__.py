"""Turn annotated image-text data into prepared grain_jax records (``grain-jax-prepare`` is the CLI).

Every source (``sources``) first turns its input into *raw examples*
`{"id", "image", "caption", "mllm_caption", "regions": [{"description", "box" xyxy in [0,1], "score"}]}`;
one shared path (``writer.prepare_dataset``) then decodes, squash-resizes, tokenises, validates
(``checks``), reports and writes them as ArrayRecord shards in a TFDS folder (see
``grain_jax.data.records``). Bad records are skipped or repaired and each one is listed by id and
reason in `OUTPUT_DIR/prepare_report.jsonl`.
"""
from grain_jax.data.prepare.writer import prepare_dataset

__all__ = ["prepare_dataset"]
