"""User ranking functions for the `python:module:function` annotator tests."""


def shortest_first(prompt: str, responses: list[str]):
    """Prefers shorter responses; equal lengths tie."""
    lengths = sorted({len(r) for r in responses})
    return {"tiers": [[i for i, r in enumerate(responses) if len(r) == n] for n in lengths], "rationale": "brevity"}


def broken(prompt: str, responses: list[str]):
    return [0, 0]
