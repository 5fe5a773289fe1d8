"""The interactive chat loop behind ``ResoLLMInference.interactive_session`` and ``reso chat``.

Lines read from ``input_stream``: ``exit`` ends; ``goal <description>`` sets a goal for the
next response (several may be set; after that response those not achieved are abandoned; a goal
that cannot be created, e.g. agency off or ``max_goals`` reached, is reported, not fatal);
``status`` prints the session's state; ``metrics`` toggles the metrics line
printed after each response; anything else is a user message, answered with the whole
conversation in the chat template as context. Each user message is also stored in the
episodic memory (importance 0.5) when memory is enabled.
"""

from __future__ import annotations

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
    tok, session = engine.tokenizer, engine.session
    pending_goals: list[Goal] = []

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
        if msg == "exit":
            say("bye")
            break
        if msg == "metrics":
            show_metrics = not show_metrics
            say(f"metrics display {'on' if show_metrics else 'off'}")
            continue
        if msg == "status":
            say(status_text(engine))
            continue
        if msg == "goal" or msg.startswith("goal "):
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
        if session.config.temporal_smf.enabled:
            engine.model.update_memory(msg, USER_IMPORTANCE)
        session.history.append({"role": "user", "text": msg})
        turns = [ChatTurn(t["role"], t["text"]) for t in session.history]
        ids = tok.encode_chat(turns, add_generation_prompt=True)
        result = engine.generate_ids(ids, max_length, chat=True, prompt=msg)
        for goal in pending_goals:  # a goal lasts one response: those not achieved are dropped
            if goal.status == "active":
                goal.status = "abandoned"
        pending_goals = []
        session.history.append({"role": "assistant", "text": result.text})
        say(f"reso> {result.text}")
        if result.goals_achieved:
            say(f"goals achieved: {result.goals_achieved}")
        if show_metrics:
            say(result.metrics_line())
