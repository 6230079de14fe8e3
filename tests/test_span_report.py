"""The demo's report (training/span_report.py): which token the bigram baseline reads before each target token, and
the single-task mixtures it evaluates."""

import numpy as np

from t5x_lite.data.ul2 import Denoiser, Mixture
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
