"""Verifiable tasks: problem generators with train and held-out splits, and their verifiers.

Every task turns a seed into problems and scores a model's completion in [0, 1]. Scoring never
raises: a malformed, truncated or hostile completion scores 0.

Answer format. Arithmetic and countdown answers sit on a line `Answer: <value>` (the first such
line counts); Python answers are one fenced code block (three backticks, optional `python`).

Splits. A problem belongs to the held-out split when a hash of its canonical key falls in the
held-out bucket (`HELDOUT_BUCKETS` of 100), whatever seed produced it, so the train split can
never contain a held-out problem. Both splits are drawn reproducibly from `(task, split, seed)`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from archipelago.config import ConfigError

HELDOUT_BUCKETS = 10  # of 100: a tenth of the problem space is held out
ANSWER_RE = re.compile(r"^[ \t]*Answer:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
CODE_RE = re.compile(r"```(?:python)?[ \t]*\n(.*?)```", re.DOTALL)
MAX_COMPLETION_CHARS = 20_000


@dataclass(frozen=True)
class Problem:
    """One prompt and what its verifier needs. `key` is canonical: equal problems, equal keys."""

    task: str
    key: str
    prompt: str
    answer: str  # the reference answer (arithmetic, countdown target) or a reference solution
    tests: tuple[str, ...] = field(default=())  # Python: assert statements run in the sandbox
    numbers: tuple[int, ...] = field(default=())  # countdown: the numbers that may be used


def is_heldout(task: str, key: str) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{task}\0{key}".encode()).digest()[:8], "big")
    return h % 100 < HELDOUT_BUCKETS


def split_rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{task}/{split}/{seed}".encode()).digest()[:8], "big"))


def parse_answer(completion: str) -> str | None:
    """The value on the first `Answer:` line, or None when there is none."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    m = ANSWER_RE.search(completion)
    return m.group(1) if m else None


def parse_int(text: str | None) -> int | None:
    if text is None or not re.fullmatch(r"-?\d{1,30}", text.strip()):
        return None
    return int(text.strip())


class Task:
    """A family of problems. Subclasses define `sample(rng)` and `score(problem, completion)`."""

    name = "task"

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        raise NotImplementedError

    def problems(self, split: str, n: int, seed: int = 0, unique: bool = True) -> list[Problem]:
        """`n` problems of `split` ("train" or "heldout"), the same for the same arguments."""
        if split not in ("train", "heldout"):
            raise ConfigError(f"split must be train or heldout, got '{split}'")
        rng = split_rng(self.name, split, seed)
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ConfigError(f"task {self.name} cannot produce {n} distinct {split} problems; "
                                  "widen its ranges or ask for fewer")
            p = self.sample(rng)
            if is_heldout(self.name, p.key) != (split == "heldout") or (unique and p.key in seen):
                continue
            seen.add(p.key)
            out.append(p)
        return out

    def reference_completion(self, problem: Problem) -> str:
        """A completion that scores 1: what supervised fine-tuning imitates."""
        return f"Answer: {problem.answer}"

    def safe_score(self, problem: Problem, completion: str) -> float:
        try:
            return float(self.score(problem, completion))
        except Exception:  # a verifier bug must not kill the trainer; the sample scores 0
            return 0.0


_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "*": lambda a, b: a * b}


class Arithmetic(Task):
    """`a op b` with operands of 1..`digits` digits; the answer is the exact integer.

    With `scratchpad`, the reference completion of an addition works column by column from the
    units, carries written out ("7+8=15, 4+3+1=8"), before its `Answer:` line; only the answer
    line is scored.
    """

    name = "arithmetic"

    def __init__(self, digits: int = 2, ops: str = "+-", min_digits: int = 1, scratchpad: bool = False) -> None:
        if not 1 <= min_digits <= digits <= 12:
            raise ConfigError(f"arithmetic digits must satisfy 1 <= min_digits <= digits <= 12, got "
                              f"{min_digits}..{digits}")
        if not ops or any(op not in _OPS for op in ops):
            raise ConfigError(f"arithmetic ops must be drawn from '+-*', got '{ops}'")
        self.digits, self.min_digits, self.ops, self.scratchpad = digits, min_digits, ops, scratchpad

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    def sample(self, rng: random.Random) -> Problem:
        a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.ops)
        key = f"{a}{op}{b}"
        return Problem(self.name, key, f"What is {a} {op} {b}?", str(_OPS[op](a, b)))

    def reference_completion(self, problem: Problem) -> str:
        if not self.scratchpad or "+" not in problem.key:
            return f"Answer: {problem.answer}"
        a, b = problem.key.split("+")
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        steps, carry = [], 0
        for da, db in zip(reversed(a), reversed(b), strict=True):
            total = int(da) + int(db) + carry
            steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
            carry = total // 10
        return f"{', '.join(steps)}\nAnswer: {problem.answer}"

    def score(self, problem: Problem, completion: str) -> float:
        value = parse_int(parse_answer(completion))
        return float(value is not None and value == int(problem.answer))


_EXPR_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def eval_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exactly evaluate an expression of integers, + - * / and parentheses.

    Returns (value, the integer literals used). Raises ValueError on anything else, including
    division by zero; no `eval` is involved.
    """
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected character at {pos}")
        tokens.append(m.group(1))
        pos = m.end()
        if len(tokens) > 64:
            raise ValueError("expression too long")
    used: list[int] = []
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise ValueError("unexpected end")
        i += 1
        return tokens[i - 1]

    def atom() -> Fraction:
        t = take()
        if t == "(":
            v = expr()
            if take() != ")":
                raise ValueError("missing )")
            return v
        if t.isdigit():
            used.append(int(t))
            return Fraction(int(t))
        raise ValueError(f"unexpected '{t}'")

    def term() -> Fraction:
        v = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            v = v * rhs if op == "*" else v / rhs
        return v

    def expr() -> Fraction:
        v = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            v = v + rhs if op == "+" else v - rhs
        return v

    if not tokens:
        raise ValueError("empty expression")
    value = expr()
    if i != len(tokens):
        raise ValueError("trailing input")
    return value, used


class Countdown(Task):
    """Reach `target` from the given numbers with + - * / (each number at most once)."""

    name = "countdown"

    def __init__(self, count: int = 3, max_number: int = 20) -> None:
        if not 2 <= count <= 6 or max_number < 2:
            raise ConfigError(f"countdown needs 2..6 numbers and max_number >= 2, got {count}, {max_number}")
        self.count, self.max_number = count, max_number

    def sample(self, rng: random.Random) -> Problem:
        # Draw numbers, then build a target from a random expression over some of them: solvable.
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            order = numbers[:]
            rng.shuffle(order)
            used = order[:rng.randint(2, self.count)]
            expr = str(used[0])
            for n in used[1:]:
                expr = f"({expr} {rng.choice('+-*')} {n})"
            value, _ = eval_expression(expr)
            if value.denominator == 1 and 0 < value <= 1000:
                break
        target = int(value)
        key = f"{sorted(numbers)}->{target}"
        prompt = f"Using the numbers {', '.join(map(str, numbers))}, make {target}."
        return Problem(self.name, key, prompt, expr, numbers=tuple(numbers))

    def score(self, problem: Problem, completion: str) -> float:
        text = parse_answer(completion)
        if text is None:
            return 0.0
        try:
            value, used = eval_expression(text)
        except ValueError:
            return 0.0
        pool = list(problem.numbers)
        for n in used:
            if n not in pool:
                return 0.0
            pool.remove(n)
        target, _ = eval_expression(problem.answer)
        return float(value == target)


# Small Python functions: a signature, what it must do, and a reference to make test cases from.
_FUNCTIONS: list[tuple[str, str, str, Callable[..., object], Callable[[random.Random], tuple]]] = [
    ("add_k", "returns x plus {k}", "return x + {k}", lambda x, k: x + k,
     lambda r: (r.randint(-50, 50),)),
    ("scale", "returns x times {k}", "return x * {k}", lambda x, k: x * k,
     lambda r: (r.randint(-50, 50),)),
    ("clamp_k", "returns x, but at most {k}", "return min(x, {k})", lambda x, k: min(x, k),
     lambda r: (r.randint(-50, 50),)),
    ("mod_k", "returns x modulo {k}", "return x % {k}", lambda x, k: x % k,
     lambda r: (r.randint(0, 100),)),
    ("repeat", "returns the string s repeated {k} times", "return s * {k}", lambda s, k: s * k,
     lambda r: ("".join(r.choice("abc") for _ in range(r.randint(0, 3))),)),
    ("count_char", "returns how many times the letter 'a' occurs in s, plus {k}",
     "return s.count('a') + {k}", lambda s, k: s.count("a") + k,
     lambda r: ("".join(r.choice("ab") for _ in range(r.randint(0, 6))),)),
]


class PythonFunctions(Task):
    """Write `def f(...)` that passes hidden unit tests; run in the sandbox, never in-process."""

    name = "python"

    def __init__(self, tests_per_problem: int = 4, max_k: int = 9, timeout_s: float = 5.0) -> None:
        self.tests_per_problem, self.max_k, self.timeout_s = tests_per_problem, max_k, timeout_s

    def sample(self, rng: random.Random) -> Problem:
        name, doc, body, ref, arg = rng.choice(_FUNCTIONS)
        k = rng.randint(1, self.max_k)
        tests = []
        for _ in range(self.tests_per_problem):
            args = arg(rng)
            tests.append(f"assert f({', '.join(map(repr, args))}) == {ref(*args, k)!r}")
        params = "s" if name in ("repeat", "count_char") else "x"
        prompt = f"Write a Python function f({params}) that {doc.format(k=k)}."
        solution = f"def f({params}):\n    {body.format(k=k)}\n"
        return Problem(self.name, f"{name}:{k}", prompt, solution, tests=tuple(tests))

    def reference_completion(self, problem: Problem) -> str:
        return f"```python\n{problem.answer}```"

    def score(self, problem: Problem, completion: str) -> float:
        if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
            return 0.0
        m = CODE_RE.search(completion)
        if not m:
            return 0.0
        from posttrain.sandbox import SandboxLimits, run_python

        result = run_python(m.group(1), "\n".join(problem.tests), SandboxLimits(wall_s=self.timeout_s))
        return float(result.ok)


TASKS: dict[str, Callable[..., Task]] = {"arithmetic": Arithmetic, "countdown": Countdown,
                                         "python": PythonFunctions}


@dataclass
class TaskConfig:
    """`[task]` of a post-training preset: which task, its difficulty, and the split sizes."""

    name: str = "arithmetic"
    digits: int = 2  # arithmetic: operands have min_digits..digits digits
    min_digits: int = 1
    ops: str = "+-"
    scratchpad: bool = False  # arithmetic: reference completions show the column sums first
    count: int = 3  # countdown: how many numbers
    max_number: int = 20
    train_problems: int = 4000
    heldout_problems: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ConfigError(f"task.name must be one of {sorted(TASKS)}, got '{self.name}'")
        if self.train_problems < 1 or self.heldout_problems < 1:
            raise ConfigError("task.train_problems and task.heldout_problems must be positive")
        self.build()  # a bad difficulty setting fails here, naming the field

    def build(self) -> Task:
        if self.name == "arithmetic":
            return Arithmetic(self.digits, self.ops, self.min_digits, self.scratchpad)
        if self.name == "countdown":
            return Countdown(self.count, self.max_number)
        return PythonFunctions()
