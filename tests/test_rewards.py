"""Verifiable rewards: boxed answers, math-verify equivalence, timeouts from any thread or process."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time

import pytest
from _requires import require

require("math_verify")

from spectra.train import math_worker, rewards
from spectra.train.rewards import (
    accuracy_reward,
    format_reward,
    last_boxed,
    score_answer,
    score_answers,
)

# 9^(9^(9^(9^9))): parses at once, then sympy computes in verify for minutes (over 20 s measured).
HOSTILE = r"the answer is \boxed{9^{9^{9^{9^{9}}}}}"
TIMEOUT = 1.0
SLACK = 1.5  # killing the worker and returning


@pytest.fixture
def warm_worker():
    """A started worker, so that timings measure scoring and not the ~0.5 s start-up."""
    assert score_answer(r"\boxed{x+1}", "1+x") == 1.0
    return math_worker._worker


# --- last_boxed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}} done", r"\frac{\sqrt{2}}{2}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"\boxed{1} and finally \fbox{3}", "3"),
        (r"\boxed {7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{a + \boxed{b}}", r"a + \boxed{b}"),  # a box inside a box belongs to the outer one
        ("no box here", None),
        (r"\boxed{\frac{1}{2}", None),  # never closed
        (r"\boxed{1} then \boxed{2", None),  # the last box is unbalanced
        (r"\boxed{", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_on_a_megabyte_of_open_boxes_is_fast():
    start = time.perf_counter()
    assert last_boxed(r"\boxed{" * 150_000) is None
    assert time.perf_counter() - start < 2.0


# --- equivalence -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("85", "85"),
        ("85.0", "85"),
        ("085", "85"),
        ("-3.0", "-3"),
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        ("1/2", r"\frac{1}{2}"),
        ("0.1234568", "0.1234567"),  # math-verify compares decimals to 6 places
        ("1+x^2", "x^2+1"),
        (r"\sqrt{12}", r"2\sqrt{3}"),
        (r"\{2, 1\}", r"\{1,2\}"),
        ("(1, 2]", "(1,2]"),
        (r"\left(1, 2\right)", "(1,2)"),
        ("5, 3", "3, 5"),
        (r"85^\circ", "85"),
        (r"\$85", "85"),
        ("1,000", "1000"),
        (r"\infty", r"\infty"),
        (r"\frac{1}{2}", r"$\frac{1}{2}$"),  # truth given as a formula
        (r"\frac{1}{2}", r"so the answer is \boxed{\frac{1}{2}}"),  # truth given as a solution
    ],
)
def test_equivalent_answers_score_one(answer, truth):
    assert score_answer(rf"The answer is \boxed{{{answer}}}.", truth) == 1.0


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("86", "85"),
        ("85.5", "85"),
        ("12345678901234568", "12345678901234567"),
        ("0.5", r"\frac{1}{3}"),
        ("x^2-1", "x^2+1"),
        ("[1,2]", "(1,2]"),
        (r"\{1,3\}", r"\{1,2\}"),
        ("5", "3, 5"),  # read with math-verify's defaults the bare truth "3, 5" would be 5
        ("2", r"2\sqrt{3}"),  # ... and "2\sqrt{3}" would be 2
        (r"\frac{}{}", "1"),  # does not parse
    ],
)
def test_different_answers_score_zero(answer, truth):
    assert score_answer(rf"The answer is \boxed{{{answer}}}.", truth) == 0.0


@pytest.mark.parametrize(
    "completion",
    ["The answer is 85.", r"The answer is \boxed{85", r"\boxed{}", r"\boxed{ }", ""],
)
def test_no_usable_boxed_answer_scores_zero(completion):
    assert score_answer(completion, "85") == 0.0


def test_plain_numbers_are_compared_without_the_worker():
    rewards.shutdown_worker()
    assert score_answers([r"\boxed{85.0}", r"\boxed{84}", r"\boxed{-7}"], ["85", "85", "-7"]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert math_worker._worker is None


def test_score_answers_checks_lengths_and_timeout():
    with pytest.raises(ValueError, match="2 completions but 1 truths"):
        score_answers(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="timeout must be positive"):
        score_answers(["a"], ["1"], timeout=0)


# --- relations: a relation is judged as a relation -----------------------------------------------------

# Relation operators that are never an assignment; "=" and ":=" are, so their shapes below avoid a bare
# variable on the left.
_NON_ASSIGNMENT_OPERATORS = [
    "<", ">", r"\le", r"\leq", r"\leqslant", r"\ge", r"\geq", r"\geqslant", r"\lt", r"\gt", r"\ne", r"\neq",
    r"\approx", r"\sim", r"\simeq", r"\equiv", r"\cong", r"\propto", r"\to", r"\rightarrow", r"\Rightarrow",
    r"\implies", r"\iff", r"\mapsto", "≤", "≥", "≠", "≈", "≡", "→",
]  # fmt: skip
_SHAPES = ["{v} {op} 0", "0 {op} {v}", "x + 1 {op} {v}", "2 {op} {v}", "{v} {op} {v} + 1"]
_EQUATIONS = ["{v} = 0", "0 = {v}", "x + 1 = {v}", "2x = {v}", "{v} = {v} + 1", "0 := {v}", "1 - 1 = {v}"]
_ODD_PLACES = [
    "x = 0 = {v}",  # a chain: math-verify takes the first left side and the last right side
    "x = {v} = 0",
    "x = y + 1 = {v}",
    "{{0 = {v}}}",  # inside a group
    r"\{{0 = {v}\}}",
    r"\left(0 = {v}\right)",
    r"\text{{0 = }} {v}",  # inside text
    r"\text{{since }} 0 = {v}",
    r"\pi = {v}",  # \pi is a constant, not a variable
    "x = {v}, 0 = {v}",  # the second item of a list
    r"x \in \{{0, {v}\}}",
    "f(x) + 1 = {v}",
]


def _hostile_relations(value: str) -> list[str]:
    """False or evasive relations that contain the true ``value``."""
    shapes = [*_SHAPES, "y {op} {v}"]
    relations = [s.format(v=value, op=op) for op in _NON_ASSIGNMENT_OPERATORS for s in shapes]
    return relations + [s.format(v=value) for s in _EQUATIONS + _ODD_PLACES]


@pytest.mark.parametrize("truth", ["1628", r"\frac{1}{2}", "-7"])
def test_a_relation_containing_the_true_value_scores_zero(truth):
    hostile = _hostile_relations(truth)
    assert len(hostile) >= 100
    scores = score_answers([rf"\boxed{{{h}}}" for h in hostile], [truth] * len(hostile))
    assert [h for h, s in zip(hostile, scores, strict=True) if s != 0.0] == []


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("x = 1628", "1628"),  # a bare variable on the left: the right side is the answer
        ("a_1=1628", "1628"),
        ("N = 1628", "1628"),
        ("a_{10} = 1628", "1628"),
        (r"\theta = \frac{\pi}{3}", r"\frac{\pi}{3}"),
        ("x = y = 1628", "1628"),
        ("x := 1628", "1628"),
        ("(x, y) = (1, 2)", "(1, 2)"),
        ("x = 1, y = 2", "1, 2"),  # each item of a list
        (r"x \in [0, 1]", "[0, 1]"),
        (r"x = 19.65 \times 10^{2}", "1965"),
        ("x = 5", "x = 5"),  # the truth is a relation: the same relation
        ("5", "x = 5"),
        ("y^2 + x^2 = 1", "x^2+y^2=1"),
        ("3 < x", "x > 3"),  # a flipped inequality is the same relation
        (r"x \le 2", r"x \leq 2"),
        ("x ≤ 2", r"x \le 2"),
        (r"(3, \infty)", "x > 3"),
    ],
)
def test_a_correct_relation_scores_one(answer, truth):
    assert score_answer(rf"\boxed{{{answer}}}", truth) == 1.0


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("x = 0 = 5", "x = 5"),
        ("x = 5 = 0", "x = 5"),
        (r"x \approx 5", "x = 5"),  # another relation
        (r"0 \approx 5", "x = 5"),
        ("y = 5", "x = 5"),  # another variable
        (r"x \ge 3", "x > 3"),
        ("x = 4", "x > 3"),
        ("x^2 + y^2 = 2", "x^2+y^2=1"),
    ],
)
def test_a_wrong_relation_against_a_relation_scores_zero(answer, truth):
    assert score_answer(rf"\boxed{{{answer}}}", truth) == 0.0


# --- scientific notation -------------------------------------------------------------------------------

SCIENTIFIC_1965 = [
    r"19.65\times 10^{2}",
    r"1.965 \times 10^{3}",
    r"1.965 \times 10^3",
    r"1.965\cdot10^{3}",
    r"1.965 \cdot 10^{+3}",
    "1.965 × 10^3",
    "1.965 · 10^{3}",
    "1.965*10^3",
    "1.965e3",
    "1.965E+3",
    "196500e-2",
    r"196500 \times 10^{-2}",
    r"0.1965\times10^{4}",
]


@pytest.mark.parametrize("answer", SCIENTIFIC_1965)
def test_scientific_notation_scores_one(answer):
    assert score_answer(rf"\boxed{{{answer}}}", "1965") == 1.0


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        (r"1.5 \times 10^{-3}", "0.0015"),
        ("1.5e-3", r"\frac{3}{2000}"),
        ("-2.5e-1", r"-\frac{1}{4}"),
        ("1965", r"1.965 \times 10^{3}"),  # the truth in scientific notation
        (r"6.02 \times 10^{23}", "602000000000000000000000"),
        ("6.02e23", r"6.02 \times 10^{23}"),
    ],
)
def test_scientific_notation_of_other_numbers_scores_one(answer, truth):
    assert score_answer(rf"\boxed{{{answer}}}", truth) == 1.0


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        (r"1.965 \times 10^{2}", "1965"),
        (r"1.965 \times 10^{4}", "1965"),
        ("1.965e4", "1965"),
        (r"19.65 \times 10^{3}", "1965"),
        (r"1.965 \times 10^{-3}", "1965"),
        (r"1.5 \times 10^{3}", "0.0015"),
        ("1.5e-2", r"\frac{3}{2000}"),
    ],
)
def test_scientific_notation_with_a_wrong_exponent_scores_zero(answer, truth):
    assert score_answer(rf"\boxed{{{answer}}}", truth) == 0.0


def test_exact_numbers_and_assignments_are_judged_without_the_worker():
    rewards.shutdown_worker()
    right = [*SCIENTIFIC_1965, "x = 1965", "x = 1.965e3"]
    wrong = ["0 = 1965", r"1965 \le 2000", "1966", "1.966e3"]
    completions = [rf"\boxed{{{a}}}" for a in right + wrong]
    assert score_answers(completions, ["1965"] * len(completions)) == [1.0] * len(right) + [0.0] * len(wrong)
    assert math_worker._worker is None


def test_a_huge_exponent_scores_zero_without_being_expanded(warm_worker):
    start = time.perf_counter()
    answers = ["1e999999999", r"1 \times 10^{999999999}", r"1 \times 10^{1001}", "0"]
    truths = ["1", "1", r"10^{1001}", "1e-1001"]  # on either side; too big to check even when equal
    assert score_answers([rf"\boxed{{{a}}}" for a in answers], truths, timeout=TIMEOUT) == [0.0] * 4
    assert time.perf_counter() - start < 0.5  # sympy would compute 10^999999999 until the timeout
    assert math_worker._worker is warm_worker


# --- hostile and huge answers ------------------------------------------------------------------------


def test_math_verify_alone_can_not_time_out_outside_the_main_thread():
    """The premise of the worker: math-verify's signal.alarm timeouts refuse to run in a thread."""
    import math_verify

    errors = []

    def parse_in_thread():
        try:
            math_verify.parse("$1$")
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=parse_in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "thread" in str(errors[0])


def test_hostile_answer_times_out_in_the_main_thread_and_the_worker_is_replaced(warm_worker):
    start = time.perf_counter()
    assert score_answer(HOSTILE, "1", timeout=TIMEOUT) == 0.0
    elapsed = time.perf_counter() - start
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT + SLACK
    assert warm_worker.process.poll() is not None  # the hung worker was killed
    assert score_answer(r"\boxed{\frac{2}{4}}", "0.5", timeout=TIMEOUT) == 1.0
    assert math_worker._worker is not warm_worker and math_worker._worker.is_usable()


def test_hostile_answer_times_out_in_another_thread(warm_worker):
    results = []

    def score_in_thread():
        start = time.perf_counter()
        results.append((score_answer(HOSTILE, "1", timeout=TIMEOUT), time.perf_counter() - start))

    thread = threading.Thread(target=score_in_thread)
    thread.start()
    thread.join(timeout=TIMEOUT + 10)
    assert not thread.is_alive()
    (score, elapsed) = results[0]
    assert score == 0.0
    assert elapsed < TIMEOUT + SLACK


def test_a_hostile_item_does_not_zero_its_neighbours(warm_worker):
    completions = [r"\boxed{x+1}", HOSTILE, r"\boxed{\frac{1}{2}}", r"\boxed{\frac{1}{3}}"]
    assert score_answers(completions, ["1+x", "1", "0.5", "0.5"], timeout=TIMEOUT) == [1.0, 0.0, 1.0, 0.0]


def test_threads_scoring_at_once_get_their_own_results(warm_worker):
    results: dict[int, list[float]] = {}

    def score(i: int) -> None:
        results[i] = score_answers([rf"\boxed{{{i}/2}}", rf"\boxed{{{i}/3}}"], [f"{i / 2}", f"{i / 2}"])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [1.0, 0.0] for i in range(1, 9)}


def test_a_megabyte_answer_scores_zero_fast():
    huge = r"\boxed{" + "1+" * 500_000 + "1}"
    start = time.perf_counter()
    assert score_answer(huge, "1000001") == 0.0
    assert score_answer(r"\boxed{" + "7" * 1_000_000 + "}", "7") == 0.0
    assert time.perf_counter() - start < 1.0


def test_an_answer_over_the_cap_is_not_parsed():
    at_cap = "1+" * ((rewards.MAX_ANSWER_CHARS - 1) // 2) + "1"
    assert len(at_cap) <= rewards.MAX_ANSWER_CHARS
    assert score_answer(rf"\boxed{{{at_cap}}}", str(at_cap.count("1"))) == 1.0
    assert score_answer(rf"\boxed{{{at_cap}+0+0}}", str(at_cap.count("1"))) == 0.0


# --- other processes ---------------------------------------------------------------------------------


def _wait_until_gone(pid: int, seconds: float = 5.0) -> bool:
    """Whether process ``pid`` ends (or is left a zombie, if an orphan) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _score_in_forked_child(conn) -> None:
    conn.send((score_answer(r"\boxed{\frac{3}{6}}", "0.5"), math_worker._worker.process.pid))
    conn.close()


def test_a_forked_child_starts_its_own_worker(warm_worker):
    parent_end, child_end = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(target=_score_in_forked_child, args=(child_end,))
    child.start()
    assert parent_end.poll(30)
    score, child_worker_pid = parent_end.recv()
    child.join(10)
    assert score == 1.0
    assert child_worker_pid != warm_worker.process.pid
    assert score_answer(r"\boxed{\frac{3}{6}}", "0.5") == 1.0
    assert math_worker._worker is warm_worker  # the parent's worker was not disturbed
    assert _wait_until_gone(child_worker_pid)  # the child's worker ends with the child (its stdin closes)


def test_no_worker_is_left_behind_at_exit():
    """Even when a daemon thread is still waiting on a hung answer as the interpreter exits."""
    code = (
        "import importlib.util, sys, threading, time\n"
        "spec = importlib.util.spec_from_file_location('w', sys.argv[1])\n"
        "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)\n"
        "assert w.verify_pairs([('x+1', '1+x')], 5.0) == [(1.0, True)]\n"
        "print(w._worker.process.pid, flush=True)\n"
        "threading.Thread(target=w.verify_pairs, args=([(sys.argv[2], '1')], 60.0), daemon=True).start()\n"
        "time.sleep(0.5)\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, math_worker.__file__, last_boxed(HOSTILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert time.perf_counter() - start < 10
    assert _wait_until_gone(int(done.stdout), seconds=0.5)


def test_shutdown_worker_kills_it(warm_worker):
    rewards.shutdown_worker()
    assert warm_worker.process.poll() is not None
    assert math_worker._worker is None


# --- TRL reward functions ----------------------------------------------------------------------------


def test_accuracy_reward_with_string_completions_as_trl_calls_it():
    completions = [r"so \boxed{4}", r"so \boxed{5}", "no answer", r"so \boxed{\frac{8}{2}}", r"\boxed{None}"]
    scores = accuracy_reward(
        prompts=["2+2?"] * 5,
        completions=completions,
        completion_ids=[[1, 2]] * 5,
        answer=[4, "4", "4", "4", None],
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_accuracy_reward_with_conversational_completions():
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{\frac{1}{2}}."}],
        [{"role": "assistant", "content": r"It is \boxed{2}."}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"It is \boxed{0.5}"}]}],
        [
            {"role": "assistant", "content": r"\boxed{7}"},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": r"\boxed{0.50}"},
        ],
    ]
    assert accuracy_reward(completions, answer=[r"\frac{1}{2}"] * 4) == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"Adding gives \boxed{4}", 1.0),
        (r"Adding gives \boxed{4}.", 1.0),
        ("Adding gives $\\boxed{4}$.\n", 1.0),
        (r"\[ \boxed{\frac{1}{2}} \]", 1.0),
        (r"**\boxed{4}**", 1.0),
        (r"Adding gives 4.", 0.0),
        (r"\boxed{4} because 2+2=4", 0.0),  # text after the answer
        (r"\boxed{3} or \boxed{4}", 0.0),  # more than one box
        (r"\boxed{}", 0.0),
        (r"Adding gives \boxed{4", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([[{"role": "assistant", "content": completion}]]) == [expected]


def test_reward_functions_are_named_for_trl():
    # TRL logs a reward function under its __name__ (trl.trainer.utils.get_callable_name).
    assert accuracy_reward.__name__ == "accuracy"
    assert format_reward.__name__ == "format"
