"""A tiny T5Gemma 2 directory that reads images: weights, a Gemma-layout tokenizer that knows the image tokens, and
the processor files, all written by transformers as a real checkpoint holds them.

`build_t5gemma2_vision_dir` is for every test of the image path (processor, SigLIP forward, infer, training).
"""

import io
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from conftest import build_hf
from test_t5gemma2_parity import tiny_config

BOI, EOI, IMAGE = 255, 256, 257  # tiny_config's boi_token_index, eoi_token_index, image_token_index
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")  # at BOI, EOI, IMAGE
IMAGE_SIZE, IMAGE_SEQ_LENGTH = 32, 16  # tiny_config's SigLIP image_size and mm_tokens_per_image
# Words whose letters cover the text pan-and-scan adds ("Here is the original image ... crops to help you see
# better"), so that no test text meets <unk>.
WORDS = ("Here is the original image and here are some crops to help you see better Describe What a cat dog sat on "
         "mat picture shows").split()


def tokenizer_model() -> bytes:
  """A serialized SentencePiece BPE model in Gemma's layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, filler pieces
  that no text reaches up to 254, the image tokens at 255-257 (user-defined pieces, as Gemma 3's are), then the
  pieces learnt from WORDS (up to id 299, inside tiny_config's vocabulary of 300)."""
  learnt = io.BytesIO()
  text = " ".join(WORDS) + "?\n\n" + " ".join(reversed(WORDS)) + "."
  spm.SentencePieceTrainer.train(sentence_iterator=iter([text] * 50), model_writer=learnt, minloglevel=2,
                                 vocab_size=300 - BOI + 1, model_type="bpe", hard_vocab_limit=False,
                                 pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                                 bos_piece="<bos>", unk_piece="<unk>", normalization_rule_name="identity",
                                 add_dummy_prefix=False, remove_extra_whitespaces=False,
                                 allow_whitespace_only_pieces=True)
  trained = spm_pb2.ModelProto.FromString(learnt.getvalue())
  out = spm_pb2.ModelProto()
  out.CopyFrom(trained)
  del out.pieces[:]
  kind = spm_pb2.ModelProto.SentencePiece.Type
  out.pieces.extend(trained.pieces[:4])
  for i in range(4, BOI):
    out.pieces.add(piece=f"<unused{i - 4}>", score=-1e9, type=kind.NORMAL)
  for piece in IMAGE_TOKENS:
    out.pieces.add(piece=piece, score=0.0, type=kind.USER_DEFINED)
  out.pieces.extend(trained.pieces[4:])
  assert len(out.pieces) <= 300, len(out.pieces)
  return out.SerializeToString()


def build_t5gemma2_vision_dir(path, *, pan_and_scan=False, seed=0, **config_overrides):
  """Writes a tiny T5Gemma 2 (test_t5gemma2_parity.tiny_config(**config_overrides), weights perturbed as
  conftest.build_hf does) with its processor into `path`, as transformers saves them: config.json,
  model.safetensors, tokenizer.model + tokenizer.json + tokenizer_config.json (boi/eoi/image tokens 255/256/257,
  BOS prepended), processor_config.json (image size 32, mean = std = 0.5, rescale 1/255, bilinear,
  image_seq_length 16). Returns (str(path), the transformers model).

  `pan_and_scan=True` writes do_pan_and_scan with crops of at least 8 pixels (at most 4, from an aspect ratio of
  1.2) into the image processor config:
  `AutoImageProcessor` then crops, but transformers' processor ignores those settings (Gemma3Processor's call
  defaults win), so give `do_pan_and_scan=True, pan_and_scan_min_crop_size=8` at call time to it and to ours.
  """
  import transformers as tf  # pylint: disable=import-outside-toplevel

  path = str(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(tokenizer_model())
  # The tokenizer_config.json of a released Gemma 3 names the image tokens; save_pretrained below rewrites it in
  # transformers 5's layout (tokens under model_specific_special_tokens, BOS in tokenizer.json's template).
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    f.write('{"add_bos_token": true, "add_eos_token": false, "tokenizer_class": "GemmaTokenizer", '
            '"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}')
  tokenizer = tf.GemmaTokenizer.from_pretrained(path)
  # All four keys: transformers' image processor alone fails on a missing one (its class defaults are None).
  pas = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 4,
         "pan_and_scan_min_ratio_to_activate": 1.2} if pan_and_scan else {}
  image_processor = tf.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3, **pas)
  tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                     image_seq_length=IMAGE_SEQ_LENGTH).save_pretrained(path)
  model = build_hf(tf.T5Gemma2ForConditionalGeneration, tiny_config(**config_overrides), path, seed=seed)
  return path, model
