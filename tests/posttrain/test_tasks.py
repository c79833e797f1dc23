"""Verifiable tasks: deterministic disjoint splits, exact verifiers, malformed answers score 0."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archipelago.config import ConfigError
from posttrain.tasks import Arithmetic, Countdown, PythonFunctions, TaskConfig, eval_expression, parse_answer


@pytest.mark.parametrize("task", [Arithmetic(3, "+-*"), Countdown(4, 25)])
def test_splits_are_reproducible_and_disjoint(task):
    train = task.problems("train", 300, seed=1)
    assert [p.key for p in train] == [p.key for p in task.problems("train", 300, seed=1)]
    assert [p.key for p in train] != [p.key for p in task.problems("train", 300, seed=2)]
    heldout = task.problems("heldout", 100, seed=1)
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert not {p.key for p in task.problems("train", 300, seed=7)} & {p.key for p in heldout}
    for p in train[:50] + heldout[:50]:
        assert task.score(p, task.reference_completion(p)) == 1.0


def test_arithmetic_verifier():
    task = Arithmetic(2, "+-")
    p = next(q for q in task.problems("train", 50) if "-" in q.key)
    a, b = (int(x) for x in p.key.split("-"))
    assert task.score(p, f"Answer: {a - b}") == 1.0
    assert task.score(p, f"some thinking\nAnswer:   {a - b}  \nmore") == 1.0
    assert task.score(p, f"Answer: {a - b + 1}") == 0.0
    assert task.score(p, f"{a - b}") == 0.0  # no answer line
    assert task.score(p, f"Answer: {a - b}.5") == 0.0
    with pytest.raises(ConfigError, match="ops"):
        Arithmetic(2, "+/")


def test_countdown_verifier_checks_value_and_numbers():
    task = Countdown(3, 10)
    p = task.problems("train", 1, seed=3)[0]
    assert task.score(p, f"Answer: {p.answer}") == 1.0
    extra = max(p.numbers) + 1
    assert task.score(p, f"Answer: {p.answer} + {extra} - {extra}") == 0.0  # numbers not given
    assert task.score(p, "Answer: 1/0") == 0.0
    assert task.score(p, "Answer: __import__('os')") == 0.0
    assert eval_expression("(2 + 3) * 4 / 5")[0] == 4
    assert eval_expression("7 - 2 - 1") == (4, [7, 2, 1])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_malformed_completions_score_zero_and_never_raise(text):
    for task in (Arithmetic(2), Countdown(3)):
        p = task.problems("train", 1)[0]
        assert task.safe_score(p, text) in (0.0, 1.0)
        assert task.safe_score(p, "Answer: " + text) in (0.0, 1.0)
    parse_answer(text)


def test_python_task_runs_answers_in_the_sandbox():
    task = PythonFunctions()
    p = task.problems("train", 1, seed=5)[0]
    assert task.score(p, task.reference_completion(p)) == 1.0
    assert task.score(p, "```python\ndef f(x):\n    return None\n```") == 0.0
    assert task.score(p, "```python\nimport os\nos.fork()\n```") == 0.0
    assert task.score(p, "no code at all") == 0.0


def test_task_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="task.name"):
        TaskConfig(name="chess")
    with pytest.raises(ConfigError, match="digits"):
        TaskConfig(digits=0)
    with pytest.raises(ConfigError, match="distinct"):
        Arithmetic(1, "+").problems("heldout", 500)
