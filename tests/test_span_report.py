"""The demo's report (training/span_report.py): which token the bigram baseline reads before each target token, and
the single-task mixtures it evaluates."""

import numpy as np

from t5x_lite.data.ul2 import Denoiser, Example, Mixture
from t5x_lite.training import span_report

S0, S1, EOS = 99, 98, 1  # sentinels count down from 99
MIXTURE = Mixture((Denoiser((90,), 0.15, 3.0), Denoiser((91,), 0.5, None)), first_sentinel_id=S0, inputs_length=32,
                  targets_length=32, num_sentinels=5, eos_id=EOS)


def test_previous_token_of_spans_and_continuations():
  # text 10 11 12 13 14: spans [11 12] and [14]
  inputs, targets = np.array([90, 10, S0, 13, S1, EOS]), np.array([S0, 11, 12, S1, 14, EOS])
  assert span_report._previous_tokens(inputs, targets, MIXTURE, 1).tolist() == [-1, 10, 11, 12, 13, 14]
  # a span opening the text has nothing before it
  inputs, targets = np.array([90, S0, 12, EOS]), np.array([S0, 10, 11, EOS])
  assert span_report._previous_tokens(inputs, targets, MIXTURE, 1).tolist() == [-1, -1, 10, 11]
  # prefix-LM: the continuation's first token follows the prefix's last
  inputs, targets = np.array([91, 5, 6, 7, EOS]), np.array([8, 9, EOS])
  assert span_report._previous_tokens(inputs, targets, MIXTURE, 1).tolist() == [7, 8, 9]


def test_tasks_alone_keep_the_budget_and_sentinels():
  spans, continuation = span_report._task_alone(MIXTURE, False), span_report._task_alone(MIXTURE, True)
  assert spans.denoisers == MIXTURE.denoisers[:1] and continuation.denoisers == MIXTURE.denoisers[1:]
  assert spans.first_sentinel_id == S0 and continuation.inputs_length == 32
  assert span_report._task_alone(Mixture(MIXTURE.denoisers[:1], first_sentinel_id=S0, inputs_length=32,
                                         targets_length=32, num_sentinels=5), True) is None


class _Model:
  """Logits that rank EOS first and the true token second at every position."""

  class config:  # pylint: disable=invalid-name
    pad_token_id, decoder_start_token_id = 0, 0

  def __init__(self, targets):
    self._targets = targets

  def logits(self, inputs, mask, decoder_in, target_mask):  # pylint: disable=unused-argument
    out = np.zeros((*self._targets.shape, 100), np.float32)
    np.put_along_axis(out, self._targets[..., None], 1.0, axis=-1)
    out[..., EOS] = 2.0
    return out


def test_the_model_chooses_among_text_tokens_as_the_baselines_do():
  # text 10 11 12 13 14: spans [11 12] and [14]; the baselines' tables know 10..14
  inputs, targets = np.array([90, 10, S0, 13, S1, EOS]), np.array([S0, 11, 12, S1, 14, EOS])
  rows = [Example(inputs, targets, 0, 5)]
  follows = {10: 11, 11: 12, 12: 13, 13: 14}
  got = span_report._accuracies(_Model(targets[None]), rows, MIXTURE, 1, 10, follows, np.arange(10, 15), 8)
  assert got["tokens"] == 3  # 11, 12, 14
  assert got["accuracy"] == 1.0 and got["accuracy_any_token"] == 0.0  # EOS is its argmax over every id
  assert got["unigram_baseline"] == 0.0 and got["bigram_baseline"] == 1.0
  assert got["first_tokens"]["tokens"] == 2  # 11 and 14 open their spans


def test_held_out_texts_are_cut_into_pieces_as_training_cuts_them():
  class Tokenizer:  # one id per word
    def encode(self, text):
      return [10 + int(w) for w in text.split()]

  task = span_report._task_alone(MIXTURE, False)
  raw = task.raw_lengths[0]
  pieces = span_report._examples(Tokenizer(), task, [" ".join(["1"] * (2 * raw + 3)), "2 2 2"], 100, 0)
  assert [[r.num_raw_tokens for r in p] for p in pieces] == [[raw, raw]]  # the last 3 tokens, the short text: left out
  pieces = span_report._examples(Tokenizer(), task, [" ".join(["1"] * (2 * raw))] * 3, 5, 0)
  assert [len(p) for p in pieces] == [2, 2, 1]
