"""The interactive chat loop behind ``ResoLLMInference.interactive_session`` and ``reso chat``.

Lines read from ``input_stream`` (commands in any case): ``exit`` ends; ``goal <description>``
sets a goal for the next response (several may be set; after that response, or when the session
ends first, those not achieved are abandoned; a goal that cannot be created, e.g. agency off or
``max_goals`` reached, is reported, not fatal);
``status`` prints the session's state; ``metrics`` toggles the metrics line
printed after each response; anything else is a user message, answered with the whole
conversation in the chat template as context. Each user message is also stored in the
episodic memory (importance 0.5) when memory is enabled. A response that fails (a cognition
error, a value or runtime error from the model) is reported and the session carries on as it
was before the message: not in the history, not in the memory (the generation leaves the rest
of the session as it found it), and goals set for it wait for the next response. Any other
exception is raised after the same rollback.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, TextIO

from ..tokenizer import ChatTurn
from .agency import Goal
from .errors import CognitionError

if TYPE_CHECKING:
    from ..inference import ResoLLMInference

BANNER = "Reso-LLM interactive session. Commands: exit, goal <description>, status, metrics."
USER_IMPORTANCE = 0.5


def status_text(engine: "ResoLLMInference") -> str:
    model, session = engine.model, engine.session
    goals = ", ".join(f"{g.description!r} {g.progress:.0%}" for g in model.get_active_goals()) or "none"
    return (f"status: stability={model.get_stability():.2f} ({session.stability.label}) "
            f"lyapunov={session.stability.lyapunov:.4f} suggested_temperature="
            f"{model.get_suggested_temperature(engine.sampling.temperature):.2f} turn={session.turn} "
            f"episode={session.episode} goals=[{goals}] memory={len(session.memory)} moments "
            f"concepts={len(session.concepts)}")


def run_interactive(engine: "ResoLLMInference", show_metrics: bool, inp: TextIO, out: TextIO, max_length: int) -> None:
    pending_goals: list[Goal] = []
    try:
        _loop(engine, show_metrics, inp, out, max_length, pending_goals)
    finally:  # a goal lasts one response: one set just before exit (or EOF) goes with the session
        _abandon(pending_goals)


def _abandon(goals: list[Goal]) -> None:
    for goal in goals:
        if goal.status == "active":
            goal.status = "abandoned"
    goals.clear()


def _loop(engine: "ResoLLMInference", show_metrics: bool, inp: TextIO, out: TextIO, max_length: int,
          pending_goals: list[Goal]) -> None:
    tok, session = engine.tokenizer, engine.session

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    say(BANNER)
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            say("")
            break
        msg = line.strip()
        if not msg:
            continue
        command = msg.lower()  # commands in any case: "Exit", "GOAL ..."
        if command == "exit":
            say("bye")
            break
        if command == "metrics":
            show_metrics = not show_metrics
            say(f"metrics display {'on' if show_metrics else 'off'}")
            continue
        if command == "status":
            say(status_text(engine))
            continue
        if command == "goal" or command.startswith("goal "):
            desc = msg[4:].strip()
            if not desc:
                say("usage: goal <description>")
                continue
            try:
                pending_goals.append(engine.model.create_goal(desc, "task"))
            except CognitionError as exc:  # agency off, or max_goals reached: say so, carry on
                say(f"goal not set: {exc}")
                continue
            say(f"goal set for the next response: {desc}")
            continue
        memory_before = copy.deepcopy(session.memory)  # the message goes in first: it conditions the response
        try:
            if session.config.temporal_smf.enabled:
                engine.model.update_memory(msg, USER_IMPORTANCE)
            session.history.append({"role": "user", "text": msg})
            turns = [ChatTurn(t["role"], t["text"]) for t in session.history]
            ids = tok.encode_chat(turns, add_generation_prompt=True)
            result = engine.generate_ids(ids, max_length, chat=True, prompt=msg)
        except BaseException as exc:  # the session goes back to how it was before the message
            if session.history and session.history[-1] == {"role": "user", "text": msg}:
                session.history.pop()
            session.memory = memory_before
            if not isinstance(exc, (CognitionError, ValueError, RuntimeError)):
                raise  # not a failed response but a bug or an interrupt: after the rollback, it stops the loop
            kept = "; the goals set for it wait for the next response" if pending_goals else ""
            say(f"error: the response failed ({type(exc).__name__}: {exc}); the message was not added{kept}")
            continue
        _abandon(pending_goals)
        session.history.append({"role": "assistant", "text": result.text})
        say(f"reso> {result.text}")
        if result.goals_achieved:
            say(f"goals achieved: {result.goals_achieved}")
        if show_metrics:
            say(result.metrics_line())
