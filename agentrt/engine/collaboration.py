"""The text that turns N decoders into collaborators (after the Hogwild! paper's prompts)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CollaborationPrompts", "NAMES"]

NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi")


@dataclass
class CollaborationPrompts:
    """The text that turns N decoders into collaborators (after the Hogwild! paper's prompts)."""

    names: tuple[str, ...] = NAMES
    history_header: str = "### Past steps\n\n"
    others_header: str = "### Work in progress (others)\n\n"
    pivot: str = " <...>\n\n"  # closes another worker's unfinished step
    own_header: str = "### Work in progress (own)\n\n"
    check: str = "Quick check: am I doing redundant work? (yes/no): "
    check_every: int = 256  # a worker's own tokens between two checks
    answer_marker: str = "Final answer:"
    finisher: str = "\n\nTime is up: we must answer now, from the work above. "

    def name(self, worker: int) -> str:
        return self.names[worker] if worker < len(self.names) else f"Worker{worker + 1}"

    def step_prefix(self, worker: int, step: int) -> str:
        return f"**{self.name(worker)} [{step}]:** "

    def opening(self, worker: int) -> str:
        hi = f"Hi, I'm {self.name(worker)}."
        return self.step_prefix(worker, 1) + (hi + " Here is how we can split the work:" if worker == 0 else hi)

    def system(self, workers: int) -> str:
        names = [self.name(w) for w in range(workers)]
        team = names[0] if workers == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return (
            f"You are one of {workers} assistants ({team}) solving the same task together. You all write at "
            "the same time, one paragraph (step) at a time, and see each other's work as it is written.\n"
            f"- '{self.history_header.strip()}' holds everyone's finished steps, each starting with "
            "**Name [step number]:**\n"
            f"- '{self.others_header.strip()}' shows the others' unfinished steps, each ending with "
            f"'{self.pivot.strip()}'; after '{self.own_header.strip()}' you write your own step.\n"
            "How to collaborate:\n"
            f"1. Plan first: propose how to split the task between you; if plans differ, follow {names[0]}'s.\n"
            "2. Announce what you will do next before you do it (e.g. 'I will check the edge cases').\n"
            "3. Never do work another assistant has done or is doing: when you notice it, stop mid-sentence "
            "and switch to something else.\n"
            "4. Check and build on each other's results, and answer questions addressed to you.\n"
            f"5. Keep steps short. When the task is solved, one of you writes '{self.answer_marker} <answer>'."
        )
