"""Data for T5/UL2 pretraining and fine-tuning: span corruption, the UL2 mixture, packing, the grain pipeline.

The contract (README / API.md): `noise_mask`, `span_corruption`, `span_corruption_lengths`. The rest:
`ul2` (Denoiser, Mixture, ul2_example, ...), `packing` (packed model features), `pipeline` (`make_batches`),
`sources` (reading text / JSONL files).
"""

from t5x_lite.data.packing import (decoder_only_example, decoder_only_features, encoder_decoder_example,
                                   encoder_decoder_features, pack_dataset, pack_decoder_only, pack_encoder_decoder,
                                   shift_right_per_segment)
from t5x_lite.data.pipeline import DataConfig, make_batches, make_dataset, make_mixture, token_ids
from t5x_lite.data.sources import read_documents
from t5x_lite.data.span_corruption import (corrupted_lengths, noise_counts, noise_mask, span_corruption,
                                           span_corruption_lengths)
from t5x_lite.data.ul2 import Denoiser, Example, Mixture, prefix_lm, ul2_denoisers, ul2_example, ul2_examples

__all__ = [
    "noise_mask", "span_corruption", "span_corruption_lengths", "noise_counts", "corrupted_lengths",
    "Denoiser", "Mixture", "Example", "ul2_denoisers", "ul2_example", "ul2_examples", "prefix_lm",
    "encoder_decoder_example", "decoder_only_example", "pack_dataset", "shift_right_per_segment",
    "encoder_decoder_features", "decoder_only_features", "pack_encoder_decoder", "pack_decoder_only",
    "DataConfig", "make_batches", "make_dataset", "make_mixture", "token_ids", "read_documents",
]
