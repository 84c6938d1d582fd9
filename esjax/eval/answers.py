"""Answer extraction and exact match for generation tasks (GSM8K as lm-evaluation-harness does).

Two extractions of the model's completion, reported side by side:
- strict: the first match of the task's `answer_regex` (GSM8K: `#### <number>`), group 1;
- flexible: the last number anywhere in the completion.
Both answers and the reference are then normalised (`ignore` regexes removed, case folded,
whitespace stripped) and compared for equality.
"""

from __future__ import annotations

import re
from typing import Sequence

GSM8K_ANSWER = r"#### (\-?[0-9\.\,]+)"
LAST_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"


def _pick(matches: list, index: int) -> str:
  m = matches[index]
  if isinstance(m, tuple):  # several groups: the first one that matched
    m = next((g for g in m if g), "")
  return m.strip()


def extract_strict(text: str, pattern: str = GSM8K_ANSWER) -> str:
  matches = re.findall(pattern, text)
  return _pick(matches, 0) if matches else INVALID


def extract_flexible(text: str, pattern: str = LAST_NUMBER) -> str:
  matches = re.findall(pattern, text)
  return _pick(matches, -1) if matches else INVALID


def normalize(text: str, ignore: Sequence[str] = GSM8K_IGNORE) -> str:
  for pattern in ignore:
    text = re.sub(pattern, "", text)
  return text.lower().strip()


def exact_match(prediction: str, reference: str, ignore: Sequence[str] = GSM8K_IGNORE) -> float:
  return float(normalize(prediction, ignore) == normalize(reference, ignore))
